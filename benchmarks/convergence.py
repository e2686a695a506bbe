"""Convergence study: parallel iterations versus sequence length, for every method, on
contracting, neutral and chaotic recurrences; each system's largest Lyapunov exponent;
warm starts; and the chaotic case end to end against sequential diffrax.

Five parts, each a table:

1. **Iterations versus `T`** (`10²…10⁵`). Every method runs with `fallback=False` and
    a cap (`--cap`, default 100), so that the count is the method's own: "≥ cap" where
    it did not converge within the cap. A row is skipped (and says so) when the same
    method already reached the cap at a smaller `T` on that system. Each system's
    largest Lyapunov exponent `λ` (per step, from a tangent vector carried along the
    sequential trajectory and renormalised every step) and the log-amplification
    `λ·T` over the horizon are printed beside it: `λ < 0` (contracting) gives counts
    that do not grow with `T`; `λ ≈ 0` (neutral) counts that grow slowly; `λ > 0`
    (chaotic) counts that grow with `T` until they hit the cap — parallel evaluation
    pays only while `λ·T` stays below a few units.
2. **Defaults** (`fallback=True`): the same solves as shipped, showing where the
    hopeless-case test stops the iteration and the exact fallback takes over (the
    iterations spent, and the step it restarted from), and that the answer equals the
    sequential one.
3. **Warm starts**: iterations (with `fallback=False`) from the constant guess, from
    a coarse sequential pass (RK4 with `⌈√T⌉` times longer steps, linearly
    interpolated; ODE systems only) and from the previous trajectory (the solution
    for parameters perturbed by 1%, as between two training steps).
4. **Defaults against sequential** (`--parts speed`, issue 14's table): the shipped
    defaults (`partime.ParallelSolver(diffrax.Tsit5(), num_steps=T)` with
    `partime.WindowController()`, one window over the horizon; `partime.scan`) on
    the RNNs (gains 0.9, 1.5), the damped pendulum, the pendulum, van der Pol
    (`μ = 1, 10`) over `[0, 100]` and Lorenz-63 over `[0, 20]`, `T = 10²…10⁵`
    (`--problems`, `--lengths`), against sequential diffrax on the same grid (or
    `jax.lax.scan`) measured in the same run, interleaved: parallel iterations,
    fallback, the solver's estimate `λ·T`, median speed-up, error (every row
    checks its answer first and is flagged WRONG otherwise), and the issue's goals,
    met or missed.
5. **Lorenz-63 end to end**: `2·10⁴` Tsit5 steps over 20 time units in one window,
    the default `partime.ParallelSolver()` against sequential `diffrax.Tsit5`
    (best of `--repeats` calls), and `fixed_point_solve` alone on the same Tsit5
    step map, with the iterations it spent before falling back.

Usage, from the repository root:

    python benchmarks/convergence.py           # everything; writes benchmarks/results/
    python benchmarks/convergence.py --quick   # a smoke test: 1-2 min (not run in CI)
    # issue 14's table (about 15 min on the shared CPU):
    python benchmarks/convergence.py --parts speed lorenz \\
        --out benchmarks/results/convergence-defaults-cpu.json

Results go to `benchmarks/results/convergence-<platform>.json` and `.md`; `--quick`
writes only with `--out`.
"""

import argparse
import functools
import math
import shlex
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import (
    environment,
    git_commit,
    markdown_table,
    max_rel_error,
    text_table,
    write_json,
)


jax.config.update("jax_enable_x64", True)

import partime  # noqa: E402


METHODS = {
    "Newton": partime.Newton,
    "QuasiNewton": partime.QuasiNewton,
    "Picard": partime.Picard,
    "Jacobi": partime.Jacobi,
    "ELK": partime.ELK,
    "QuasiELK": partime.QuasiELK,
}


# Systems ---------------------------------------------------------------------------


def rk4(vector_field, h):
    def step(y, t):
        k1 = vector_field(t, y)
        k2 = vector_field(t + h / 2, y + h / 2 * k1)
        k3 = vector_field(t + h / 2, y + h / 2 * k2)
        k4 = vector_field(t + h, y + h * k3)
        return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    return step


def _ode(vector_field, y0, h):
    """An ODE system: `(make(T, scale), kind)`; `scale` perturbs a parameter."""

    def make(length, scale=1.0):
        step = rk4(lambda t, y: vector_field(t, y, scale), h)
        return step, jnp.asarray(y0), jnp.arange(length) * h

    return make


def _lorenz(t, y, scale):
    x, yy, z = y
    return jnp.stack([10 * (yy - x), x * (28 * scale - z) - yy, x * yy - 8 / 3 * z])


def _van_der_pol(t, y, scale):
    x, v = y
    return jnp.stack([v, scale * (1 - x**2) * v - x])


def _pendulum(friction):
    def vector_field(t, y, scale):
        theta, omega = y
        return jnp.stack([omega, -scale * jnp.sin(theta) - friction * omega])

    return vector_field


def _rnn(gain, size=8):
    keys = jr.split(jr.PRNGKey(0), 4)
    weights = jr.normal(keys[0], (size, size)) / size**0.5
    weights = gain * weights / jnp.max(jnp.abs(jnp.linalg.eigvals(weights)))
    inputs = jr.normal(keys[1], (size, 2))
    noise = jr.normal(keys[3], (size, size)) / size**0.5

    def make(length, scale=1.0):
        w = weights + (scale - 1) * noise
        xs = jr.normal(keys[2], (length, 2))
        return (lambda h, x: jnp.tanh(w @ h + inputs @ x)), jnp.zeros(size), xs

    return make


