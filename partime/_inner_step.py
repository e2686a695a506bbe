"""One inner step of a `partime.ParallelSolver` window as a map on flat states, and
the first iterate of a window's iteration."""

import dataclasses
import functools
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np

from ._lu import PortableLU
from ._window_interpolation import grid_time


def with_bounded_scan(solver: diffrax.AbstractSolver) -> diffrax.AbstractSolver:
    """diffrax's Runge--Kutta and SRK solvers run their stages through a checkpointed
    `custom_vjp` loop by default, which `jax.jacfwd` and our implicit JVP cannot pass;
    `scan_kind="lax"` (a `lax.while_loop`) passes forward mode but cannot be transposed,
    which reverse mode does to our JVP rule. `"bounded"` supports both, as for
    diffrax's own `DirectAdjoint` (SRK solvers: `"lax"`, see below)."""
    # `type(...)`, not `isinstance`: diffrax forwards `isinstance` through wrappers.
    if issubclass(type(solver), diffrax.AbstractWrappedSolver):
        return eqx.tree_at(lambda s: s.solver, solver, with_bounded_scan(solver.solver))
    if issubclass(type(solver), diffrax.AbstractRungeKutta):
        return eqx.tree_at(
            lambda s: s.scan_kind, solver, "bounded", is_leaf=lambda x: x is None
        )
    if issubclass(type(solver), diffrax.AbstractSRK):
        # SRK stages run through `equinox.internal.scan`, which has no "bounded"
        # kind; its "lax" kind is a `lax.scan`, which passes both modes.
        solver = eqx.tree_at(
            lambda s: s.scan_kind, solver, "lax", is_leaf=lambda x: x is None
        )
        return _every_stage(solver)
    return solver


@functools.cache
def _every_stage_cls(cls: type) -> type:
    tableau = dataclasses.replace(cls.tableau, ignore_stage_f=None, ignore_stage_g=None)
    return type(cls.__name__, (cls,), {"tableau": tableau, "__module__": __name__})


def _every_stage(solver: diffrax.AbstractSRK) -> diffrax.AbstractSRK:
    """An SRK solver whose tableau skips stages (`ignore_stage_f`/`_g`: `SlowRK`,
    `GeneralShARK`) as one that evaluates them all: the same numbers (their
    coefficients are zero), without diffrax's `nonbatchable` stage test. Under
    `jax.vmap` the window's `lax.cond`s batch every array of the step, and that test
    then raised "Unexpected batch tracer"."""
    tableau = type(solver).tableau
    if tableau.ignore_stage_f is None and tableau.ignore_stage_g is None:
        return solver
    new = object.__new__(_every_stage_cls(type(solver)))
    for field in dataclasses.fields(solver):
        object.__setattr__(new, field.name, getattr(solver, field.name))
    return new


def with_portable_lu(solver: diffrax.AbstractSolver) -> diffrax.AbstractSolver:
    """An implicit inner solver whose root finder factorises with LU (lineax's
    default for its square Jacobians) gets `PortableLU` instead: batched LAPACK
    LU over the inner steps can deadlock XLA:CPU (see `_lu.py`). Root finders with
    another linear solver are left alone."""
    # `type(...)`, not `isinstance`: diffrax forwards `isinstance` through wrappers.
    if issubclass(type(solver), diffrax.AbstractWrappedSolver):
        return eqx.tree_at(lambda s: s.solver, solver, with_portable_lu(solver.solver))
    if not issubclass(type(solver), diffrax.AbstractImplicitSolver):
        return solver
    linear_solver = getattr(solver.root_finder, "linear_solver", None)
    uses_lu = isinstance(linear_solver, lx.LU) or (
        isinstance(linear_solver, lx.AutoLinearSolver)
        and linear_solver.well_posed is not False
    )
    if not uses_lu:
        return solver
    return eqx.tree_at(lambda s: s.root_finder.linear_solver, solver, PortableLU())


def is_butcher_erk(solver) -> bool:
    # `type(...)`, not `isinstance`: diffrax forwards `isinstance` through wrappers.
    return issubclass(type(solver), diffrax.AbstractERK) and isinstance(
        solver.tableau, diffrax.ButcherTableau
    )


