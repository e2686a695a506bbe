import functools
import math
import sys
import types
from collections.abc import Callable
from typing import Any, Literal

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

# Private: `use_stepsize_tol` only to recognise an implicit inner solver whose
# root-finder tolerances were left to a step size controller and never filled in;
# `AdjointTerm` only to reject `BacksolveAdjoint`.
from diffrax._root_finder import use_stepsize_tol
from diffrax._term import AdjointTerm
from equinox.internal import unvmap_all
from jax.sharding import Mesh
from jaxtyping import Array, Float, Int, PyTree

from ._brownian_increments import interpolated_terms, store_increments
from ._fallback import SequentialForm
from ._fixed_point import fixed_point_solve, previous
from ._flatten import Flattener
from ._inner_step import (
    best_guess,
    coarse_guess,
    coarse_pass,
    flat_step as make_flat_step,
    is_butcher_erk,
    no_gradient,
    step_outputs,
    step_with_info,
    with_bounded_scan,
    with_portable_lu,
)
from ._method.base import AbstractMethod
from ._method.newton import Newton
from ._misc import as_count, batch_where
from ._window_interpolation import inner_grid, window_interpolation_cls


class ParallelSolverState(eqx.Module):
    """Statistics of a [`partime.ParallelSolver`][] solve, carried as its solver state.

    Retrieve them with `diffrax.SaveAt(..., solver_state=True)`, as `sol.solver_state`.
    Both counters cover the *accepted* windows only: diffrax rolls the solver state back
    when an adaptive step size controller rejects a window.

    **Attributes:**

    - `num_iterations`: total fixed-point iterations over all accepted windows.
    - `num_fallbacks`: number of accepted windows whose fixed-point iteration did not
        converge within its cap and was finished by the exact sequential fallback
        (including windows given to it at once as chaotic).
    - `num_sequential_steps`: the inner steps that fallback computed, over all
        accepted windows (each window's from its converged prefix on).
    - `window`: the fewest inner steps solved together in an accepted window
        ([`partime.Stats`][]`.window`): `num_steps` for the whole window, `W` for a
        sliding window, and for the automatic window the width it ended at — it
        then works as a sliding window of that many inner steps. The narrowest over
        the windows, as the width that worked everywhere: `num_steps` before the
        first window.
    - `lyapunov`: an estimate of the largest Lyapunov exponent per unit time, over
        the last accepted window: from the growth of a perturbation carried along
        the coarse pass, or without one (`coarse_steps=0`) from the step Jacobians
        at the iterate (`partime.Stats.lyapunov`). NaN before the first window,
        and when neither is available. `lyapunov · (t1 - t0)` above a few units
        means chaos over the window.
    - `first_window`: `None`, except in a `diffeqsolve(..., max_steps=1)`: the one
        window, solved by `init` and read off by the step (see "Gradients" in
        [`partime.ParallelSolver`][]).
    """

    num_iterations: Int[Array, ""]
    num_fallbacks: Int[Array, ""]
    lyapunov: Float[Array, ""]
    num_sequential_steps: Int[Array, ""]
    window: Int[Array, ""]
    first_window: "_FirstWindow | None" = None


class _FirstWindow(eqx.Module):
    """A window solved by `ParallelSolver.init`, for `diffeqsolve` to read off in its
    only step (see `_one_step`): the step's outputs and statistics, for the window
    from `t0` to `t1`, and whether they are still to be read."""

    t0: Any
    t1: Any
    y1: PyTree
    y_error: PyTree
    dense_info: dict[str, PyTree]
    stats: ParallelSolverState
    result: Any
    pending: Array


def _is_count(value: Any, minimum: int) -> bool:
    """Whether `value` is a Python `int` (not a `bool`) of at least `minimum`."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


# A window is handed to the exact sequential fallback at once when a perturbation
# grows more than `e^{_CHAOTIC}`-fold (about 3000-fold) along its coarse pass
# (`λ·(t1 - t0)` above it). Chosen from the convergence study: of the windows on
# which Newton converged (pendulum, also near its separatrix, damped pendulum, van
# der Pol, Lorenz-63 over up to 5 time units) none grew more than `e^6`; over 20
# time units Lorenz-63 grows `e^9` to `e^10` and Newton falls back after 8
# wasted iterations (from a constant guess).
_CHAOTIC = 8.0
# ... confirmed on two step grids that agree and resolve the dynamics: none of
# whose steps grows the perturbation more than `e^{_RESOLVED}`-fold. In the study,
# steps that resolve (pendulum, damped pendulum, Lorenz-63 from 284 steps over 20
# time units) grow it at most `e^0.93`-fold; the pendulum's unstable 2.5 to 10
# time-unit steps at least `e^5.7`-fold.
_RESOLVED = 2.0


_BACKSOLVE_MESSAGE = (
    "`partime.ParallelSolver` does not support "
    "`adjoint=diffrax.BacksolveAdjoint()`: its backward solve would "
    "run over an augmented state holding every parameter, making each "
    "window's Jacobians huge. Use the default "
    "`diffrax.RecursiveCheckpointAdjoint()`, or "
    "`diffrax.DirectAdjoint()` or `diffrax.ForwardMode()`: all three "
    "differentiate each window implicitly, in parallel over time."
)


def _check_terms(terms) -> None:
    is_special = lambda x: isinstance(x, AdjointTerm)
    for leaf in jtu.tree_leaves(terms, is_leaf=is_special):
        if isinstance(leaf, AdjointTerm):
            raise ValueError(_BACKSOLVE_MESSAGE)


def _check_not_backsolve() -> None:
    """Refuses `BacksolveAdjoint` before the forward solve runs. diffrax passes the
    adjoint to no solver method, and its forward pass steps the user's own terms; but
    `diffeqsolve` calls the solver's `init` itself, at trace time, with the adjoint
    among its local variables. (`_check_terms` still catches the backward pass's
    `AdjointTerm`, should the call come from elsewhere.)"""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "diffeqsolve" and isinstance(
            frame.f_locals.get("adjoint"), diffrax.BacksolveAdjoint
        ):
            raise ValueError(_BACKSOLVE_MESSAGE)
        frame = frame.f_back


def _diffeqsolve_locals() -> dict[str, Any] | None:
    """The local variables of the innermost `diffeqsolve` on the call stack (`None`
    outside one)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "diffeqsolve" and "max_steps" in frame.f_locals:
            return frame.f_locals
        frame = frame.f_back
    return None