# name: (make, kind, ODE step size or None)
SYSTEMS = {
    "rnn-0.9": (_rnn(0.9), "contracting", None),
    "damped-pendulum": (
        _ode(_pendulum(0.5), [2.5, 0.0], 0.01),
        "contracting",
        0.01,
    ),
    "rnn-1.5": (_rnn(1.5), "contracting, unstable Jacobians", None),
    "pendulum": (_ode(_pendulum(0.0), [2.5, 0.0], 0.01), "neutral", 0.01),
    "van-der-pol": (
        _ode(_van_der_pol, [2.0, 0.0], 0.01),
        "neutral (limit cycle)",
        0.01,
    ),
    "lorenz": (_ode(_lorenz, [1.0, 1.0, 1.0], 0.01), "chaotic", 0.01),
}


def sequential(step, init, xs):
    return jax.lax.scan(lambda c, x: (step(c, x),) * 2, init, xs)[1]


def lyapunov(step, init, xs):
    """Largest Lyapunov exponent per step along the sequential trajectory."""
    v0 = jr.normal(jr.PRNGKey(1), init.shape)

    def body(carry, x):
        s, v, total = carry
        s, v = jax.jvp(lambda a: step(a, x), (s,), (v,))
        norm = jnp.linalg.norm(v)
        return (s, v / norm, total + jnp.log(norm)), None

    start = (init, v0 / jnp.linalg.norm(v0), jnp.zeros(()))
    (_, _, total), _ = jax.lax.scan(body, start, xs)
    return total / jax.tree_util.tree_leaves(xs)[0].shape[0]


def solve(step, init, xs, method, guess=None):
    # `throw=False`: a method that reaches its cap is a result here (`stats.result`).
    fn = jax.jit(
        lambda i, x, g: partime.fixed_point_solve(
            step, i, x, method, guess=g, throw=False
        )
    )
    states, stats = fn(init, xs, guess)
    return jax.block_until_ready(states), stats


def coarse_guess(step_for_h, init, length, h, stride):
    """RK4 over `stride`-times longer steps, linearly interpolated to the fine grid."""
    num = math.ceil(length / stride)
    big = step_for_h(stride * h)
    coarse = sequential(big, init, jnp.arange(num) * stride * h)
    coarse = jnp.concatenate([init[None], coarse])
    times = (jnp.arange(length) + 1) / stride
    lower = jnp.clip(jnp.floor(times).astype(int), 0, num - 1)
    weight = (times - lower)[:, None]
    return (1 - weight) * coarse[lower] + weight * coarse[lower + 1]


# Parts ------------------------------------------------------------------------------


def part_iterations(systems, lengths, methods, cap):
    rows = []
    for name in systems:
        make, kind, h = SYSTEMS[name]
        capped = set()
        for length in lengths:
            step, init, xs = make(length)
            reference = sequential(step, init, xs)
            lam = float(jax.jit(lyapunov, static_argnums=0)(step, init, xs))
            for method_name in methods:
                row = {
                    "system": name,
                    "kind": kind,
                    "T": length,
                    "method": method_name,
                    "lyapunov_per_step": lam,
                    "lyapunov_per_time": None if h is None else lam / h,
                    "lyapunov_times_T": lam * length,
                    "cap": cap,
                }
                if method_name in capped:
                    row.update(iterations=None, converged=False, skipped=True)
                    rows.append(row)
                    continue
                method = METHODS[method_name](max_iters=cap, fallback=False)
                start = time.perf_counter()
                states, stats = solve(step, init, xs, method)
                seconds = time.perf_counter() - start
                converged = bool(stats.result == partime.RESULTS.successful)
                error = max_rel_error(states, reference)
                row.update(
                    iterations=int(stats.num_iterations),
                    converged=converged,
                    skipped=False,
                    error=error,
                    seconds_incl_compile=seconds,
                )
                if not converged:
                    capped.add(method_name)
                rows.append(row)
                print(
                    f"  {name:16s} T={length:<7d} {method_name:12s} "
                    + (f"{int(stats.num_iterations):4d}" if converged else " ≥cap")
                    + f"  λT={lam * length:9.2f}  err={error:.1e}",
                    flush=True,
                )
    return rows


def part_defaults(systems, lengths, methods):
    rows = []
    for name in systems:
        make, kind, _ = SYSTEMS[name]
        for length in lengths:
            step, init, xs = make(length)
            reference = sequential(step, init, xs)
            lam = float(jax.jit(lyapunov, static_argnums=0)(step, init, xs))
            for method_name in methods:
                method = METHODS[method_name]()
                states, stats = solve(step, init, xs, method)
                rows.append(
                    {
                        "system": name,
                        "T": length,
                        "method": method_name,
                        "cap": method.iteration_cap(length),
                        "iterations": int(stats.num_iterations),
                        "fallback_start": int(stats.fallback_start),
                        "fell_back": bool(stats.fell_back),
                        "lyapunov_times_T": lam * length,
                        "error": max_rel_error(states, reference),
                    }
                )
                print(
                    f"  {name:16s} T={length:<7d} {method_name:12s} "
                    f"it={int(stats.num_iterations):3d} "
                    f"fallback from {int(stats.fallback_start)}",
                    flush=True,
                )
    return rows