def _erk_stages(solver, make_terms, args, flattener, num_stages, straight=False):
    """The first `num_stages` stage increments `k_i` (flat, stacked on a leading
    axis) of an explicit Runge--Kutta step, from the solver's (public) Butcher
    tableau: `(y_flat, x) -> ks`. The stages run in a `lax.scan` over the rows of
    the tableau, so that the program holds one copy of the vector field per use of
    the step rather than one per stage (XLA:CPU's compile time grows with every
    copy); forward and reverse mode pass it. Each stage is a `jax.checkpoint`: reverse
    mode keeps the stages' inputs and recomputes the vector field's intermediates,
    which a scan would otherwise store for every stage at once (twice the gradient's
    memory on the neural ODE of `benchmarks/ode.py`).

    `straight=True`: the stages as straight-line code instead, for a step taken one
    at a time in a loop (the sequential fallback; the coarse pass, only `√T` steps,
    keeps the scan: one copy of the vector field fewer to compile). There the stage
    loop costs more than the stages: on Lorenz-63 (2·10⁴ Tsit5 steps, XLA:CPU) the
    fallback took 4–5× sequential diffrax's time with the scan, 0.8× without (unrolling
    the scan does not help)."""
    ravel, unravel = flattener.ravel, flattener.unravel
    tableau = solver.tableau
    # Row `i`: the coefficients of `k_0..k_{i-1}` in stage `i`'s state.
    lower = np.zeros((num_stages, num_stages))
    for i in range(1, num_stages):
        lower[i, :i] = tableau.a_lower[i - 1]
    nodes = np.concatenate([[0.0], np.asarray(tableau.c)])[:num_stages]

    def stages(y_flat, x):
        ta, tb, increments = x
        terms = make_terms(increments)
        control = terms.contr(ta, tb)
        time_dtype = jnp.result_type(ta, tb)

        def stage(ks, inputs):
            coefficients, ti, current = inputs
            # As diffrax's stages: a product with all of `ks` (zeros not yet filled).
            yi = y_flat + jnp.tensordot(
                coefficients, ks, axes=1, precision=jax.lax.Precision.HIGHEST
            )
            k = ravel(terms.vf_prod(ti, unravel(yi), args, control))
            return jnp.where(current, k, ks), None

        if straight:
            ks = []
            for i, ci in enumerate(nodes.tolist()):
                ti = tb if ci == 1 else ta + ci * (tb - ta)
                yi = _combine(y_flat, lower[i, :i].tolist(), ks)
                ks.append(ravel(terms.vf_prod(ti, unravel(yi), args, control)))
            return jnp.stack(ks)

        c = jnp.asarray(nodes, time_dtype)
        times = jnp.where(c == 1, tb, ta + c * (tb - ta))
        inputs = (
            jnp.asarray(lower, y_flat.dtype),
            times,
            np.eye(num_stages, dtype=bool)[..., None],
        )
        ks = jnp.zeros((num_stages, *y_flat.shape), y_flat.dtype)
        return jax.lax.scan(jax.checkpoint(stage), ks, inputs)[0]

    return stages


def _combine(y_flat, coefficients, ks):
    """`y + Σ_i c_i k_i` over the nonzero coefficients."""
    terms_ = [c * ks[i] for i, c in enumerate(coefficients) if c != 0]
    return y_flat + sum(terms_[1:], terms_[0]) if terms_ else y_flat


def _diffrax_step(solver, make_terms, args, unravel) -> Callable:
    """diffrax's `init` + `step` for one inner step `x_k = (t_{k-1}, t_k,
    increments_k)` from a flat state: `(y_k, y_error, dense_info, solver_state,
    result)`."""

    def step(y_flat, x):
        ta, tb, increments = x
        terms = make_terms(increments)
        y = unravel(y_flat)
        state = solver.init(terms, ta, tb, y, args)
        return solver.step(terms, ta, tb, y, args, state, made_jump=False)

    return step


