"""`partime.diagnose`: is a recurrence or an ODE predictable enough to parallelise?"""

import math
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from ._fixed_point import previous
from ._flatten import Flattener
from ._lds import DenseTransition
from ._method.base import AbstractMethod
from ._scan import scan
from ._solver import _CHAOTIC, ParallelSolver
from ._window_controller import WindowController


# `λ·T` below this: perturbations shrink at least e-fold over the horizon.
_CONTRACTING = -1.0


class Diagnosis(eqx.Module):
    """What [`partime.diagnose`][] found. Printing it gives a short report.

    **Attributes:**

    - `lyapunov`: the estimate of the largest Lyapunov exponent `λ`, per `unit`.
    - `unit`: `"step"` for a recurrence, `"unit time"` for a differential equation.
    - `horizon`: `T`, in that unit: the number of steps, or `t1 - t0`.
    - `growth`: `λ·T`, the log-amplification of a perturbation over the horizon.
    - `num_steps`: the steps of the solve (the recurrence's length, or the inner
        steps of the one window).
    - `window`: the steps solved together: the width the automatic window
        (`window="auto"`) ended at, `num_steps` if it never narrowed.
    - `num_iterations`: the parallel iterations spent.
    - `fell_back`: whether the exact sequential fallback computed any step.
    - `kind`: `"predictable"` (`λ·T < -1`), `"neutral"` (up to `8`), `"chaotic"`
        (above), or `"unknown"` (no finite estimate).
    - `recommendation`: what to do about it, in a sentence.
    """

    lyapunov: float
    unit: str
    horizon: float
    growth: float
    num_steps: int
    window: int
    num_iterations: int
    fell_back: bool
    kind: str
    recommendation: str

    def __str__(self) -> str:
        narrowed = self.window < self.num_steps
        return "\n".join(
            [
                f"partime.diagnose: {self.kind}",
                f"  largest Lyapunov exponent λ ≈ {self.lyapunov:+.3g} per {self.unit}",
                f"  λ·T ≈ {self.growth:+.3g} over T = {self.horizon:g}",
                f"  {self.num_steps} steps in one solve"
                + (f" (automatic window: {self.window} steps)" if narrowed else "")
                + f": {self.num_iterations} parallel iterations"
                + (", then the sequential fallback" if self.fell_back else ""),
                f"  recommendation: {self.recommendation}",
            ]
        )