def part_warm_starts(systems, length, methods, cap):
    rows = []
    for name in systems:
        make, kind, h = SYSTEMS[name]
        step, init, xs = make(length)
        previous = sequential(*make(length, scale=1.01))
        guesses = {"constant": None, "previous trajectory": previous}
        if h is not None:
            vector_field = {
                "damped-pendulum": _pendulum(0.5),
                "pendulum": _pendulum(0.0),
                "van-der-pol": _van_der_pol,
                "lorenz": _lorenz,
            }[name]
            step_for_h = lambda hh: rk4(lambda t, y: vector_field(t, y, 1.0), hh)
            stride = math.ceil(math.sqrt(length))
            guesses["coarse pass"] = coarse_guess(step_for_h, init, length, h, stride)
        for method_name in methods:
            method = METHODS[method_name](max_iters=cap, fallback=False)
            row = {"system": name, "T": length, "method": method_name, "cap": cap}
            for guess_name, guess in guesses.items():
                _, stats = solve(step, init, xs, method, guess)
                converged = bool(stats.result == partime.RESULTS.successful)
                row[guess_name] = int(stats.num_iterations) if converged else None
            rows.append(row)
            print(f"  {name:16s} {method_name:12s} {row}", flush=True)
    return rows


def part_lorenz(repeats):
    import diffrax

    length, t1 = 20_000, 20.0
    y0 = jnp.array([1.0, 1.0, 1.0])
    term = diffrax.ODETerm(lambda t, y, args: _lorenz(t, y, 1.0))

    # Every function takes `y0` as an argument: closing over it lets XLA fold
    # constants, which moved diffrax's time by 2x here.
    def best(fn):
        jax.block_until_ready(fn(y0))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(y0))
            times.append(time.perf_counter() - start)
        return min(times)

    @jax.jit
    def sequential_diffrax(y0):
        return diffrax.diffeqsolve(
            term, diffrax.Tsit5(), 0.0, t1, t1 / length, y0, max_steps=length
        ).ys[-1]

    @jax.jit
    def parallel(y0):
        solution = diffrax.diffeqsolve(
            term,
            partime.ParallelSolver(num_steps=length),
            0.0,
            t1,
            t1,
            y0,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
        )
        return solution.ys[-1], solution.solver_state

    # The Tsit5 step map alone, as straight-line code from diffrax's Butcher tableau.
    tableau = diffrax.Tsit5().tableau
    a_rows = [np.asarray(row) for row in tableau.a_lower]
    b_sol, c = np.asarray(tableau.b_sol), np.asarray(tableau.c)

    def tsit5(y, x):
        ta, tb = x
        dt = tb - ta
        ks = [_lorenz(ta, y, 1.0)]
        for i, row in enumerate(a_rows):
            stage = y + dt * sum(row[j] * ks[j] for j in range(len(row)))
            ks.append(_lorenz(ta + c[i] * dt, stage, 1.0))
        return y + dt * sum(b_sol[j] * ks[j] for j in range(len(ks)))

    ts = jnp.linspace(0.0, t1, length + 1)
    xs = (ts[:-1], ts[1:])

    @jax.jit
    def fixed_point(y0):
        states, stats = partime.fixed_point_solve(tsit5, y0, xs, partime.Newton())
        return states[-1], stats.num_iterations, stats.fallback_start

    reference = sequential_diffrax(y0)
    t_seq = best(sequential_diffrax)
    t_par = best(parallel)
    t_fp = best(fixed_point)
    y_par, state = parallel(y0)
    y_fp, iterations, start = fixed_point(y0)
    result = {
        "T": length,
        "sequential_diffrax_s": t_seq,
        "parallel_solver_s": t_par,
        "parallel_solver_speedup": t_seq / t_par,
        "parallel_solver_iterations": int(state.num_iterations),
        "parallel_solver_fallbacks": int(state.num_fallbacks),
        "parallel_solver_error": max_rel_error(y_par, reference),
        "fixed_point_solve_s": t_fp,
        "fixed_point_solve_speedup": t_seq / t_fp,
        "fixed_point_solve_iterations": int(iterations),
        "fixed_point_solve_fallback_start": int(start),
        "fixed_point_solve_error": max_rel_error(y_fp, reference),
    }
    print("  " + ", ".join(f"{k}={v:.3g}" for k, v in result.items()), flush=True)
    return result


# The defaults against sequential (`--parts speed`) ------------------------------------

# The tolerance of "exact": the largest error relative to the reference's magnitude.
EXACT_RTOL = 1e-8
# The goals: van der Pol over [0, 100] at 10⁴ steps in at most this many
# iterations per window; Lorenz-63 at most this many times sequential diffrax's time
# (a speed-up of at least its inverse, 0.8).
VDP_ITERATIONS_PER_WINDOW = 10
VDP_GOAL_STEPS = 10_000
CHAOTIC_RATIO = 1.25
LORENZ_GOAL_STEPS = 20_000

# name: (vector field, y0, t1, parameter, kind), over [0, t1] with T Tsit5 steps.
SPEED_ODES = {
    "damped-pendulum": (_pendulum(0.5), [2.5, 0.0], 100.0, 1.0, "contracting"),
    "pendulum": (_pendulum(0.0), [2.5, 0.0], 100.0, 1.0, "neutral"),
    "van-der-pol μ=1": (_van_der_pol, [2.0, 0.0], 100.0, 1.0, "neutral"),
    "van-der-pol μ=10": (_van_der_pol, [2.0, 0.0], 100.0, 10.0, "neutral"),
    "lorenz": (_lorenz, [1.0, 1.0, 1.0], 20.0, 1.0, "chaotic"),
}
# name: kind; the recurrence of `SYSTEMS[name]`, solved by `partime.scan`.
SPEED_SCANS = {"rnn-0.9": "contracting", "rnn-1.5": "contracting"}
# The neutral rows of the defaults' table also run `window="auto"` (the default off a
# CPU) up to this T, counted and checked, not timed.
AUTO_ALONGSIDE_STEPS = 10_000
SPEED_PROBLEMS = [*SPEED_SCANS, *SPEED_ODES]


