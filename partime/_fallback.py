"""The exact sequential fallback, and how it batches.

When the parallel iteration has not converged, the steps after the converged prefix are
computed one after another: `s_t = step(s_{t-1}, x_t)` for `t = start..T-1`.

The previous state is carried through the loop rather than read back from the
buffer being written: reading the row before the one written made XLA:CPU copy the
buffer, 18x the cost of the steps themselves (Lorenz-63, 2·10⁴ Tsit5 steps).

Written naively as a `while_loop`, this costs `O(T²)` under `vmap`: the prefix differs
per batch member, so the loop's predicate is batched, and JAX then selects between the
old and new *whole* `(B, T, d)` state at every step. The batching rule below instead
runs one unbatched counter from the smallest start in the batch and writes one masked
row per step: `O(B d)` per step, and zero trips when every member converged.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree


class SequentialForm(eqx.Module):
    """A step map with a second form of the same map for the sequential fallback,
    where it runs one step at a time: the iteration evaluates `step` (vectorised over
    the steps), the fallback `sequential` (e.g. a Runge--Kutta step's stages as
    straight-line code rather than a loop; see `partime._inner_step._erk_stages`).
    Both must compute the same map, up to rounding."""

    step: Callable
    sequential: Callable

    def __call__(self, state, x):
        return self.step(state, x)


def sequential_form(step: Callable) -> Callable:
    """The form of `step` for the sequential fallback."""
    return step.sequential if isinstance(step, SequentialForm) else step


def sequential_completion(
    step: Callable,
    init: Float[Array, " d"],
    xs: PyTree,
    states: Float[Array, "T d"],
    start: Int[Array, ""],
) -> Float[Array, "T d"]:
    """Recomputes `states[start:]` sequentially from `states[start - 1]` (or `init`).

    `step` may be any callable PyTree (e.g. a closure-converted function): its arrays
    may be batched too.
    """
    dynamic, static = eqx.partition(sequential_form(step), eqx.is_array)

    @jax.custom_batching.custom_vmap
    def complete(dynamic, init, xs, states, start):
        fn = eqx.combine(dynamic, static)

        def body(carry):
            t, prev, states = carry
            new = fn(prev, jtu.tree_map(lambda a: a[t], xs))
            return t + 1, new, states.at[t].set(new)

        length = states.shape[0]
        prev = jnp.where(start == 0, init, states[jnp.maximum(start - 1, 0)])
        _, _, states = jax.lax.while_loop(
            lambda carry: carry[0] < length, body, (start, prev, states)
        )
        return states

    @complete.def_vmap
    def _complete_batched(axis_size, in_batched, *args):
        def broadcast(x, batched):
            return x if batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))

        args = jtu.tree_map(broadcast, list(args), list(in_batched))
        dynamic, init, xs, states, start = args
        batched_step = jax.vmap(lambda d, p, x: eqx.combine(d, static)(p, x))

        def body(carry):
            t, prev, states = carry
            new = batched_step(dynamic, prev, jtu.tree_map(lambda a: a[:, t], xs))
            row = jnp.where((t >= start)[:, None], new, states[:, t])
            return t + 1, row, states.at[:, t].set(row)

        length = states.shape[1]
        # One unbatched counter from the earliest start in the batch.
        first = jnp.min(start)
        prev = jnp.where(first == 0, init, states[:, jnp.maximum(first - 1, 0)])
        _, _, states = jax.lax.while_loop(
            lambda carry: carry[0] < length, body, (first, prev, states)
        )
        return states, True

    return complete(dynamic, init, xs, states, start)