def flat_step(solver, make_terms, args, flattener, straight=False) -> Callable:
    """One inner step `(y_{k-1}, x_k) -> y_k` on flat states: the map whose iterates
    the fixed-point solve looks for. `x_k = (t_{k-1}, t_k, increments_k)`, and
    `make_terms(increments_k)` gives the terms of that inner step (see
    `StoredIncrementTerm`); `flattener` maps states to flat vectors and back.

    Explicit Runge--Kutta steps are evaluated here from the solver's (public) Butcher
    tableau (`_erk_stages`: a `lax.scan` over the stages that `jax.jacfwd` and reverse
    mode pass, where diffrax's `step` runs a checkpointed loop that `jax.jacfwd`
    cannot); and the stages that do not enter
    `y_k` (the first-same-as-last stage of Tsit5, Dopri5, ...; only the error estimate
    and dense output use it) are skipped. Other solvers take their own `init` + `step`
    per inner step. The error estimates and dense output come from `step_outputs`, at
    the converged states. `straight`: for a step taken one at a time (see
    `_erk_stages`).
    """
    ravel, unravel = flattener.ravel, flattener.unravel
    if not is_butcher_erk(solver):
        with_info = step_with_info(solver, make_terms, args, flattener)
        return lambda y_flat, x: with_info(y_flat, x)[0]

    b_sol = np.asarray(solver.tableau.b_sol)
    num_stages = int(np.flatnonzero(b_sol)[-1]) + 1
    stages = _erk_stages(solver, make_terms, args, flattener, num_stages, straight)

    def erk_step(y_flat, x):
        ks = stages(y_flat, x)
        # Rounded to the state's dtype where that is narrower, as diffrax's step is.
        return ravel(unravel(_combine(y_flat, b_sol.tolist(), ks)))

    return erk_step


def step_outputs(solver, make_terms, args, flattener) -> Callable:
    """What an inner step gives besides its end state, at a known end state:
    `(y_{k-1}, y_k, x_k) -> (y_error, dense_info, result)`, as diffrax's `step`
    returns them. Explicit Runge--Kutta steps evaluate every stage of the tableau
    (the first-same-as-last one included: the dense output uses it) as `flat_step`
    does, in the shapes of diffrax's own dense info (`y0`, `y1`, `k` with the stages
    on a leading axis); other solvers run diffrax's `init` + `step`."""
    unravel = flattener.unravel
    if not is_butcher_erk(solver):
        step = _diffrax_step(solver, make_terms, args, unravel)

        def diffrax_outputs(y_flat, y1_flat, x):
            del y1_flat
            _, y_error, info, _, result = step(y_flat, x)
            return y_error, info, result

        return diffrax_outputs

    tableau = solver.tableau
    num_stages = len(tableau.c) + 1
    stages = _erk_stages(solver, make_terms, args, flattener, num_stages)
    b_error = np.asarray(tableau.b_error).tolist()

    def erk_outputs(y_flat, y1_flat, x):
        ks = stages(y_flat, x)
        zero = jnp.zeros_like(y_flat)
        y_error = unravel(_combine(zero, b_error, ks))
        k = jax.vmap(unravel)(ks)
        info = dict(y0=unravel(y_flat), y1=unravel(y1_flat), k=k)
        return y_error, info, diffrax.RESULTS.successful

    return erk_outputs


def coarse_guess(interpolation_cls, ravel, infos, ts, coarse_ts):
    """A first iterate for a window: the dense output of `coarse_pass` over the
    long steps `coarse_ts`, read off at the inner grid `ts`."""
    num_coarse = len(coarse_ts) - 1
    # Few coarse steps: one comparison of every pair is a single fused reduction,
    # where the default binary search is a loop (more kernels to compile).
    small = len(coarse_ts) * len(ts) <= 2**22
    index = jnp.searchsorted(
        coarse_ts, ts[1:], side="left", method="compare_all" if small else "sort"
    )
    index = index - 1
    index = jnp.clip(index, 0, num_coarse - 1)

    def evaluate(t, i):
        info = jtu.tree_map(lambda x: x[i], infos)
        local = interpolation_cls(t0=coarse_ts[i], t1=coarse_ts[i + 1], **info)
        return ravel(local.evaluate(t))

    return jax.vmap(evaluate)(ts[1:], index)