def _interleaved_medians(fns, args, repeats, budget_s):
    """Median wall time of each of `fns(*args)` (compiled and called before), calls
    interleaved so that a load change on the shared CPU hits every function alike:
    `repeats` rounds, fewer when they would take longer than `budget_s` — at least 3,
    or 1 when one round takes more than a third of it. Returns the medians and the
    rounds made."""
    times = [[] for _ in fns]
    for i in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - start)
        total = sum(map(sum, times))
        min_rounds = 1 if sum(t[0] for t in times) > budget_s / 3 else 3
        if i + 1 >= min_rounds and total > budget_s:
            break
    return [float(np.median(t)) for t in times], len(times[0])


def _fields(module):
    """The scalar fields of a statistics module, as Python numbers (whatever fields
    this version of partime has)."""
    return {
        name: np.asarray(value).item()
        for name, value in vars(module).items()
        if isinstance(value, jax.Array | int | float) and np.ndim(value) == 0
    }


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))


def _ode_term(name):
    field, _, _, parameter, _ = SPEED_ODES[name]
    import diffrax

    return diffrax.ODETerm(lambda t, y, args: field(t, y, parameter))


def sequential_solve(name, length, saveat):
    """`SPEED_ODES[name]` solved sequentially by diffrax's Tsit5 in `length` constant
    steps (the same grid up to rounding; diffrax's fastest way to step it: `StepTo`
    on the exact grid costs more). Jitted: `y0 -> (ys, result)`."""
    import diffrax

    t1 = SPEED_ODES[name][2]
    term = _ode_term(name)

    @jax.jit
    def solve(y0):
        sol = diffrax.diffeqsolve(
            term,
            diffrax.Tsit5(),
            0.0,
            t1,
            t1 / length,
            y0,
            saveat=saveat,
            max_steps=length,
            throw=False,
        )
        return sol.ys, sol.result

    return solve


def one_window_solve(name, length, saveat, **options):
    """`SPEED_ODES[name]` solved by the defaults: `ParallelSolver(Tsit5(),
    num_steps=length, **options)`, one window over the horizon through the
    documented recipe (`WindowController`, `dt0` the inner step, `max_steps=1`).
    Jitted: `y0 -> (ys, result, solver_state)`."""
    import diffrax

    t1 = SPEED_ODES[name][2]
    term = _ode_term(name)
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=length, **options)

    @jax.jit
    def solve(y0):
        sol = diffrax.diffeqsolve(
            term,
            solver,
            0.0,
            t1,
            t1 / length,
            y0,
            saveat=saveat,
            stepsize_controller=partime.WindowController(),
            max_steps=1,
            throw=False,
        )
        return sol.ys, sol.result, sol.solver_state

    return solve


def _speed_ode(name, length, window=None):
    import diffrax

    _, y0, t1, _, kind = SPEED_ODES[name]
    y0 = jnp.asarray(y0)
    # `--window` tries one (e.g. "auto"); the defaults pass none.
    extra = {} if window is None else {"window": window}
    sequential_diffrax = functools.partial(sequential_solve, name, length)
    parallel = functools.partial(one_window_solve, name, length, **extra)

    # Timed: the final state only (`SaveAt(ts=...)` makes every sequential step
    # look for save points: 3-4x slower). Checked: also 101 points of the inner grid
    # (every `T/100`-th step).
    final = diffrax.SaveAt(t1=True, solver_state=True)
    points = diffrax.SaveAt(ts=jnp.linspace(0.0, t1, 101))
    sequential_final, parallel_final = sequential_diffrax(final), parallel(final)
    compile_start = time.perf_counter()
    reference, ref_result = sequential_final(y0)
    ys, result, state = jax.block_until_ready(parallel_final(y0))
    first_s = time.perf_counter() - compile_start
    reference_points, ref_points_result = sequential_diffrax(points)(y0)
    ys_points, points_result, _ = parallel(points)(y0)
    row = {
        "problem": name,
        "solver": "ParallelSolver(Tsit5(), num_steps=T"
        + ("" if window is None else f", window={window!r}")
        + ") + WindowController()",
        "window": window,
        "reference": "diffrax.Tsit5, dt0=t1/T",
        "kind": kind,
        "T": length,
        "t1": t1,
        "reference_ok": all(
            r == diffrax.RESULTS.successful for r in (ref_result, ref_points_result)
        )
        and _finite((reference, reference_points)),
        "parallel_ok": all(
            r == diffrax.RESULTS.successful for r in (result, points_result)
        )
        and _finite((ys, ys_points)),
        "iterations": int(state.num_iterations),
        "fallback_windows": int(state.num_fallbacks),
        "fallback_steps": int(state.num_sequential_steps),
        # The inner steps solved together (the automatic window's final width).
        "width": int(state.window),
        "lyapunov_times_T": float(state.lyapunov) * t1,
        "state": _fields(state),
        "first_call_incl_compile_s": first_s,
    }
    fns = (lambda y: sequential_final(y)[0], lambda y: parallel_final(y)[0])
    return row, fns, (y0,), (ys, ys_points), (reference, reference_points)


