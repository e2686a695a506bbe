"""[`partime.fixed_point_solve`][] with the time axis split over the devices of a mesh.

The whole iteration runs inside one `jax.shard_map`. Device `p` holds steps
`pC+1 .. (p+1)C` (`C = T / P`) of the iterate and of the inputs, and per iteration

1. receives the state before its chunk from device `p - 1` (`lax.ppermute`, `d`
    numbers; device 0 uses `s_0`);
2. linearises its chunk (`method.linearise`);
3. solves its share of the Newton system (`partime._sharding.chunk_solve`: a local
    scan, one `all_gather` of the `P` chunk summaries, `P·(d² + d)` numbers for
    Newton, and a scan over them);
4. joins one reduction over the devices (`lax.psum` of two flags: converged,
    finite) that every device's loop condition reads.

Nothing proportional to `T` crosses devices. The derivative is implicit, as in the
unsharded solve: one linear solve with the Newton operator at the solution, sharded the
same way; for reverse mode JAX transposes it into a `shard_map` that moves as little.
"""

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._fixed_point import check_inputs
from ._lds import DenseTransition
from ._method.base import AbstractMethod
from ._sharding import (
    chunk_solve,
    filter_shard_map,
    sharded_solve,
    time_axis,
)
from ._stats import RESULTS, Stats


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


def _within(x: Array, tol: Array) -> Bool[Array, " C"]:
    """Per step: every component of `|x_t| <= tol_t`. NaN compares False: not within."""
    return jnp.all(jnp.abs(x) <= tol, axis=-1)


def _incoming(
    init: Float[Array, " d"], states: Float[Array, "C d"], axis_name: str, count: int
) -> Float[Array, " d"]:
    """The state before this device's chunk: the previous device's last, or `s_0`."""
    before = jax.lax.ppermute(
        states[-1], axis_name, [(i, i + 1) for i in range(count - 1)]
    )
    return jnp.where(jax.lax.axis_index(axis_name) == 0, init, before)


def _previous(
    init: Float[Array, " d"], states: Float[Array, "C d"], axis_name: str, count: int
) -> Float[Array, "C d"]:
    """`s_{t-1}` for every step `t` of this device's chunk."""
    first = _incoming(init, states, axis_name, count)
    return jnp.concatenate([first[None], states[:-1]])