class _OneStep(eqx.Module):
    """How `init` solves the only window of a `diffeqsolve(..., max_steps=1)`."""

    interpolated: bool = eqx.field(static=True)


def _one_step() -> _OneStep | None:
    """Whether the `diffeqsolve` calling `init` takes one step at most
    (`max_steps=1`), so that its only step is the window `init` is given; and then
    whether that window's interpolation is evaluated (`SaveAt(ts=...)`,
    `SaveAt(dense=True)`, an event).

    That window is then solved by `init`, outside diffrax's stepping loop, and the
    step reads it off. With diffrax's default adjoint (`RecursiveCheckpointAdjoint`),
    whose backward pass recomputes every step from a checkpoint of the loop's state,
    the window is then solved (and compiled) once, not twice: the step that the
    backward pass recomputes holds no solve. As for `_check_not_backsolve`,
    `diffeqsolve` passes these to no solver method: they are read off its frame."""
    local = _diffeqsolve_locals()
    if local is None:
        return None
    max_steps = local["max_steps"]
    if not (_is_count(max_steps, 1) and max_steps == 1):
        return None
    saveat = local.get("saveat")
    if not isinstance(saveat, diffrax.SaveAt):
        return _OneStep(interpolated=True)
    is_sub = lambda x: isinstance(x, diffrax.SubSaveAt)
    subs = [x for x in jtu.tree_leaves(saveat.subs, is_leaf=is_sub) if is_sub(x)]
    interpolated = (
        saveat.dense
        or any(sub.ts is not None for sub in subs)
        or local.get("event") is not None
        or local.get("discrete_terminating_event") is not None
    )
    return _OneStep(interpolated=interpolated)


_NOT_PENDING_MESSAGE = (
    "`partime.ParallelSolver`: with `max_steps=1`, `init` solves the solve's only "
    "window and its step reads it off; this step was given another window or a "
    "solver state from another solve (`diffeqsolve(..., solver_state=...)`). Pass "
    "`max_steps` of 2 or more to solve every window in its step."
)


def _check_inner_solver(solver: Any) -> None:
    if not isinstance(solver, diffrax.AbstractSolver):
        raise TypeError(
            "`partime.ParallelSolver(solver=...)` must be a diffrax solver such as "
            f"`diffrax.Tsit5()`; got {solver!r}."
        )
    if isinstance(solver, ParallelSolver):
        raise ValueError(
            "`partime.ParallelSolver` cannot wrap another `ParallelSolver`: raise "
            "`num_steps` instead."
        )
    if isinstance(solver, diffrax.AbstractRungeKutta) and isinstance(
        solver.tableau, diffrax.MultiButcherTableau
    ):
        raise ValueError(
            "`partime.ParallelSolver` does not support IMEX inner solvers such as "
            f"`{type(solver).__name__}` yet. Use an explicit solver "
            "(`diffrax.Tsit5()`, ...) or an implicit one (`diffrax.Kvaerno5()`, "
            "...) on the whole vector field."
        )
    if isinstance(solver, diffrax.AbstractFosterLangevinSRK):
        raise ValueError(
            f"`partime.ParallelSolver` does not support `{type(solver).__name__}`: "
            "diffrax's underdamped Langevin solvers step their own drift and "
            "diffusion terms (`UnderdampedLangevinDriftTerm`, ...) and cannot take "
            "the stored Brownian increments `ParallelSolver` gives every inner step. "
            "Write the SDE as `MultiTerm(ODETerm(drift), ControlTerm(diffusion, "
            "brownian_motion))` and use an SRK solver such as `diffrax.ShARK()` or "
            "`diffrax.SEA()` inside `ParallelSolver`."
        )
    if isinstance(solver, (diffrax.ReversibleHeun, diffrax.LeapfrogMidpoint)):
        raise ValueError(
            f"`{type(solver).__name__}` carries information from step to step besides "
            "the solution, so its steps cannot be solved in parallel. Use a one-step "
            "solver such as `diffrax.Tsit5()` or `diffrax.Heun()`."
        )