def _speed_scan(name, length, window=None):
    make, _, _ = SYSTEMS[name]
    step, init, xs = make(length)
    cell = lambda h, x: (step(h, x),) * 2
    # The defaults pass no `window`; `--window` tries one (e.g. "auto").
    extra = {} if window is None else {"window": window}
    scan_seq = jax.jit(lambda init, xs: jax.lax.scan(cell, init, xs)[1])
    scan_par = jax.jit(
        lambda init, xs: partime.scan(
            cell, init, xs, return_stats=True, throw=False, **extra
        )
    )
    compile_start = time.perf_counter()
    reference = scan_seq(init, xs)
    _, ys, stats = jax.block_until_ready(scan_par(init, xs))
    first_s = time.perf_counter() - compile_start
    row = {
        "problem": name,
        "solver": "partime.scan(f, init, xs"
        + ("" if window is None else f", window={window!r}")
        + ")",
        "reference": "jax.lax.scan",
        "window": window,
        "kind": SPEED_SCANS[name],
        "T": length,
        "reference_ok": _finite(reference),
        "parallel_ok": bool(stats.result == partime.RESULTS.successful) and _finite(ys),
        "iterations": int(stats.num_iterations),
        "fallback_windows": int(stats.fell_back),
        "fallback_steps": int(stats.num_sequential_steps),
        "width": int(stats.window),
        "lyapunov_times_T": float(stats.lyapunov) * length,
        "state": _fields(stats),
        "first_call_incl_compile_s": first_s,
    }
    fns = (scan_seq, lambda i, x: scan_par(i, x)[1])
    return row, fns, (init, xs), ys, reference


def _auto_alongside(name, length, reference):
    """`window="auto"` (the default off a CPU) on a row of the defaults' table:
    its counts and its error (one call after the one that compiles; not timed)."""
    auto, _, _, ys, _ = _speed_ode(name, length, "auto")
    error = max_rel_error(ys, reference) if auto["parallel_ok"] else math.inf
    keys = ["iterations", "width", "fallback_windows", "fallback_steps"]
    keys += ["lyapunov_times_T", "parallel_ok", "first_call_incl_compile_s"]
    out = {k: auto[k] for k in keys}
    out.update(T=length, error=error, exact=auto["parallel_ok"] and error <= EXACT_RTOL)
    return out


def _per_window(row):
    """Iterations per window: `iterations / (T / width)`. A schedule that solves
    `width` steps together (the automatic window, once narrowed, works as a sliding
    window of `width` steps) spends this many iterations per `width` steps it moves
    through; for one window over the horizon, all of its iterations."""
    return row["iterations"] * row["width"] / row["T"]


def _goals(row):
    """The issue's goals that apply to this row: `[(goal, met)]`; those of the
    automatic window run alongside (`row["auto"]`) prefixed `auto:`."""
    goals = [("exact", row["exact"])]
    runs = [("", row)] + ([("auto: ", row["auto"])] if "auto" in row else [])
    for prefix, run in runs:
        if prefix:
            goals.append((prefix + "exact", run["exact"]))
        if row["kind"] in ("contracting", "neutral"):
            goals.append((prefix + "no fallback", run["fallback_windows"] == 0))
        if row["problem"].startswith("van-der-pol") and row["T"] == VDP_GOAL_STEPS:
            # Converged, not given up after a few iterations.
            goals.append(
                (
                    f"{prefix}converged in ≤ {VDP_ITERATIONS_PER_WINDOW} it/window",
                    run["fallback_windows"] == 0
                    and _per_window(run) <= VDP_ITERATIONS_PER_WINDOW,
                )
            )
    if row["kind"] == "chaotic":
        speedup = row.get("speedup")
        goals.append(
            (
                f"speed-up ≥ {1 / CHAOTIC_RATIO:g}",
                speedup is not None and speedup >= 1 / CHAOTIC_RATIO,
            )
        )
    return goals


def part_speed(problems, lengths, extra_lengths, repeats, budget_s, window):
    rows = []
    for name in problems:
        for length in sorted(lengths + extra_lengths.get(name, [])):
            if name in SPEED_SCANS:
                built = _speed_scan(name, length, window)
            else:
                built = _speed_ode(name, length, window)
            row, fns, args, ys, reference = built
            if (
                window is None
                and row["kind"] == "neutral"
                and row["reference_ok"]
                and length <= AUTO_ALONGSIDE_STEPS
            ):
                row["auto"] = _auto_alongside(name, length, reference)
            if not row["reference_ok"]:
                # The sequential solve itself fails (e.g. Tsit5 unstable at this
                # step): there is no answer to check against, and nothing to time.
                row.update(error=None, exact=False, status="reference failed")
            else:
                error = max_rel_error(ys, reference) if row["parallel_ok"] else math.inf
                exact = row["parallel_ok"] and error <= EXACT_RTOL
                (t_seq, t_par), calls = _interleaved_medians(
                    fns, args, repeats, budget_s
                )
                row.update(
                    error=error,
                    exact=exact,
                    status="exact" if exact else "WRONG",
                    sequential_s=t_seq,
                    parallel_s=t_par,
                    speedup=t_seq / t_par,
                    timed_calls=calls,
                )
            row["goals"] = (
                [{"goal": g, "met": bool(m)} for g, m in _goals(row)]
                if row["reference_ok"]
                else []
            )
            rows.append(row)
            if row["status"] == "WRONG":
                print(
                    f"!!! WRONG ANSWER: {name} T={length}: error {row['error']:.3e} "
                    f"> {EXACT_RTOL:g} or a failed solve (parallel_ok="
                    f"{row['parallel_ok']})",
                    flush=True,
                )
            print("  " + _speed_line(row), flush=True)
    return rows