def no_gradient(tree):
    """`tree` with a `stop_gradient` on every floating-point array: for the first
    guess, through which no gradient flows, so that none of it is differentiated."""
    return jtu.tree_map(
        lambda x: jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, tree
    )


def step_with_info(solver, make_terms, args, flattener) -> Callable:
    """One inner step and its dense info: `(y_{k-1}, x_k) -> (y_k, dense_info)`,
    `y_k` as `flat_step` computes it. Explicit Runge--Kutta steps evaluate every
    stage (as `step_outputs`); other solvers run diffrax's
    `init` + `step`."""
    ravel, unravel = flattener.ravel, flattener.unravel
    if not is_butcher_erk(solver):
        step = _diffrax_step(solver, make_terms, args, unravel)

        def diffrax_step(y_flat, x):
            y1, _, info, _, _ = step(y_flat, x)
            return ravel(y1), info

        return diffrax_step

    tableau = solver.tableau
    b_sol = np.asarray(tableau.b_sol)
    num_stages = int(np.flatnonzero(b_sol)[-1]) + 1
    stages = _erk_stages(solver, make_terms, args, flattener, len(tableau.c) + 1)

    def erk_step(y_flat, x):
        ks = stages(y_flat, x)
        y1 = ravel(unravel(_combine(y_flat, b_sol.tolist(), ks[:num_stages])))
        k = jax.vmap(unravel)(ks)
        return y1, dict(y0=unravel(y_flat), y1=unravel(y1), k=k)

    return erk_step