def _check_root_finder_tolerances(solver: Any) -> None:
    """An implicit inner solver whose root finder still waits for tolerances from a
    step size controller: `diffeqsolve` fills them from an adaptive controller (as
    for the inner solver itself, `ParallelSolver` carries its implicit marker) and
    refuses a constant step size with its own error; this catches the rest (a
    `ParallelSolver` stepped outside `diffeqsolve`)."""
    root_finder = getattr(solver, "root_finder", None)
    if any(
        getattr(root_finder, name, None) is use_stepsize_tol
        for name in ("rtol", "atol", "norm")
    ):
        raise ValueError(
            "`partime.ParallelSolver`: the tolerances for the implicit solver have "
            "not been specified. Use an adaptive step size controller (its `rtol` "
            "and `atol` are then the root finder's, as in diffrax), or give the "
            "inner solver a root finder with explicit tolerances, e.g. "
            "`diffrax.Kvaerno5(root_finder=diffrax.VeryChord(rtol=1e-8, "
            "atol=1e-8))`."
        )


# The markers diffrax tests with `isinstance` on the solver: Itô or Stratonovich
# (which SDE it solves) and implicit (`diffeqsolve` then fills the root finder's
# tolerances from an adaptive step size controller).
_MARKERS = (
    diffrax.AbstractItoSolver,
    diffrax.AbstractStratonovichSolver,
    diffrax.AbstractImplicitSolver,
)


def _marked_class(solver: Any) -> type["ParallelSolver"]:
    # `type(...)`, not `isinstance`: diffrax forwards `isinstance` through wrappers,
    # which have no `root_finder` of their own.
    markers = tuple(
        marker
        for marker in _MARKERS
        if isinstance(solver, marker)
        and (
            marker is not diffrax.AbstractImplicitSolver
            or issubclass(type(solver), marker)
        )
    )
    return _marked_subclass(markers)