def _speed_line(row):
    text = f"{row['problem']:17s} T={row['T']:<7d} {row['status']:16s}"
    text += f" it={row['iterations']:<4d} width={row['width']:<6d}"
    text += f" it/window={_per_window(row):<5.1f} fb={row['fallback_steps']}"
    text += f" λT={row['lyapunov_times_T']:+.3g}"
    if "auto" in row:
        text += f" auto=({_auto_cell(row['auto'])})"
    if "speedup" in row:
        text += f" seq={1e3 * row['sequential_s']:.2f}ms"
        text += f" par={1e3 * row['parallel_s']:.2f}ms speed-up={row['speedup']:.2f}"
        text += f" err={row['error']:.1e}"
    return text


def speed_table(rows):
    header = ["problem", "kind", "T", "λ·T", "iterations (depth)", "width"]
    header += ["iterations per window", "fallback steps"]
    header += ["window='auto': iterations, width, it/window, fallback steps"]
    header += ["sequential (ms)", "defaults (ms)", "speed-up"]
    header += ["error", "answer", "goals"]
    body = []
    for r in rows:
        if "speedup" in r:
            timing = [
                f"{1e3 * r['sequential_s']:.2f}",
                f"{1e3 * r['parallel_s']:.2f}",
                f"{r['speedup']:.2f}",
            ]
        else:
            timing = ["—", "—", "—"]
        goals = "; ".join(
            f"{g['goal']} {'✓' if g['met'] else '✗ MISSED'}" for g in r["goals"]
        )
        answer = {
            "exact": "exact",
            "WRONG": "**WRONG**",
            "reference failed": "— (sequential Tsit5 fails: NaN/inf); defaults: "
            + ("**returned success**" if r["parallel_ok"] else "failed too"),
        }[r["status"]]
        body.append(
            [
                _label(r),
                r["kind"],
                _power(r["T"]),
                f"{r['lyapunov_times_T']:+.1f}",
                str(r["iterations"]),
                str(r["width"]),
                f"{_per_window(r):.1f}",
                str(r["fallback_steps"]),
                _auto_cell(r.get("auto")),
                *timing,
                "—" if r["error"] is None else f"{r['error']:.1e}",
                answer,
                goals or "—",
            ]
        )
    return header, body


def _auto_cell(auto):
    if auto is None:
        return "—"
    cell = f"{auto['iterations']}, {auto['width']}, {_per_window(auto):.1f}"
    cell += f", {auto['fallback_steps']}"
    if not auto["exact"]:
        cell += f" (**WRONG**: {auto['error']:.1e})"
    return cell


SPEED_NOTE = """\
Every row is solved twice on the same grid: by the defaults
(`partime.ParallelSolver(diffrax.Tsit5(), num_steps=T)` with
`stepsize_controller=partime.WindowController()`, `dt0 = t1 / T`, `max_steps=1`: one
window over the horizon, no method or window set; `partime.scan(f, init, xs)` for
the RNNs) and sequentially (`diffrax.Tsit5()` with the constant step `t1 / T`;
`jax.lax.scan`), in float64. Each row first checks the answer: `error` is the largest
error against sequential relative to the largest magnitude, at `t1` and at 101
points of the inner grid (every `T/100`-th step; every step for the RNNs); `exact`
means a successful solve within {rtol:g}, anything else is flagged **WRONG**. `λ·T`: the
solver's own estimate of the log-amplification over the horizon
(`ParallelSolverState.lyapunov · t1`, `Stats.lyapunov · T`; NaN for a scan that
fell back before 8 steps converged). `iterations`: parallel
iterations in total (the depth). `width`: the steps solved together
(`ParallelSolverState.window`, `Stats.window`): `T` for one window over the
horizon; for the automatic window, the width it narrowed to, after which it works
as a sliding window of `width` steps. `iterations per window`: `iterations / (T /
width)`, the iterations spent per `width` steps moved through (all of them when
`width = T`; where the fallback computed some steps, the window moved through
fewer than `T` in parallel, and the column understates it). `fallback steps`:
steps computed by the exact sequential fallback
(`ParallelSolverState.num_sequential_steps`, `Stats.num_sequential_steps`).
`window='auto'`: in the table of the defaults (`window=None`: the whole window on a
CPU, `'auto'` on accelerators), each neutral row up to T = 10⁴ is also solved with
`window='auto'`, what the defaults do off a CPU, and checked the same way (not
timed); its goals are those marked `auto:`.

Timing: the CPU has 2 cores and was shared with 4 other engineers' jobs (load
varies during the run): times are medians of interleaved calls (sequential,
defaults, sequential, ...; up to `--repeats` rounds, fewer past {budget:g} s per
row: at least 3, or 1 where one round takes over a third of that; the JSON has the
counts), after the calls that compiled and checked them. The ODE solves timed
return the final state only (`SaveAt(t1=True)`: with `SaveAt(ts=...)` every
sequential diffrax step looks for save points, 3–4× slower); the scans return every
output. Read the speed-up (sequential time / defaults' time: above 1 the defaults
are faster), not the absolute times; rows of a few milliseconds moved by up to 2×
between runs under this load. On a CPU the parallel iteration does more work than
the sequential loop: the speed-ups show the cost of the defaults here, not on an
accelerator.

Goals (issue 14): every row exact; no contracting or neutral row falls back; van der
Pol over [0, 100] at 10⁴ steps converged (no fallback) in at most 10 iterations per
window (the column above); Lorenz-63 at most 1.25× sequential diffrax's time, a
speed-up of at least 0.8 (the issue's set-up is 2·10⁴ steps; checked at every
`T`). Rows whose sequential solve fails (Tsit5 is unstable at the step `t1 / T`:
van der Pol and Lorenz at the coarsest grids) have no answer to check and are not
timed; they say whether the defaults reported the failure too.

"""