def coarse_pass(step, y0_flat, t0, t1, counts, threshold, resolved):
    """The inner solver stepped sequentially over `counts[0]` long steps spanning
    the window `[t0, t1]` (a parareal-style predictor of the window): their dense
    infos; and along the way, the log-growth of a perturbation over the window,
    `Σ log ‖J v‖` for a fixed unit vector `v` renormalised after every step, whose
    rate is the largest Lyapunov exponent along the pass. `step(y_flat, (ta, tb))`
    is one long step, returning `(y_flat, dense_info)` (`step_with_info`);
    `counts` are the numbers of equal steps of the grids to try, from coarse to
    fine. Returns `(infos, growth)`.

    A long step beyond the solver's stability region makes perturbations grow
    too (or overflow), as chaos does; unlike chaos, that growth changes when the
    step is refined. So the passes go on to the next grid while the growth is not
    finite or above `threshold` and not yet confirmed by the previous grid (within
    a third: finite-time growths along chaotic trajectories differ by some 25%
    between grids, an unstable step's by more). Unstable grids can agree too (the
    pendulum over 100 time units in 20 and 40 steps: `e^116` and `e^124`, where a
    resolving grid shows `e^0.2`), so a grid confirms only if it resolves the
    dynamics: no step of it grows the perturbation more than `e^resolved`-fold (a
    step that does is beyond an explicit solver's accurate range, `|h λ| ≲ 1`).
    The estimate is that of the first grid whose growth is at most `threshold`, or
    of the second of two consecutive resolving grids that agree above it, or of
    the finest: one pass where the coarse one is stable and shows no chaos. NaN if
    no pass is finite. The dense infos are those
    of the first (coarsest) pass. One loop over the grids, the prediction and the
    perturbation in the same pass, so that the program holds one copy of the step.
    No gradient flows through it.
    """
    y0_flat = jax.lax.stop_gradient(y0_flat)
    dtype = y0_flat.dtype
    t0, t1 = jnp.asarray(t0), jnp.asarray(t1)
    time_dtype = jnp.result_type(t0, t1)
    num_coarse = counts[0]
    counts = jnp.asarray(counts, jnp.int32)
    # A fixed direction (deterministic), unlikely to be orthogonal to the growing
    # one; drawn by numpy at trace time: a constant of the program, neither a
    # random-number kernel nor small programs compiled to draw it.
    rng = np.random.default_rng(0)
    v0 = rng.standard_normal(y0_flat.shape)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        v0 = v0 + 1j * rng.standard_normal(y0_flat.shape)
    v0 = jnp.asarray(v0 / np.linalg.norm(v0), dtype)
    info_shapes = jax.eval_shape(lambda y: step(y, (t0, t1))[1], y0_flat)
    no_infos = jtu.tree_map(
        lambda s: jnp.zeros((num_coarse, *s.shape), s.dtype), info_shapes
    )

    def time(i, n):
        # As `inner_grid(t0, t1, n)[i]`, bit for bit: the coarse pass's dense infos
        # are read off on that grid.
        fraction = i.astype(time_dtype) / n.astype(time_dtype)
        return jnp.where(i == n, t1, grid_time(t0, t1, fraction))

    def pass_over(level, infos):
        n = counts[level]
        # The dense infos are kept on the first pass only (elsewhere: dropped).
        first = level == 0

        def body(i, carry):
            y_flat, v, growth, largest, infos = carry
            x = (time(i, n), time(i + 1, n))
            (y1, info), (v1, _) = jax.jvp(lambda y: step(y, x), (y_flat,), (v,))
            slot = jnp.where(first, i, num_coarse)
            infos = jtu.tree_map(
                lambda buffer, new: buffer.at[slot].set(new, mode="drop"), infos, info
            )
            norm = jnp.linalg.norm(v1)
            v1 = v1 / jnp.where(norm > 0, norm, 1)
            # `maximum` keeps a NaN: a step that is not finite resolves nothing.
            largest = jnp.maximum(largest, jnp.log(norm))
            return y1, v1, growth + jnp.log(norm), largest, infos

        zero = jnp.zeros((), dtype)
        start = (y0_flat, v0, zero, jnp.asarray(-jnp.inf, dtype), infos)
        _, _, growth, largest, infos = jax.lax.fori_loop(0, n, body, start)
        growth = jnp.where(jnp.isfinite(growth), growth, jnp.nan)
        return growth, largest <= resolved, infos

    def refine(carry):
        level, previous, previous_resolves, _, _, infos = carry
        growth, resolves, infos = pass_over(level, infos)
        high = ~(growth <= threshold)  # NaN included
        agree = jnp.abs(growth - previous) <= jnp.minimum(growth, previous) / 3
        confirmed = (growth > threshold) & (previous > threshold) & agree
        confirmed = confirmed & resolves & previous_resolves
        done = ~(high & ~confirmed) | (level == counts.shape[0] - 1)
        return level + 1, growth, resolves, done, growth, infos

    nan = jnp.asarray(jnp.nan, dtype)
    false = jnp.asarray(False)
    start = (jnp.asarray(0, jnp.int32), nan, false, false, nan, no_infos)
    _, _, _, _, growth, infos = jax.lax.while_loop(lambda c: ~c[3], refine, start)
    return jax.lax.stop_gradient((infos, growth))


def best_guess(flat_step, y0_flat, xs, candidates):
    """Of the constant guess `y0` and the `candidates`, the one whose largest
    residual over the window is smallest (non-finite ones never win; ties go to the
    earliest): a coarse step may be unstable where the inner step is not, and a stale
    trajectory may fit worse than the constant. One candidate after another, each
    in one vectorised pass over the window: the program holds one copy of the step,
    in the shapes of the iteration's own (whose compiled kernels it shares)."""

    flat_step, y0_flat, xs, candidates = no_gradient(
        (flat_step, y0_flat, xs, candidates)
    )

    def max_residual(guess):
        prev = jnp.concatenate([y0_flat[None], guess[:-1]])
        residual = guess - jax.vmap(flat_step)(prev, xs)
        return jnp.where(
            jnp.all(jnp.isfinite(residual)), jnp.max(jnp.abs(residual)), jnp.inf
        )

    constant = jnp.broadcast_to(y0_flat, (xs[0].shape[0],) + y0_flat.shape)
    guesses = jnp.stack([constant, *candidates])
    return guesses[jnp.argmin(jax.lax.map(max_residual, guesses))]
