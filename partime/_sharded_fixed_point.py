"""The sharded layout: the time axis split over the devices of a mesh.

The one loop (`partime._loop.iterate`) runs inside one `jax.shard_map`. Device `p`
holds steps `pC+1 .. (p+1)C` (`C = T / P`) of the iterate and of the inputs, and the
loop's reductions over time go through collectives:

- the state before a chunk comes from device `p - 1` (`lax.ppermute`, `d` numbers;
    device 0 uses `s_0`);
- the Newton system is solved by `partime._sharding.chunk_solve` (a local scan, one
    `all_gather` of the `P` chunk summaries, `P·(d² + d)` numbers for Newton);
- the merit and the convergence tests are `lax.psum`s of scalars, the first step
    that fails a test a `lax.pmin`, the state at a step a `lax.psum` of `d` numbers;
- the exact fallback runs chunk by chunk, round-robin across the devices.

Nothing proportional to `T` crosses devices. The derivative is the one implicit rule,
its linear solve sharded the same way; for reverse mode JAX transposes it into a
`shard_map` that moves as little.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._fallback import sequential_form
from ._layout import AbstractLayout, zeros_for_none
from ._lds import DenseTransition
from ._loop import iterate
from ._method.base import AbstractDampedMethod
from ._misc import first_false
from ._sharding import chunk_solve, filter_shard_map, sharded_solve, time_axis


class _ClosedStep(eqx.Module):
    """`step` as a jaxpr and every array it closes over, so that those arrays are
    explicit inputs: they get tangents through the custom JVP, and they enter
    `shard_map` as replicated arguments rather than as constants.

    Not `eqx.filter_closure_convert`, as in the unsharded solve: its call checks the
    arguments' shardings against the example's, and inside `shard_map` they differ.
    Nor `jax.closure_convert`, which leaves closed-over integer tracers (a diffrax
    step counter, say) inside the jaxpr, where `shard_map` cannot lower them. The
    jaxpr is traced outside `shard_map` and replayed inside it, binding primitives on
    a mix of per-device and replicated values without the `pvary` casts that tracing
    inside would add: the `shard_map`s that call it run with `check_vma=False` (their
    replicated outputs come out of `psum`/`pmin`).
    """

    jaxpr: Any = eqx.field(static=True)
    out_tree: Any = eqx.field(static=True)
    consts: tuple[Any, ...]

    def __init__(self, fn: Callable, *example_args: Any):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*example_args)
        self.jaxpr = closed.jaxpr
        self.out_tree = jtu.tree_structure(out_shape)
        self.consts = tuple(closed.consts)

    def __call__(self, state, x):
        flat = jax.core.eval_jaxpr(
            self.jaxpr, self.consts, *jtu.tree_leaves((state, x))
        )
        return jtu.tree_unflatten(self.out_tree, flat)


def _index(xs: PyTree, t: Int[Array, ""] | int) -> PyTree:
    return jtu.tree_map(lambda a: a[t], xs)


def _incoming(
    init: Float[Array, " d"], states: Float[Array, "C d"], axis_name: str, count: int
) -> Float[Array, " d"]:
    """The state before this device's chunk: the previous device's last, or `s_0`."""
    before = jax.lax.ppermute(
        states[-1], axis_name, [(i, i + 1) for i in range(count - 1)]
    )
    return jnp.where(jax.lax.axis_index(axis_name) == 0, init, before)


class _Chunk(eqx.Module):
    """One device's view of the time axis, inside `shard_map`: the loop's reductions
    over time, through collectives."""

    length: int = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)
    count: int = eqx.field(static=True)

    @property
    def chunk(self) -> int:
        return self.length // self.count

    @property
    def index(self) -> Int[Array, " C"]:
        first = jax.lax.axis_index(self.axis_name).astype(jnp.int32) * self.chunk
        return first + jnp.arange(self.chunk, dtype=jnp.int32)

    def merit(self, residual, mask=None):
        squares = jnp.sum(residual**2, axis=-1)
        if mask is not None:
            squares = jnp.where(mask, squares, 0)
        local = 0.5 * jnp.sum(squares)
        local = jnp.where(jnp.isfinite(local), local, jnp.inf)
        return jax.lax.psum(local, self.axis_name)

    def first_false(self, ok: Bool[Array, " C"]) -> Int[Array, ""]:
        local = first_false(ok)
        first = jnp.where(local < self.chunk, self.index[0] + local, self.length)
        return jax.lax.pmin(first.astype(jnp.int32), self.axis_name)

    def total(self, x):
        return jax.lax.psum(x, self.axis_name)

    def all(self, ok):
        failures = (~jnp.all(ok)).astype(jnp.int32)
        return jax.lax.psum(failures, self.axis_name) == 0

    def state_at(self, init, states, t):
        local = t - 1 - self.index[0]
        mine = (local >= 0) & (local < self.chunk)
        value = jnp.where(mine, states[jnp.clip(local, 0, self.chunk - 1)], 0)
        value = jax.lax.psum(value, self.axis_name)
        return jnp.where(t == 0, init, value)

    def previous(self, init, states):
        first = _incoming(init, states, self.axis_name, self.count)
        return jnp.concatenate([first[None], states[:-1]])

    def solve(self, transition, b):
        return chunk_solve(transition, b, self.axis_name, self.count)

    def complete(self, step, init, xs, states, start):
        """The exact sequential fallback from step `start`, chunk by chunk: in round
        `r` device `r` steps through its chunk from the state the previous device
        finished with (one `ppermute` of `d` numbers per round); the others wait.
        Zero rounds when `start = T`."""
        chunk = self.chunk
        index = jax.lax.axis_index(self.axis_name)
        step = sequential_form(step)

        def round_body(carry):
            r, states = carry
            incoming = _incoming(init, states, self.axis_name, self.count)
            begin = jnp.where(
                index == r, jnp.clip(start - index * chunk, 0, chunk), chunk
            )

            # The previous state is carried, not read back from the buffer being
            # written (which makes XLA:CPU copy it; see `partime._fallback`).
            def step_body(carry):
                t, prev, states = carry
                new = step(prev, _index(xs, t))
                return t + 1, new, states.at[t].set(new)

            prev = jnp.where(
                begin == 0, incoming, states[jnp.clip(begin - 1, 0, chunk - 1)]
            )
            _, _, states = jax.lax.while_loop(
                lambda carry: carry[0] < chunk, step_body, (begin, prev, states)
            )
            return r + 1, states

        _, states = jax.lax.while_loop(
            lambda carry: carry[0] < self.count, round_body, (start // chunk, states)
        )
        return states


class Sharded(AbstractLayout):
    """The time axis split over the devices of mesh axis `axis_name`."""

    length: int = eqx.field(static=True)
    mesh: Mesh = eqx.field(static=True)
    axis_name: str = eqx.field(static=True)

    def __init__(self, length: int, mesh: Mesh, axis_name: str | None = None):
        self.axis_name, count = time_axis(mesh, axis_name)
        if length % count != 0:
            raise ValueError(
                f"The sequence length {length} is not a multiple of the {count} "
                f"devices on mesh axis {self.axis_name!r}: every device holds an "
                "equal chunk of the time axis. Choose a length (or a number of "
                "devices) that divides evenly."
            )
        self.length = length
        self.mesh = mesh

    @property
    def _count(self) -> int:
        return self.mesh.shape[self.axis_name]

    def check(self, method):
        if isinstance(method, AbstractDampedMethod):
            raise ValueError(
                f"{type(method).__name__} is a damped method, whose Kalman smoother "
                "is not sharded: it cannot run on a mesh. Use an undamped method "
                "(`partime.Newton()` keeps its trust region in time on a mesh), or "
                "solve on one device."
            )

    def close(self, fn, init, x0):
        return _ClosedStep(fn, init, x0)

    def _map(self, fn, num_args, out_specs):
        time, replicated = PartitionSpec(self.axis_name), PartitionSpec()
        return filter_shard_map(
            fn,
            self.mesh,
            in_specs=(replicated, replicated) + (time,) * (num_args - 2),
            out_specs=out_specs,
            check_vma=False,
        )

    def forward(self, step, init, xs, guess, scale, method, give_up):
        del scale
        chunk = _Chunk(self.length, self.axis_name, self._count)

        def solve(step, replicated, xs, guess):
            init, give_up = replicated
            states, stats = iterate(
                step, init, xs, guess, method, chunk, give_up=give_up
            )
            # Only arrays leave `shard_map`: the static part is put back outside.
            return states, eqx.filter(stats, eqx.is_array)

        time = PartitionSpec(self.axis_name)
        solve = self._map(solve, 4, (time, PartitionSpec()))
        return solve(step, (init, give_up), xs, guess)

    def tangent_solve(self, step, init, xs, states, tangents, method):
        # Dense Jacobians for every method: the cross-device scan solves once, exactly.
        del method
        chunk = _Chunk(self.length, self.axis_name, self._count)
        time = PartitionSpec(self.axis_name)
        # Right-hand side: how f_t moves with (s_0, x_t, θ) at the solution, the
        # previous states held fixed; every device differentiates its own chunk. (For
        # reverse mode JAX transposes this `shard_map`: the replicated `s_0` and `θ`
        # get their cotangents by one `psum`.) No `stop_gradient`: second
        # derivatives must see how the solution and the Jacobians move.
        values = self._map(
            lambda step, init, xs, states: jax.vmap(step)(
                chunk.previous(init, states), xs
            ),
            4,
            time,
        )
        jacobians = self._map(
            lambda step, init, xs, states: jax.vmap(jax.jacfwd(step))(
                chunk.previous(init, states), xs
            ),
            4,
            time,
        )
        primals = (step, init, xs)
        tangents = jtu.tree_map(
            zeros_for_none, primals, tangents, is_leaf=lambda x: x is None
        )
        _, rhs = eqx.filter_jvp(
            lambda step, init, xs: values(step, init, xs, states), primals, tangents
        )
        # JAX transposes this solve itself (as on one device, lineax's transpose
        # rule is avoided), into a `shard_map` that communicates as little.
        return sharded_solve(
            DenseTransition(jacobians(step, init, xs, states)),
            rhs,
            mesh=self.mesh,
            axis_name=self.axis_name,
        )

    def previous(self, init, states):
        return previous_states(init, states, mesh=self.mesh, axis_name=self.axis_name)


def previous_states(
    init: Float[Array, " d"],
    states: Float[Array, "T d"],
    *,
    mesh: Mesh,
    axis_name: str | None = None,
) -> Float[Array, "T d"]:
    """`s_0, ..., s_{T-1}` from `init = s_0` and `states = s_1..s_T`, sharded over
    time like `states`: each device receives only the state before its chunk from its
    neighbour (`d` numbers), where `jnp.concatenate([init[None], states[:-1]])` on a
    sharded array would leave the layout to the compiler."""
    axis_name, count = time_axis(mesh, axis_name)
    time = PartitionSpec(axis_name)
    shift = filter_shard_map(
        lambda init, states: jnp.concatenate(
            [_incoming(init, states, axis_name, count)[None], states[:-1]]
        ),
        mesh,
        in_specs=(PartitionSpec(), time),
        out_specs=time,
    )
    return shift(init, states)