def _label(row):
    """The problem, with its horizon or the scan's window."""
    label = row["problem"]
    if "t1" in row:
        label += f" [0, {row['t1']:g}]"
    if row.get("window") is not None:
        label += f" (window={row['window']!r})"
    return label


def _power(n):
    """`n` as `1e4` or `2e4` when it has one significant digit."""
    mantissa, exponent = f"{n:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}" if float(f"{n:.0e}") == n else str(n)


def _goal_summary(rows):
    """One line per goal: the rows that miss it."""
    lines = []
    names = dict.fromkeys(g["goal"] for r in rows for g in r["goals"])
    for goal in names:
        checked = [r for r in rows for g in r["goals"] if g["goal"] == goal]
        missed = [
            f"{r['problem']} T={_power(r['T'])}"
            for r in checked
            for g in r["goals"]
            if g["goal"] == goal and not g["met"]
        ]
        status = "met" if not missed else "MISSED by " + ", ".join(missed)
        lines.append(f"- {goal}: {len(checked)} rows, {status}")
    failed = [
        f"{r['problem']} T={_power(r['T'])}" for r in rows if not r["reference_ok"]
    ]
    if failed:
        lines.append(
            "- not checked (the sequential solve itself fails): " + ", ".join(failed)
        )
    return "\n".join(lines) + "\n"


def _partime_source():
    """Where partime was imported from, and that tree's git commit."""
    path = Path(partime.__file__).parent
    return {"path": str(path), "commit": git_commit(path, "%h %s")}


def _command(argv):
    """The command line that ran this script, from the repository root, with the
    partime tree it imported."""
    args = sys.argv[1:] if argv is None else argv
    source = Path(partime.__file__).parent.parent
    return f"PYTHONPATH={source} python benchmarks/convergence.py {shlex.join(args)}"


# Tables -----------------------------------------------------------------------------


def lorenz_table(result):
    """Seconds, speed-up (sequential diffrax time / this time: above 1 is faster),
    iterations and error of the Lorenz-63 solves."""
    return markdown_table(
        ["", "seconds", "speed-up over sequential diffrax", "iterations", "error"],
        [
            [
                "sequential diffrax",
                f"{result['sequential_diffrax_s']:.4f}",
                "1",
                "—",
                "—",
            ],
            [
                "ParallelSolver()",
                f"{result['parallel_solver_s']:.4f}",
                f"{result['parallel_solver_speedup']:.2f}",
                str(result["parallel_solver_iterations"]),
                f"{result['parallel_solver_error']:.1e}",
            ],
            [
                "fixed_point_solve (Tsit5 map)",
                f"{result['fixed_point_solve_s']:.4f}",
                f"{result['fixed_point_solve_speedup']:.2f}",
                str(result["fixed_point_solve_iterations"]),
                f"{result['fixed_point_solve_error']:.1e}",
            ],
        ],
    )


def _lyapunov_table(rows, lengths):
    """Rows = systems; the exponent per step and per unit time (from the longest run)
    and the log-amplification `λ·T` at every `T`."""
    header = ["system", "kind", "λ / step", "λ / time unit"]
    header += [f"λ·T, T={n:.0e}" for n in lengths]
    body = []
    for name in dict.fromkeys(r["system"] for r in rows):
        mine = [r for r in rows if r["system"] == name]
        longest = max(mine, key=lambda r: r["T"])
        by_length = {r["T"]: r["lyapunov_times_T"] for r in mine}
        line = [
            name,
            longest["kind"],
            f"{longest['lyapunov_per_step']:+.1e}",
            "—"
            if longest["lyapunov_per_time"] is None
            else f"{longest['lyapunov_per_time']:+.2f}",
        ]
        line += [f"{by_length[n]:+.0f}" if n in by_length else "" for n in lengths]
        body.append(line)
    return header, body