def _classify(
    growth: float,
    num_steps: int,
    window: int,
    num_iterations: int,
    fell_back: bool,
    unit: str,
) -> tuple[str, str]:
    if not math.isfinite(growth):
        return "unknown", (
            "no finite estimate of λ (the solve or its coarse pass overflowed, or "
            "too few steps converged to tell): check the problem sequentially first."
        )
    if growth > _CHAOTIC:
        # Windows over which a perturbation grows about e-fold.
        size = max(1, math.floor(num_steps / growth))
        return "chaotic", (
            "sequential: perturbations grow about e^"
            f"{growth:.0f}-fold over the horizon, so no parallel iteration can pay "
            "(ParallelSolver already hands such windows to its sequential "
            "fallback; for a scan use jax.lax.scan). Parallel iterations converge "
            f"again over windows of about {size} {unit}s (λ·window ≈ 1)."
        )
    if fell_back and window < num_steps:
        return "neutral", (
            f"the iteration gave up even in windows of {window} {unit}s (the "
            "automatic window's): start from a better guess (the previous "
            "trajectory), or solve sequentially."
        )
    if fell_back:
        size = max(1, num_steps // 10)
        return "neutral", (
            "the iteration gave up over the whole horizon: solve in windows of "
            f"about {size} {unit}s (e.g. `window=` or a shorter `dt0`), or start "
            "from a better guess (the previous trajectory)."
        )
    kind = "predictable" if growth < _CONTRACTING else "neutral"
    if window < num_steps:
        return kind, (
            f"the automatic window: over the whole horizon at once the iteration "
            f"would not converge; narrowed to {window} {unit}s, it converged in "
            f"{num_iterations} iterations. Pass `window='auto'` (or a sliding "
            f"`window={window}`)."
        )
    if kind == "predictable":
        return kind, (
            f"one window: the parallel iteration converged in {num_iterations} "
            "iterations, and on contracting dynamics the count barely grows with "
            "the length."
        )
    return kind, (
        f"one window converged in {num_iterations} iterations; on neutral "
        "dynamics (oscillators) the count grows with the periods spanned: "
        "over longer horizons, use windows of about this length (or "
        "`window='auto'`)."
    )


def _diagnosis(
    lyapunov: float,
    unit: str,
    horizon: float,
    num_steps: int,
    window: int,
    num_iterations: int,
    fell_back: bool,
    step_unit: str,
) -> Diagnosis:
    """The `Diagnosis` of a solve's statistics: classified, with a recommendation."""
    growth = lyapunov * horizon
    kind, text = _classify(
        growth, num_steps, window, num_iterations, fell_back, step_unit
    )
    return Diagnosis(
        lyapunov=lyapunov,
        unit=unit,
        horizon=horizon,
        growth=growth,
        num_steps=num_steps,
        window=window,
        num_iterations=num_iterations,
        fell_back=fell_back,
        kind=kind,
        recommendation=text,
    )


def _scan_diagnosis(f, init, xs, length, method) -> Diagnosis:
    kwargs = {} if method is None else dict(method=method)
    carry, _, stats = scan(
        f, init, xs, length=length, window="auto", return_stats=True, **kwargs
    )
    del carry
    # The exact tangent dynamics along the solution (converged or completed by the
    # fallback): the step Jacobians at the states, their product's growth.
    flattener = Flattener(init)

    def step(state, x):
        new, _ = f(flattener.unravel(state), x)
        return flattener.ravel(new)

    init_flat = flattener.ravel(init)
    if jtu.tree_leaves(xs):
        xs_steps = xs
    else:
        xs_steps = jnp.zeros((stats.length, 0), init_flat.dtype)
        step_fn = step
        step = lambda s, x: step_fn(s, None)

    @jax.jit
    def growth_along(init_flat, xs_steps):
        def body(s, x):
            new = step(s, x)
            return new, new

        _, states = jax.lax.scan(body, init_flat, xs_steps)
        prev = previous(init_flat, states)
        jacobians = jax.vmap(jax.jacfwd(step))(prev, xs_steps)
        return DenseTransition(jacobians).log_growth()

    num_steps = stats.length
    return _diagnosis(
        lyapunov=float(growth_along(init_flat, xs_steps)) / num_steps,
        unit="step",
        horizon=float(num_steps),
        num_steps=num_steps,
        window=int(stats.window),
        num_iterations=int(stats.num_iterations),
        fell_back=bool(stats.fell_back),
        step_unit="step",
    )


def _diffrax_diagnosis(terms, t0, t1, y0, args, solver, dt0, method) -> Diagnosis:
    horizon = float(t1) - float(t0)
    num_steps = max(1, math.ceil(horizon / float(dt0)))
    parallel = ParallelSolver(solver, num_steps=num_steps, method=method, window="auto")

    @jax.jit
    def solve(y0, args):
        return diffrax.diffeqsolve(
            terms,
            parallel,
            t0,
            t1,
            (t1 - t0) / num_steps,
            y0,
            args,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            # One window ending at `t1` exactly (`t0 + (t1 - t0)` can round short).
            stepsize_controller=WindowController(),
            max_steps=1,
        ).solver_state

    state = solve(y0, args)
    return _diagnosis(
        lyapunov=float(state.lyapunov),
        unit="unit time",
        horizon=horizon,
        num_steps=num_steps,
        window=int(state.window),
        num_iterations=int(state.num_iterations),
        fell_back=bool(state.num_fallbacks),
        step_unit="inner step",
    )


def diagnose(
    f: Callable | PyTree[diffrax.AbstractTerm],
    *args: Any,
    length: int | None = None,
    solver: diffrax.AbstractSolver | None = None,
    dt0: float | None = None,
    method: AbstractMethod | None = None,
) -> Diagnosis:
    r"""Tells, before training, whether a recurrence or a differential equation is
    predictable enough to solve in parallel over time, and how. Runs eagerly (not
    under `jax.jit`): the arguments must be concrete.

    Two call forms:

    - `partime.diagnose(f, init, xs, length=None, method=None)`: a recurrence in
        `jax.lax.scan` form (`f(carry, x) -> (carry, y)`). It is solved by
        [`partime.scan`][] with the automatic window, and `λ` is estimated along
        the exact solution from the step Jacobians: `λ = log ‖J_T ⋯ J_1‖ / T` per
        step (dense Jacobians: `T d²` numbers).
    - `partime.diagnose(terms, t0, t1, y0, args=None, solver=diffrax.Tsit5(),
        dt0=..., method=None)`: a differential equation, solved as one window of
        `ceil((t1 - t0) / dt0)` steps of `solver` (your sequential step size) by
        [`partime.ParallelSolver`][] with the automatic window; `λ` per unit time
        is the growth of a perturbation along its coarse pass
        (`ParallelSolverState.lyapunov`).

    **Returns:** a [`partime.Diagnosis`][]: the estimate `λ`, the growth `λ·T` over
    the horizon, the iterations spent, the window the automatic window chose (the
    whole horizon where the iteration converges on it; narrower where it would
    give up: `window="auto"`, or a sliding window of that width, then pays),
    whether the sequential fallback ran, and a recommendation (print it). The kinds
    follow Gonzalez et al. (2025, "Predictability Enables Parallelization of
    Nonlinear State Space Models"):

    - `λ·T < -1` — *predictable* (contracting): one window; the iterations barely
        grow with the length.
    - `-1 ≤ λ·T ≤ 8` — *neutral* (oscillators, slow growth): one window converges
        if it spans few periods; otherwise windows.
    - `λ·T > 8` — *chaotic*: sequential (the solvers' fallback does this at about
        sequential cost); parallel iteration pays again only over windows with
        `λ·window ≈ 1`.

    `λ` is a finite-horizon estimate along one trajectory: read its sign and order
    of magnitude, and diagnose a few typical inputs (initial states, parameters),
    not one.
    """
    if isinstance(f, Callable) and not isinstance(f, diffrax.AbstractTerm):
        if solver is not None or dt0 is not None:
            raise TypeError(
                "`partime.diagnose(f, init, xs)` (scan form) takes no `solver` or "
                "`dt0`; for a differential equation pass its terms first: "
                "`partime.diagnose(terms, t0, t1, y0, args, dt0=...)`."
            )
        if len(args) != 2:
            raise TypeError(
                "`partime.diagnose(f, init, xs)` takes the scan's `init` and `xs`."
            )
        init, xs = args
        return _scan_diagnosis(f, init, xs, length, method)
    if length is not None:
        raise TypeError("`length` is for the scan form `diagnose(f, init, xs)`.")
    if len(args) not in (3, 4):
        raise TypeError(
            "`partime.diagnose(terms, t0, t1, y0, args=None, dt0=...)` takes the "
            "arguments of `diffrax.diffeqsolve`."
        )
    if dt0 is None:
        raise TypeError(
            "`partime.diagnose(terms, ...)` needs `dt0`: the step size of the "
            "sequential solve to diagnose."
        )
    t0, t1, y0, *rest = args
    solve_args = rest[0] if rest else None
    solver = diffrax.Tsit5() if solver is None else solver
    return _diffrax_diagnosis(
        terms=f,
        t0=t0,
        t1=t1,
        y0=y0,
        args=solve_args,
        solver=solver,
        dt0=dt0,
        method=method,
    )