def _iterate(
    step: Callable,
    init: Array,
    xs: PyTree,
    guess: Array,
    *,
    method: AbstractMethod,
    axis_name: str,
    count: int,
    length: int,
) -> tuple[Array, Stats]:
    """One device's share of the plain (undamped, full-horizon) iteration of
    `partime._fixed_point._iterate`; call inside `shard_map`. Same iterates and
    convergence test, same exact fallback; no trust region in time and no early
    stop of hopeless cases (see `sharded_fixed_point_solve`)."""
    chunk = guess.shape[0]
    rtol, atol = method.tolerances(init.dtype)
    cap = method.iteration_cap(length)
    init_finite = jnp.all(jnp.isfinite(init))
    index = jax.lax.axis_index(axis_name)
    previous = lambda states: _previous(init, states, axis_name, count)

    def cond_fun(carry):
        it, _, converged, diverged = carry
        return (it < cap) & ~converged & ~diverged & init_finite

    def body_fun(carry):
        it, states, _, _ = carry
        f, transition = method.linearise(step, previous(states), xs)
        residual = states - f
        delta = chunk_solve(transition, -residual, axis_name, count)
        tol = atol + rtol * jnp.abs(states)
        new_states = states + delta
        local_failures = jnp.stack(
            [
                ~jnp.all(_within(delta, tol) & _within(residual, tol)),
                ~jnp.all(jnp.isfinite(new_states)),
            ]
        )
        # The iteration's one reduction: how many chunks have not converged, and how
        # many produced non-finite values. Every device reads the same answer, so the
        # loops stay in step.
        failures = jax.lax.psum(local_failures.astype(jnp.int32), axis_name)
        converged = failures[0] == 0
        finite = failures[1] == 0
        # Keep the last finite iterate, everywhere: the fallback continues from its
        # prefix.
        states = jnp.where(finite, new_states, states)
        return it + 1, states, converged & finite, ~finite

    carry = (jnp.array(0), guess, jnp.array(False), jnp.array(False))
    num_iterations, states, converged, diverged = jax.lax.while_loop(
        cond_fun, body_fun, carry
    )

    # The converged prefix: the first step, over all chunks, whose residual is out of
    # tolerance (one `pmin`). Zero trips when the iteration converged.
    def prefix_body(carry):
        f = jax.vmap(step)(previous(states), xs)
        ok = _within(states - f, atol + rtol * jnp.abs(states))
        local = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
        first_bad = jnp.where(local < chunk, index * chunk + local, length)
        return jax.lax.pmin(first_bad, axis_name), jnp.array(True)

    no_prefix_needed = converged | ~init_finite
    prefix, _ = jax.lax.while_loop(
        lambda carry: ~carry[1], prefix_body, (jnp.array(length), no_prefix_needed)
    )

    if method.fallback:
        # Exact sequential completion from the converged prefix, chunk by chunk: in
        # round `r` device `r` steps through its chunk from the state the previous
        # device finished with (one `ppermute` of `d` numbers per round); the others
        # wait. Zero rounds when the iteration converged.
        def round_body(carry):
            r, states = carry
            incoming = _incoming(init, states, axis_name, count)
            begin = jnp.where(
                index == r, jnp.clip(prefix - index * chunk, 0, chunk), chunk
            )

            def step_body(carry):
                t, states = carry
                prev = jnp.where(t == 0, incoming, states[jnp.maximum(t - 1, 0)])
                return t + 1, states.at[t].set(step(prev, _index(xs, t)))

            _, states = jax.lax.while_loop(
                lambda carry: carry[0] < chunk, step_body, (begin, states)
            )
            return r + 1, states

        _, states = jax.lax.while_loop(
            lambda carry: carry[0] < count, round_body, (prefix // chunk, states)
        )
        result = RESULTS.where(init_finite, RESULTS.successful, RESULTS.nonfinite_input)
        fallback_start = prefix
    else:
        result = RESULTS.where(
            converged,
            RESULTS.successful,
            RESULTS.where(diverged, RESULTS.diverged, RESULTS.max_iters_reached),
        )
        result = RESULTS.where(init_finite, result, RESULTS.nonfinite_input)
        fallback_start = jnp.array(length)
    stats = Stats(
        num_iterations=num_iterations,
        fallback_start=fallback_start,
        length=length,
        result=result,
    )
    # Only arrays leave `shard_map` (and a custom JVP): the static part is put back by
    # the caller.
    return states, eqx.filter(stats, eqx.is_array)


def _local_values(step, init, xs, states, *, axis_name, count):
    """`f_t(s_{t-1})` on this device's chunk."""
    return jax.vmap(step)(_previous(init, states, axis_name, count), xs)


def _local_jacobians(step, init, xs, states, *, axis_name, count):
    """`∂f_t/∂s_{t-1}` on this device's chunk."""
    return jax.vmap(jax.jacfwd(step))(_previous(init, states, axis_name, count), xs)


@eqx.filter_custom_jvp
def _solve(step, init, xs, guess, *, method, mesh, axis_name):
    count = mesh.shape[axis_name]
    time, replicated = PartitionSpec(axis_name), PartitionSpec()
    iterate = filter_shard_map(
        functools.partial(
            _iterate,
            method=method,
            axis_name=axis_name,
            count=count,
            length=guess.shape[0],
        ),
        mesh,
        in_specs=(replicated, replicated, time, time),
        out_specs=(time, replicated),
        check_vma=False,
    )
    return iterate(step, init, xs, jax.lax.stop_gradient(guess))


def _zeros_for_none(primal, tangent):
    if tangent is None and eqx.is_inexact_array(primal):
        return jnp.zeros_like(primal)
    return tangent


@_solve.def_jvp
def _solve_jvp(primals, tangents, *, method, mesh, axis_name):
    step, init, xs, guess = primals
    t_step, t_init, t_xs, _ = tangents
    states, stats = _solve(
        step, init, xs, guess, method=method, mesh=mesh, axis_name=axis_name
    )
    # No `stop_gradient` on the solution or the Jacobians: differentiating this
    # rule again (second derivatives) must see how they move.
    count = mesh.shape[axis_name]
    time, replicated = PartitionSpec(axis_name), PartitionSpec()
    local = lambda fn: filter_shard_map(
        functools.partial(fn, axis_name=axis_name, count=count),
        mesh,
        in_specs=(replicated, replicated, time, time),
        out_specs=time,
        check_vma=False,
    )

    # Right-hand side: how f_t moves with (s_0, x_t, θ) at the solution, the previous
    # states held fixed; every device differentiates its own chunk. (For reverse mode
    # JAX transposes this `shard_map`: the replicated `s_0` and `θ` get their
    # cotangents by one `psum`.)
    def evaluate(step, init, xs):
        return local(_local_values)(step, init, xs, states)

    primals_in = (step, init, xs)
    tangents_in = jtu.tree_map(
        _zeros_for_none, primals_in, (t_step, t_init, t_xs), is_leaf=lambda x: x is None
    )
    _, rhs = eqx.filter_jvp(evaluate, primals_in, tangents_in)
    jacobians = local(_local_jacobians)(step, init, xs, states)
    # The Newton system at the solution, solved across devices. Not through lineax
    # with `ShardedScanSolver`: lineax's transpose rule always runs its error check,
    # a host callback on the solution, and the compiler gathers a sharded solution
    # onto one device for it. JAX transposes this solve itself, into a `shard_map`
    # that communicates as little (a `psum_scatter` of the chunk summaries).
    t_states = sharded_solve(
        DenseTransition(jacobians),
        rhs,
        mesh=mesh,
        axis_name=axis_name,
    )
    t_stats = jtu.tree_map(lambda _: None, stats)
    return (states, stats), (t_states, t_stats)


def sharded_fixed_point_solve(
    step: Callable[[Float[Array, " d"], PyTree[Any]], Float[Array, " d"]],
    init: Float[Array, " d"],
    xs: PyTree[Any],
    method: AbstractMethod,
    *,
    mesh: Mesh,
    axis_name: str | None = None,
    length: int | None = None,
    guess: Float[Array, "T d"] | None = None,
) -> tuple[Float[Array, "T d"], Stats]:
    """[`partime.fixed_point_solve`][] with the time axis split over the devices of
    one axis of a mesh.

    Device `p` of `P` holds steps `pT/P + 1 .. (p+1)T/P` of the states, the inputs
    and (for Newton) the Jacobians, so memory per device falls like `1/P`. Per
    iteration the devices exchange only `O(P·(d² + d))` numbers (each chunk's affine
    summary), never `O(T·d)`. The iterates, the convergence test, the exact
    sequential fallback and the implicit derivatives are those of the unsharded
    solve, and the results agree with it to rounding. The one-device solve's
    safeguards that need global bookkeeping every iteration — the trust region in
    time, the damped methods' merit test and the early stop of hopeless cases — are
    not (yet) sharded: here the iteration runs until it converges, produces a
    non-finite value, or reaches the cap, and then falls back. So on a problem the
    one-device solve gives up on early, this one may spend more iterations (and
    vice versa), with the same exact answer.

    **Arguments:**

    - `step`, `init`, `xs`, `method`, `length`, `guess`: as for
        [`partime.fixed_point_solve`][]. `T` must be a multiple of the number of
        devices on the time axis.
    - `mesh`: a `jax.sharding.Mesh` with `Auto` axes, e.g.
        `jax.make_mesh((8,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))`.
    - `axis_name`: the mesh axis that splits time; may be omitted on a 1-D mesh. Along
        any other axis of the mesh the computation is replicated.

    **Returns:** `(states, stats)` as for [`partime.fixed_point_solve`][]; `states` is
    sharded over `axis_name`.

    The exact sequential fallback, when the iteration does not converge, runs chunk
    by chunk — device `p` steps through its chunk while the others wait — and moves
    one state (`d` numbers) between neighbours per chunk: its cost is that of
    `T - fallback_start` sequential steps, with no gathering of the sequence.

    The mesh's axes must be `Auto` (not `jax.make_mesh`'s default, `Explicit`):
    `step` is traced once and replayed on every device, which explicit sharding does
    not allow.
    """
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be a partime method (e.g. `partime.Newton()`), got "
            f"{method!r}."
        )
    axis_name, count = time_axis(mesh, axis_name)
    init, length, guess = check_inputs(step, init, xs, length, guess)
    if length % count != 0:
        raise ValueError(
            f"The sequence length {length} is not a multiple of the {count} devices "
            f"on mesh axis {axis_name!r}: every device holds an equal chunk of the "
            "time axis. Choose a length (or a number of devices) that divides evenly."
        )
    if guess is None:
        guess = jnp.broadcast_to(init, (length, init.shape[0]))
    x0 = _index(xs, 0)
    closed = _ClosedStep(lambda s, x: step(s, x).astype(init.dtype), init, x0)
    states, dynamic_stats = _solve(
        closed, init, xs, guess, method=method, mesh=mesh, axis_name=axis_name
    )
    skeleton = Stats(
        num_iterations=jnp.array(0),
        fallback_start=jnp.array(0),
        length=length,
        result=RESULTS.successful,
    )
    return states, eqx.combine(dynamic_stats, skeleton)


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
        functools.partial(_previous, axis_name=axis_name, count=count),
        mesh,
        in_specs=(PartitionSpec(), time),
        out_specs=time,
    )
    return shift(init, states)