def _compact_tables(rows, lengths, methods):
    """One table per method: rows = systems, columns = T."""
    tables = {}
    for m in methods:
        header = ["system"] + [f"T={n:.0e}" for n in lengths]
        body = []
        for name in dict.fromkeys(r["system"] for r in rows):
            line = [name] + [""] * len(lengths)
            for row in rows:
                if row["system"] != name or row["method"] != m:
                    continue
                col = 1 + lengths.index(row["T"])
                if row["skipped"] or not row["converged"]:
                    line[col] = f"≥ {row['cap']}"
                else:
                    line[col] = str(row["iterations"])
            body.append(line)
        tables[m] = (header, body)
    return tables


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cap", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=str, default=None)
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["iterations", "defaults", "warm", "speed", "lorenz"],
    )
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=SPEED_PROBLEMS,
        default=None,
        help="the problems of `--parts speed` (default: all)",
    )
    parser.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=None,
        help="the T of `--parts speed` (default: 1e2 1e3 1e4 1e5)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=10.0,
        help="seconds of timed calls per row of `--parts speed` (at least 3 rounds)",
    )
    parser.add_argument(
        "--window",
        type=lambda v: v if v == "auto" else int(v),
        default=None,
        help="`window=...` of `partime.scan` and `partime.ParallelSolver` in the rows "
        "of `--parts speed` (default: not passed, the defaults)",
    )
    args = parser.parse_args(argv)

    methods = list(METHODS)
    warm_methods = ["Newton", "QuasiNewton", "ELK"]
    if args.quick:
        # A smoke test: the methods that compile fastest, two systems, no end-to-end.
        methods = ["Newton", "QuasiNewton", "Jacobi"]
        warm_methods = ["Newton"]
        lengths = [100, 1000]
        systems = ["rnn-0.9", "lorenz"]
        warm_length = 1000
        speed_problems, speed_lengths = ["rnn-0.9", "damped-pendulum"], [100]
        parts = [p for p in args.parts if p not in ("lorenz", "defaults")]
    else:
        lengths = [100, 1000, 10_000, 100_000]
        systems = list(SYSTEMS)
        warm_length = 10_000
        speed_problems, speed_lengths = SPEED_PROBLEMS, lengths
        parts = args.parts
    speed_problems = args.problems or speed_problems
    speed_lengths = args.lengths or speed_lengths

    payload = {
        "environment": environment(),
        "partime": _partime_source(),
        "command": _command(argv),
        "cap": args.cap,
        "lengths": lengths,
    }
    md = ["# Convergence study\n\n"]
    md.append(
        f"Written by `{payload['command']}` with partime from "
        f"`{payload['partime']['path']}` (commit "
        f"`{payload['partime']['commit']}`), at {payload['environment']['date']}.\n"
    )
    start = time.perf_counter()
    if "iterations" in parts:
        print("Iterations versus T (fallback=False):", flush=True)
        rows = part_iterations(systems, lengths, methods, args.cap)
        payload["iterations"] = rows
        md.append(f"\n## Iterations versus T (cap {args.cap}, no fallback)\n")
        header, body = _lyapunov_table(rows, lengths)
        md.append("\n### Largest Lyapunov exponents\n\n" + markdown_table(header, body))
        print("\n" + text_table(header, body), flush=True)
        for m, (header, body) in _compact_tables(rows, lengths, methods).items():
            md.append(f"\n### {m}\n\n" + markdown_table(header, body))
            print(f"\n{m}\n" + text_table(header, body), flush=True)
    if "defaults" in parts:
        print("\nDefaults (fallback=True):", flush=True)
        default_lengths = lengths[:3] if not args.quick else lengths
        rows = part_defaults(systems, default_lengths, methods)
        payload["defaults"] = rows
        header = ["system", "T", "λ·T", "method", "cap", "iterations"]
        header += ["fallback from", "error"]
        body = [
            [
                r["system"],
                str(r["T"]),
                f"{r['lyapunov_times_T']:+.0f}",
                r["method"],
                str(r["cap"]),
                str(r["iterations"]),
                "—" if not r["fell_back"] else str(r["fallback_start"]),
                f"{r['error']:.1e}",
            ]
            for r in rows
        ]
        md.append("\n## Defaults (with the hopeless-case test and fallback)\n\n")
        md.append(
            "`error`: the largest relative error against `lax.scan`. Where "
            "`λ·T ≳ 36` (`e^{λT}·ε_64 > 1`), rounding differences between any two "
            "compilations of the same recurrence grow to the size of the attractor: "
            "no method, sequential included, determines that trajectory, and the "
            "column measures the chaos, not the solver.\n\n"
        )
        md.append(markdown_table(header, body))
    if "warm" in parts:
        print("\nWarm starts (fallback=False):", flush=True)
        rows = part_warm_starts(systems, warm_length, warm_methods, args.cap)
        payload["warm_starts"] = rows
        header = ["system", "T", "method", "constant", "coarse pass", "previous"]
        fmt = lambda v: f"≥ {args.cap}" if v is None else str(v)
        body = [
            [
                r["system"],
                str(r["T"]),
                r["method"],
                fmt(r["constant"]),
                fmt(r["coarse pass"]) if "coarse pass" in r else "—",
                fmt(r["previous trajectory"]),
            ]
            for r in rows
        ]
        md.append(f"\n\n## Warm starts (iterations, cap {args.cap})\n\n")
        md.append(markdown_table(header, body))
        print(text_table(header, body), flush=True)
    if "speed" in parts:
        print("\nDefaults against sequential:", flush=True)
        # Lorenz-63 also at the 2·10⁴ steps, unless `--lengths` is given.
        extra = {} if args.lengths or args.quick else {"lorenz": [LORENZ_GOAL_STEPS]}
        rows = part_speed(
            speed_problems,
            speed_lengths,
            extra,
            args.repeats,
            args.budget,
            args.window,
        )
        payload["speed"] = rows
        header, body = speed_table(rows)
        md.append(
            "\n\n## The defaults against sequential (one window, median times)\n\n"
        )
        md.append(SPEED_NOTE.format(rtol=EXACT_RTOL, budget=args.budget))
        md.append(markdown_table(header, body))
        md.append("\n" + _goal_summary(rows))
        print(text_table(header, body), flush=True)
        print(_goal_summary(rows), flush=True)
    if "lorenz" in parts:
        print("\nLorenz-63 end to end:", flush=True)
        result = part_lorenz(args.repeats)
        payload["lorenz"] = result
        md.append("\n\n## Lorenz-63, 2·10⁴ Tsit5 steps, one window\n\n")
        md.append(lorenz_table(result))
    payload["seconds"] = time.perf_counter() - start
    print(f"\ntotal {payload['seconds']:.0f} s", flush=True)

    out = args.out
    if out is None and not args.quick:
        platform = jax.devices()[0].platform
        out = Path(__file__).parent / "results" / f"convergence-{platform}.json"
    if out is not None:
        out = Path(out)
        write_json(out, payload)
        out.with_suffix(".md").write_text("".join(md))
        print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