class ParallelSolver(diffrax.AbstractAdaptiveSolver[ParallelSolverState]):
    r"""Solves a differential equation with any one-step diffrax solver, *in parallel
    over time*.

    Each diffrax step of this solver, from `t0` to `t0 + dt0`, is a *window* of
    `num_steps` equal steps of the inner `solver`. The window's steps are written as one
    nonlinear system `y_k = step(y_{k-1})`, `k = 1..num_steps`, and solved all at once
    by `method` (a fixed-point iteration whose linear part is a parallel associative
    scan on an accelerator), so that the cost grows like `log(num_steps)` in depth
    instead of `num_steps`. The result is the inner solver's own solution on that grid,
    to the iteration's tolerance; a window whose iteration does not converge within its
    cap is finished exactly by a sequential pass from its converged prefix.

    The default `method` is [`partime.Newton`][] with its defaults: in the
    convergence study (`benchmarks/convergence.py`) it needed the fewest iterations
    on every system that is predictable over the window (a handful, nearly
    independent of the window's length, on contracting dynamics; fewer than the
    damped [`partime.ELK`][], whose iterations also cost more), and its hopeless-case
    test hands unpredictable windows to the exact sequential pass after a few
    iterations. Chaotic windows go there at once: a perturbation carried along the
    coarse pass (below) that grows more than `e^8`-fold over the window, on two
    step grids that agree and resolve the dynamics (no step grows it more than
    `e^2`-fold), skips the iteration (Lorenz-63, 2·10⁴ Tsit5 steps in one
    window: no iteration, about sequential diffrax's time; `partime.diagnose`). Use
    [`partime.QuasiNewton`][] when `num_steps · d²` numbers do not fit in memory.

    The iteration starts from a cheap prediction: the inner solver stepped sequentially
    over `coarse_steps` long steps spanning the window (by default `√num_steps`
    of them), read off at the inner grid with the inner solver's own interpolation.
    On smooth problems this is often within tolerance already, and one or two
    iterations finish the job. The prediction is used only if it is finite and fits
    the inner steps better (a smaller largest residual) than the constant guess
    `y(t0)`: coarse steps can be unstable where the inner steps are not.

    **Warm starts.** `guess` (a function of `t` returning a state shaped like `y0`)
    is a further candidate first iterate, read off at the inner grid of every
    window, and used where it fits the inner steps better than the others. In
    training, the previous step's trajectory is a good one — for oscillators it cut
    Newton from ≥ 100 iterations to 5 in the convergence study:

    ```python
    # `previous_ys`: the last solve's `sol.ys` with `SaveAt(ts=ts)`.
    previous = diffrax.LinearInterpolation(ts=ts, ys=previous_ys)
    solver = partime.ParallelSolver(num_steps=1000, guess=previous.evaluate)
    ```

    The guess only changes where the iteration starts, never the answer, and no
    gradient flows through it.

    With `window=W` (at most `num_steps`), at most `W` inner steps are iterated on at
    a time, in a window that slides forward as its leading steps converge (the
    ParaDiGMS schedule of [`partime.fixed_point_solve`][]): a long window whose far end
    converges slowly does not redo its converged head, and Newton's memory is
    `O(W d²)` rather than `O(num_steps · d²)`. The result is the same.

    **The automatic window** (`window="auto"`; the default on accelerators). The
    iteration starts on all `num_steps` inner steps, so a window that is predictable
    runs as on the whole window, iteration for iteration. Where the iteration would
    give up — a neutral window, such as an oscillator over many periods — it narrows
    instead: each update is trusted only over a window past the converged prefix, 4×
    narrower at every hopeless verdict (down to `num_steps / 64`) and, once narrowed,
    narrower still where the prefix moves too slowly for it (more than 10 iterations
    per window), the steps beyond it held at the first guess, with the iteration cap
    of a sliding window of that width; only at the narrowest does the rest go to the
    sequential fallback.
    Chaotic windows never get there: the chaos test gives them to the fallback at
    once. (Van der Pol, μ = 1, over 100 time units in 10⁴ Tsit5 steps: about 100
    iterations and no fallback, where the whole window gives up after 3.) Every
    iteration still evaluates all `num_steps` inner steps (one compiled loop): on an
    accelerator an iteration costs about its depth, but on a CPU its work, where a
    neutral window over many periods then costs far more than the fallback (78× the
    sequential time against 4×, on the van der Pol window above). So `window=None`
    means `"auto"` off a CPU (`jax.default_backend()` at trace time) and the whole
    window on a CPU, where a hopeless window goes to the sequential fallback after a
    few iterations. Pass `window=W` for a sliding window (each iteration costs `W`
    steps; about ten times the steps that settle per iteration: 11× sequential on
    that window with `W = 1000`), `window="auto"` to narrow on any platform, or
    `window=num_steps` for the whole window everywhere. Without a coarse pass
    (`coarse_steps=0`) there is no chaos test, and the automatic window is the
    whole window.

    ```python
    term = diffrax.ODETerm(lambda t, y, args: -y)
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=1000)
    # One window over the whole horizon: 1000 Tsit5 steps of length 0.001.
    sol = diffrax.diffeqsolve(term, solver, t0=0, t1=1, dt0=1, y0=1.0)
    ```

    !!! warning "`dt0` is the window length"

        `dt0` (or the `ts` of `diffrax.StepTo`) sets the length of a *window*; the
        inner step is `dt0 / num_steps`. `dt0 = t1 - t0` makes the whole horizon one
        parallel window, which is usually what you want. Passing the fine step you
        would give a sequential solver as `dt0` instead makes every one of those steps
        a window of `num_steps` substeps: `num_steps` times more work, solved window
        after window, with little parallelism. Likewise `max_steps` counts windows,
        and a step size controller's `dtmin`, `dtmax` bound windows. To keep `dt0`
        and the controller about the inner steps, wrap the controller in a
        [`partime.WindowController`][], which chooses the windows (and ends the
        last one at `t1` exactly: in float32, `t0 + (t1 - t0)` can round one ulp
        below `t1`, and the plain one-window recipe then takes a second window).

    **Output and statistics.**

    - `SaveAt(ts=...)` and `SaveAt(dense=True)` use the inner solver's interpolation
        on the inner step that holds `t`, so they resolve the inner grid; in
        particular `SaveAt(ts=...)` at the inner grid returns every inner step.
        `SaveAt(steps=True)` saves window ends only. `SaveAt(dense=True)` preallocates
        `max_steps` dense infos, each now holding a whole window: set a tight
        `max_steps`.
    - Events (`diffrax.Event` with a `cond_fn`) look for sign changes at window ends
        only: a crossing that re-crosses within one window is missed. Use smaller
        windows to resolve it. A detected crossing is located inside the window by
        the event's root finder on the inner solver's interpolation, as in a
        sequential solve on the same grid. Progress meters count windows.
    - The error estimate of a window (for adaptive step size controllers, which then
        adapt the window length) is the sum of the magnitudes of its inner steps'
        error estimates; it scales like the inner solver's, so its `error_order`
        stays valid. It is `inf` when the window failed, so that an adaptive
        controller rejects the window and shrinks it: a non-finite value
        (`RESULTS.nonfinite`, e.g. NaN in `y0`), or, for a method with
        `fallback=False`, an iteration that did not converge
        (`RESULTS.nonlinear_max_steps_reached` / `nonlinear_divergence`). With a
        fixed step size these end the solve (an error, or `sol.result` with
        `throw=False`).
    - With `SaveAt(..., solver_state=True)`, `sol.solver_state` is a
        `ParallelSolverState` with `num_iterations` (total fixed-point
        iterations), `num_fallbacks` (windows that fell back to sequential
        stepping) and `num_sequential_steps` (the inner steps the fallback
        computed), summed over accepted windows; `window`, the fewest inner steps
        solved together (for the automatic window, the width it chose); and
        `lyapunov`, an estimate of the largest Lyapunov exponent per unit time over
        the last window.

    **Gradients.** Each window is differentiated implicitly (one parallel linear solve
    at the converged solution, never by unrolling the iterations), so the backward
    pass is parallel over time too. Use `diffrax.RecursiveCheckpointAdjoint()` (the
    default), `diffrax.DirectAdjoint()` or `diffrax.ForwardMode()`;
    `diffrax.BacksolveAdjoint()` is rejected with an error. Like any diffrax step, a
    window is solved again on the default adjoint's backward pass, from the state
    saved before it; except with `max_steps=1` (one window: `dt0 = t1 - t0`), where
    `init` solves the window, outside diffrax's stepping loop, and the step reads it
    off (`sol.solver_state.first_window`), so that it is solved and compiled once
    for every adjoint (a neural ODE in one window of 1000 Tsit5 steps: 443 XLA
    kernels for `value_and_grad` instead of 812). With `SaveAt(ts=...)` or
    `dense=True` inside the window, `adjoint=diffrax.DirectAdjoint()` still
    compiles faster: diffrax's checkpointed saving loop differentiates the window's
    interpolation at every saved time. `DirectAdjoint`'s memory grows with
    `max_steps`.

    **Supported problems.** Any PyTree `y0` is accepted, with real or complex leaves
    of any floating-point dtype, some or all of them empty; it is flattened to one
    real vector per step inside the window (complex leaves as their real and
    imaginary parts, `bfloat16`/`float16` ones iterated in `float32` and stepped in
    their own dtype).

    - ODEs and other deterministic terms, e.g. CDEs (`ControlTerm` driven by a
        `diffrax.LinearInterpolation` or `CubicInterpolation` of data), with an
        explicit one-step inner solver: `Euler`, `Heun`, `Midpoint`, `Ralston`,
        `Bosh3`, `Tsit5`, `Dopri5`, `Dopri8`, ...
    - SDEs: terms driven by a Brownian motion, e.g.
        `MultiTerm(ODETerm(drift), ControlTerm(diffusion, brownian_motion))`, with
        `Euler`, `Heun`, `EulerHeun` or a stochastic Runge--Kutta solver (`SEA`,
        `ShARK`, `SRA1`, ...). Every Brownian increment of a window (with its Lévy
        area where the solver needs it) is computed once, vectorised over the inner
        steps, before the iteration; each inner step is then a deterministic map.
        (A wrapped solver such as `diffrax.HalfSolver` also steps over each half of
        an inner step: its inner steps evaluate the Brownian motion themselves.)
        With `diffrax.VirtualBrownianTree` the solution is that of the sequential
        inner solver on the same grid with the same Brownian motion. "Same grid"
        means bit for bit: a tree is not exactly continuous at its dyadic nodes (a
        one-ulp change of a step time there moved an increment by about 3e-9 with
        `tol=5e-4`), and step times computed inside and outside `jit` can differ by
        an ulp.
        `diffrax.UnsafeBrownianPath` draws each increment from a key derived from the
        raw bits of the step's `(t0, t1)`: it reproduces a sequential solve only where
        the inner step times are bit for bit those of the sequential grid (they are
        `t0 + (t1 - t0) * (k / num_steps)` within each window), and the Brownian
        motions of different grids are unrelated.
    - Stiff problems, with an implicit inner solver: `ImplicitEuler`, `Kvaerno3`,
        `Kvaerno4`, `Kvaerno5`, ... Each inner step runs the solver's own root finder
        (the inner solver as a black box), and the iteration's transition is the
        Jacobian of the whole inner step, through the root find by implicit
        differentiation. As in diffrax, the root finder takes its tolerances from
        an adaptive step size controller (`PIDController(rtol, atol)`) unless it has
        its own, e.g. `diffrax.Kvaerno5(root_finder=optimistix.Newton(rtol=1e-10,
        atol=1e-10))`; with a constant step size it must have its own. The
        fixed-point iteration solves to about 100 ulps: root finds much looser than
        that make each inner step a slightly ragged function of its start, which
        can cost iterations; give a sequential solve the same root finder to
        compare. A
        root finder that factorises with LU (lineax's default) gets one written in
        plain JAX operations: batched LAPACK LU over the inner steps can deadlock
        XLA:CPU. IMEX solvers (`KenCarp4`, ...) are not supported yet.

    `ParallelSolver` carries the Itô/Stratonovich and implicit markers of its inner
    solver, so `isinstance(solver, diffrax.AbstractItoSolver)` answers as the inner
    solver does, and `diffeqsolve` fills in an implicit inner solver's root-finder
    tolerances from an adaptive step size controller (and refuses a constant step
    size without them) as it would for the inner solver itself. (Instances are of a
    small subclass of `ParallelSolver` for each set of markers.)

    ??? cite "References"

        ```bibtex
        @inproceedings{lim2024parallelizing,
            title={Parallelizing non-linear sequential models over the sequence
                   length},
            author={Lim, Yi Heng and Zhu, Qi and Selfridge, Joshua and
                    Kasim, Muhammad Firmansyah},
            booktitle={International Conference on Learning Representations},
            year={2024}
        }
        ```
    """

    solver: diffrax.AbstractSolver
    num_steps: int = eqx.field(static=True)
    method: AbstractMethod
    coarse_steps: int | None = eqx.field(static=True)
    window: int | Literal["auto"] | None = eqx.field(static=True)
    guess: Callable[[Any], PyTree] | None
    mesh: Mesh | None = eqx.field(static=True)
    axis_name: str | None = eqx.field(static=True)

    def __new__(
        cls,
        solver: diffrax.AbstractSolver | None = None,
        num_steps: int = 100,
        method: AbstractMethod | None = None,
        coarse_steps: int | None = None,
        window: int | Literal["auto"] | None = None,
        guess: Callable[[Any], PyTree] | None = None,
        mesh: Mesh | None = None,
        axis_name: str | None = None,
    ):
        # diffrax decides Itô vs Stratonovich by `isinstance` on the solver, so the
        # instance must carry the inner solver's marker. One public constructor picks
        # the final subclass that has it.
        del num_steps, method, coarse_steps, window, guess, mesh, axis_name
        return super().__new__(_marked_class(solver))

    def __init__(
        self,
        solver: diffrax.AbstractSolver | None = None,
        num_steps: int = 100,
        method: AbstractMethod | None = None,
        coarse_steps: int | None = None,
        window: int | Literal["auto"] | None = None,
        guess: Callable[[Any], PyTree] | None = None,
        mesh: Mesh | None = None,
        axis_name: str | None = None,
    ):
        self.solver = diffrax.Tsit5() if solver is None else solver
        self.num_steps = as_count(num_steps)
        self.method = Newton() if method is None else method
        self.coarse_steps = as_count(coarse_steps)
        self.window = as_count(window)
        self.guess = guess
        self.mesh = mesh
        self.axis_name = axis_name

    @property
    def _num_coarse_steps(self) -> int:
        if self.coarse_steps is None:
            return max(1, math.ceil(math.sqrt(self.num_steps)))
        return self.coarse_steps

    def __check_init__(self):
        _check_inner_solver(self.solver)
        if not _is_count(self.num_steps, 1):
            raise ValueError(
                "`partime.ParallelSolver(num_steps=...)` must be a positive integer "
                f"(the number of inner steps per window); got {self.num_steps!r}."
            )
        if self.coarse_steps is not None and not _is_count(self.coarse_steps, 0):
            raise ValueError(
                "`partime.ParallelSolver(coarse_steps=...)` must be `None` or a "
                f"non-negative integer; got {self.coarse_steps!r}."
            )
        if self.window is not None and not _is_auto(self.window):
            if not _is_count(self.window, 1):
                raise ValueError(
                    "`partime.ParallelSolver(window=...)` must be `None`, `'auto'` or "
                    "a positive integer (inner steps in flight at a time); got "
                    f"{self.window!r}."
                )
            if self.window > self.num_steps:
                raise ValueError(
                    "`partime.ParallelSolver(window=...)` must be at most `num_steps` "
                    f"(the inner steps of one diffrax step); got window={self.window} "
                    f"with num_steps={self.num_steps}."
                )
        if self.window is not None and self.mesh is not None:
            raise ValueError(
                "`partime.ParallelSolver` takes `window=` or `mesh=`, not both."
            )
        if self.guess is not None and not callable(self.guess):
            raise TypeError(
                "`partime.ParallelSolver(guess=...)` must be a function of `t` "
                "returning a state like `y0`, e.g. the `evaluate` method of the "
                f"previous solution's interpolation; got {self.guess!r}."
            )
        if not isinstance(self.method, AbstractMethod):
            raise TypeError(
                "`partime.ParallelSolver(method=...)` must be a partime method such as "
                f"`partime.Newton()`; got {self.method!r}."
            )

    @property
    def term_structure(self):
        return self.solver.term_structure

    @property
    def term_compatible_contr_kwargs(self):
        return self.solver.term_compatible_contr_kwargs

    @property
    def interpolation_cls(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return window_interpolation_cls(self.solver.interpolation_cls)

    def order(self, terms):
        return self.solver.order(terms)

    def strong_order(self, terms):
        return self.solver.strong_order(terms)

    def error_order(self, terms):
        return self.solver.error_order(terms)

    def init(self, terms, t0, t1, y0, args) -> ParallelSolverState:
        _check_terms(terms)
        _check_not_backsolve()
        zero = jnp.array(0, dtype=jnp.int32)
        nan = jnp.asarray(jnp.nan, Flattener(y0).dtype)
        state = ParallelSolverState(
            num_iterations=zero,
            num_fallbacks=zero,
            lyapunov=nan,
            num_sequential_steps=zero,
            window=jnp.array(self.num_steps, dtype=jnp.int32),
        )
        one_step = _one_step()
        if one_step is None:
            return state
        # `diffeqsolve(..., max_steps=1)`: its only step is this window (`t1` is
        # its end). Solved here, outside diffrax's loop; the step reads it off.
        _check_root_finder_tolerances(self.solver)
        y1, y_error, dense_info, stats, result = _window_step(
            self, terms, t0, t1, y0, args, state
        )
        # No derivative for what no output depends on: diffrax's backward pass
        # cannot tell that it is zero, and would take (and compile) it. The error
        # estimate of the only step decides nothing but its acceptance; the dense
        # output is read only by interpolation.
        y_error = jax.lax.stop_gradient(y_error)
        if not one_step.interpolated:
            dense_info = jax.lax.stop_gradient(dense_info)
        first_window = _FirstWindow(
            t0=jnp.asarray(t0),
            t1=jnp.asarray(t1),
            y1=y1,
            y_error=y_error,
            dense_info=dense_info,
            stats=stats,
            result=result,
            pending=jnp.asarray(True),
        )
        return eqx.tree_at(
            lambda s: s.first_window, state, first_window, is_leaf=lambda x: x is None
        )

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        # Every inner step calls the inner `init` afresh (below), so first-same-as-last
        # solvers recompute their first stage and a jump at `t0` needs no special care.
        del made_jump
        _check_terms(terms)
        if solver_state.first_window is not None:
            return _read_first_window(t0, t1, solver_state.first_window)
        _check_root_finder_tolerances(self.solver)
        return _window_step(self, terms, t0, t1, y0, args, solver_state)

    def _window_step(self, terms, t0, t1, y0, args, solver_state):
        """One window: see `step`."""
        flattener = Flattener(y0)
        ravel, unravel = flattener.ravel, flattener.unravel
        y0_flat = ravel(y0)
        solver = with_portable_lu(with_bounded_scan(self.solver))
        ts = inner_grid(t0, t1, self.num_steps)
        increments, make_terms = store_increments(terms, solver, ts)
        xs = (ts[:-1], ts[1:], increments)

        # Traced once here: every later use (first guess, the iteration, its
        # linearisation, the fallback, the derivative) replays this jaxpr instead of
        # calling the user's vector field again.
        def convert(straight):
            return eqx.filter_closure_convert(
                make_flat_step(solver, make_terms, args, flattener, straight),
                y0_flat,
                jtu.tree_map(lambda a: a[0], xs),
            )

        flat_step = convert(False)
        # The fallback steps one at a time: an explicit Runge--Kutta step's stages
        # as straight-line code there (a loop over them costs more than they do).
        engine_step = (
            SequentialForm(flat_step, convert(True))
            if is_butcher_erk(solver)
            else flat_step
        )
        candidates = []
        growth = None
        if self.coarse_steps != 0:
            # For an SDE, the coarse steps take the Brownian motion over each long
            # step from the window's stored increments.
            # No gradient flows through a first guess or the chaos test: cut them
            # at the inputs, so that none of them is ever differentiated.
            coarse_terms = interpolated_terms(terms, solver, ts, increments)
            coarse_terms, coarse_args, coarse_y0 = no_gradient(
                (coarse_terms, args, y0_flat)
            )
            coarse_step = step_with_info(
                solver, lambda _: coarse_terms, coarse_args, flattener
            )
            num_coarse = self._num_coarse_steps
            coarse_ts = no_gradient(inner_grid(t0, t1, num_coarse))
            # Refined up to 16x where the coarse pass is unstable or looks chaotic.
            refined = {min(k * num_coarse, self.num_steps) for k in (2, 4, 8, 16)}
            refined = sorted(refined - {num_coarse})
            infos, growth = coarse_pass(
                lambda y, x: coarse_step(y, (*x, ())),
                coarse_y0,
                no_gradient(t0),
                no_gradient(t1),
                [num_coarse, *refined],
                _CHAOTIC,
                _RESOLVED,
            )
            candidates.append(
                lambda: coarse_guess(
                    solver.interpolation_cls, ravel, infos, no_gradient(ts), coarse_ts
                )
            )
        if self.guess is not None:
            candidates.append(lambda: jax.vmap(lambda t: ravel(self.guess(t)))(ts[1:]))
        # Chaos: a perturbation grows more than `e^{_CHAOTIC}`-fold over the window
        # along the coarse pass. The iteration could not pay (it would run into its
        # hopeless-case test after costly iterations): every inner step goes to the
        # exact sequential fallback at once, for about a sequential solve's cost.
        give_up = jnp.asarray(False)
        if growth is not None and self.method.fallback:
            # NaN (no finite coarse pass): no prediction.
            give_up = growth > _CHAOTIC
        if candidates:
            # Where the iteration starts, never the answer: no gradient.
            flat = lambda: jnp.broadcast_to(
                no_gradient(y0_flat), (self.num_steps, y0_flat.shape[0])
            )

            def best():
                guesses = [make() for make in candidates]
                best = best_guess(flat_step, y0_flat, xs, guesses)
                # Under `jax.vmap`, the problems of the batch that give up keep `flat`.
                return batch_where(~give_up, best, flat())

            # Unbatched under `jax.vmap`: the candidates are skipped only if every
            # problem of the batch gives up.
            guess = jax.lax.cond(unvmap_all(give_up), flat, best)
        else:
            guess = None
        # A sliding window of `window` inner steps moves through this one, or the
        # inner steps split over the mesh's time axis. The automatic window (by
        # default off a CPU) relies on the chaos test above to keep chaotic windows
        # out (without a coarse pass: the whole window).
        automatic = _is_auto(self.window) or (
            self.window is None and jax.default_backend() != "cpu"
        )
        if automatic:
            window = None if growth is None or self.mesh is not None else "auto"
        elif self.window is not None:
            window = self.window if self.window < self.num_steps else None
        else:
            window = None
        states, stats = fixed_point_solve(
            engine_step,
            y0_flat,
            xs,
            self.method,
            guess=guess,
            window=window,
            mesh=self.mesh,
            axis_name=self.axis_name,
            throw=False,
            give_up=give_up,
        )
        y_prevs = previous(y0_flat, states, mesh=self.mesh, axis_name=self.axis_name)

        # One more vectorised pass at the converged states, for the parts of each inner
        # step the iteration does not keep: its error estimate and dense info.
        outputs = step_outputs(solver, make_terms, args, flattener)
        y_errors, dense_infos, inner_results = jax.vmap(outputs)(y_prevs, states, xs)
        y1 = unravel(states[-1])

        result = diffrax.RESULTS.promote(stats.result)
        inner_ok = jnp.all(inner_results == diffrax.RESULTS.successful)
        first_failure = jnp.argmax(inner_results != diffrax.RESULTS.successful)
        inner_result = jtu.tree_map(lambda r: r[first_failure], inner_results)
        result = diffrax.RESULTS.where(inner_ok, result, inner_result)
        # E.g. a vector field that overflows: the fallback computes it exactly, NaN.
        finite = jnp.all(jnp.isfinite(states))
        result = diffrax.RESULTS.where(finite, result, diffrax.RESULTS.nonfinite)
        ok = result == diffrax.RESULTS.successful

        if y_errors is None:
            y_error = None
        else:
            y_error = jtu.tree_map(
                lambda e: jnp.where(ok, jnp.sum(jnp.abs(e), axis=0), jnp.inf), y_errors
            )
        if growth is None:
            per_step = stats.lyapunov * self.num_steps
        else:
            per_step = growth
        dtype = solver_state.lyapunov.dtype
        lyapunov = per_step.astype(dtype) / jnp.asarray(t1 - t0).astype(dtype)
        new_state = ParallelSolverState(
            num_iterations=solver_state.num_iterations
            + stats.num_iterations.astype(jnp.int32),
            num_fallbacks=solver_state.num_fallbacks
            + stats.fell_back.astype(jnp.int32),
            lyapunov=lyapunov,
            num_sequential_steps=solver_state.num_sequential_steps
            + stats.num_sequential_steps.astype(jnp.int32),
            window=jnp.minimum(solver_state.window, stats.window.astype(jnp.int32)),
        )
        return y1, y_error, dict(infos=dense_infos), new_state, result

    def func(self, terms, t0, y0, args):
        return self.solver.func(terms, t0, y0, args)


# `diffeqsolve` traces a solver's `step` three times: twice for the shapes of its
# outputs (`filter_eval_shape`), once for the loop. Under `jit`, the second and third
# calls with the same inputs reuse the first one's trace: the whole window (the
# user's vector field included) is traced once, not three times.
_window_step = eqx.filter_jit(ParallelSolver._window_step)


def _read_first_window(t0, t1, first_window: _FirstWindow):
    """The step of a `diffeqsolve(..., max_steps=1)`: the window `init` solved."""
    same = (
        first_window.pending
        & (jnp.asarray(t0) == first_window.t0)
        & (jnp.asarray(t1) == first_window.t1)
    )
    y1 = eqx.error_if(first_window.y1, ~same, _NOT_PENDING_MESSAGE)
    read = eqx.tree_at(lambda w: w.pending, first_window, jnp.asarray(False))
    stats = eqx.tree_at(
        lambda s: s.first_window, first_window.stats, read, is_leaf=lambda x: x is None
    )
    return y1, first_window.y_error, first_window.dense_info, stats, first_window.result


class _ImplicitParallelSolver(ParallelSolver):
    """The implicit marker's interface: the inner solver's root finder, so that
    `diffeqsolve` can fill in its tolerances as for the inner solver itself."""

    @property
    def root_finder(self):
        return self.solver.root_finder

    @property
    def root_find_max_steps(self):
        return self.solver.root_find_max_steps


@functools.cache
def _marked_subclass(markers: tuple[type, ...]) -> type[ParallelSolver]:
    """The subclass of `ParallelSolver` that carries exactly `markers`."""
    if not markers:
        return ParallelSolver
    implicit = diffrax.AbstractImplicitSolver in markers
    base = _ImplicitParallelSolver if implicit else ParallelSolver
    name = "".join(
        m.__name__.removeprefix("Abstract").removesuffix("Solver") for m in markers
    )
    cls = types.new_class(f"_{name}ParallelSolver", (base, *markers))
    cls.__module__ = __name__
    return cls


ParallelSolver.__init__.__doc__ = """**Arguments:**

- `solver`: the inner diffrax solver, stepped `num_steps` times per window. An explicit
    or implicit one-step solver (ODE or SDE); defaults to `diffrax.Tsit5()`.
- `num_steps`: the number of inner steps per window (static: it fixes array shapes).
    The inner step is `dt0 / num_steps`; a window's inner times are
    [`partime.inner_grid`][]`(t0, t1, num_steps)`.
- `method`: the fixed-point method that solves each window: `partime.Newton()` (the
    default), `partime.QuasiNewton()`, `partime.Picard()` or `partime.Jacobi()`, with
    its tolerances and iteration cap.
- `coarse_steps`: the number of sequential steps of the inner solver, each spanning
    many inner steps, that predict the window's solution as the iteration's first
    guess. `None` (the default) takes `ceil(sqrt(num_steps))`; `0` starts from the
    constant `y(t0)` instead, with no sequential work at all (static).
- `window`: `"auto"` for the automatic window; `W <= num_steps` for a sliding
    window of `W` inner steps; `num_steps` for the whole window, unadapted; `None`
    (the default): `"auto"` on accelerators, the whole window on a CPU. See above
    (static).
- `mesh`, `axis_name`: split each window's inner steps over the devices of mesh axis
    `axis_name` (which may be omitted on a 1-D mesh); `num_steps` must be a multiple of
    their number. See [`partime.fixed_point_solve`][].
"""
