"""Convergence study: parallel iterations versus sequence length, for every method, on
contracting, neutral and chaotic recurrences; each system's largest Lyapunov exponent;
warm starts; and the chaotic case end to end against sequential diffrax.

Four parts, each a table:

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
4. **Defaults against sequential** (`--parts speed`): the shipped defaults
    (`partime.ParallelSolver()` with one window, `partime.scan`) on a chaotic, a
    neutral and two contracting problems, against sequential diffrax on the same
    inner grid (or `jax.lax.scan`) measured in the same run, interleaved: parallel
    iterations, steps computed by the fallback, the estimate `λ·T`, median time
    ratio, and error (every row checks its answer first).
5. **Lorenz-63 end to end**: `2·10⁴` Tsit5 steps over 20 time units in one window,
    the default `partime.ParallelSolver()` against sequential `diffrax.Tsit5`
    (best of `--repeats` calls), and `fixed_point_solve` alone on the same Tsit5
    step map, with the iterations it spent before falling back.

Usage, from the repository root:

    python benchmarks/convergence.py           # everything; writes benchmarks/results/
    python benchmarks/convergence.py --quick   # a smoke test: < 1 min

Results go to `benchmarks/results/convergence-<platform>.json` and `.md`; `--quick`
writes only with `--out`.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import environment, markdown_table, max_rel_error, text_table, write_json


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
    fn = jax.jit(lambda i, x, g: partime.fixed_point_solve(step, i, x, method, guess=g))
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


def _interleaved_medians(fns, args, repeats):
    """Median wall time of each of `fns(*args)`, calls interleaved so that a load
    change on the shared CPU hits every function alike."""
    for fn in fns:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def part_speed(repeats):
    import diffrax

    rows = []
    odes = {
        # name: (vector field, y0, t1, inner steps, kind)
        "lorenz": (_lorenz, [1.0, 1.0, 1.0], 20.0, 20_000, "chaotic"),
        "pendulum": (_pendulum(0.0), [2.5, 0.0], 20.0, 2_000, "neutral"),
        "damped-pendulum": (_pendulum(0.5), [2.5, 0.0], 20.0, 2_000, "contracting"),
    }
    for name, (field, y0, t1, num_steps, kind) in odes.items():
        term = diffrax.ODETerm(lambda t, y, args, field=field: field(t, y, 1.0))
        y0 = jnp.asarray(y0)

        @jax.jit
        def sequential_diffrax(y0, term=term, t1=t1, num_steps=num_steps):
            # The same grid up to rounding, with a constant step: diffrax's fastest
            # way to step it (`StepTo` on the exact grid costs more).
            return diffrax.diffeqsolve(
                term,
                diffrax.Tsit5(),
                0.0,
                t1,
                t1 / num_steps,
                y0,
                max_steps=num_steps,
            ).ys[-1]

        @jax.jit
        def parallel(y0, term=term, t1=t1, num_steps=num_steps):
            solution = diffrax.diffeqsolve(
                term,
                partime.ParallelSolver(num_steps=num_steps),
                0.0,
                t1,
                t1,
                y0,
                saveat=diffrax.SaveAt(t1=True, solver_state=True),
                max_steps=1,
            )
            return solution.ys[-1], solution.solver_state

        reference = sequential_diffrax(y0)
        y_par, state = parallel(y0)
        error = max_rel_error(y_par, reference)
        t_seq, t_par = _interleaved_medians(
            [sequential_diffrax, lambda y: parallel(y)[0]], (y0,), repeats
        )
        rows.append(
            {
                "problem": f"{name} (Tsit5, t1={t1:g})",
                "kind": kind,
                "steps": num_steps,
                "reference": "diffrax",
                "iterations": int(state.num_iterations),
                "fallback_steps": num_steps if int(state.num_fallbacks) else 0,
                "lyapunov_times_T": float(state.lyapunov) * t1,
                "sequential_s": t_seq,
                "parallel_s": t_par,
                "ratio": t_par / t_seq,
                "error": error,
            }
        )
        print("  " + str(rows[-1]), flush=True)
    make, kind, _ = SYSTEMS["rnn-0.9"]
    length = 10_000
    step, init, xs = make(length)
    cell = lambda h, x: (step(h, x),) * 2
    scan_seq = jax.jit(lambda init, xs: jax.lax.scan(cell, init, xs)[1])
    scan_par = jax.jit(lambda init, xs: partime.scan(cell, init, xs, return_stats=True))
    reference = scan_seq(init, xs)
    _, ys, stats = scan_par(init, xs)
    error = max_rel_error(ys, reference)
    t_seq, t_par = _interleaved_medians(
        [scan_seq, lambda i, x: scan_par(i, x)[1]], (init, xs), repeats
    )
    rows.append(
        {
            "problem": "rnn-0.9 (partime.scan)",
            "kind": kind,
            "steps": length,
            "reference": "lax.scan",
            "iterations": int(stats.num_iterations),
            "fallback_steps": int(stats.num_sequential_steps),
            "lyapunov_times_T": float(stats.lyapunov) * length,
            "sequential_s": t_seq,
            "parallel_s": t_par,
            "ratio": t_par / t_seq,
            "error": error,
        }
    )
    print("  " + str(rows[-1]), flush=True)
    return rows


def speed_table(rows):
    header = ["problem", "kind", "steps", "λ·T", "iterations", "fallback steps"]
    header += ["sequential (ms)", "defaults (ms)", "time / sequential", "error"]
    body = [
        [
            r["problem"],
            r["kind"],
            str(r["steps"]),
            f"{r['lyapunov_times_T']:+.1f}",
            str(r["iterations"]),
            str(r["fallback_steps"]),
            f"{1e3 * r['sequential_s']:.2f} ({r['reference']})",
            f"{1e3 * r['parallel_s']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['error']:.1e}",
        ]
        for r in rows
    ]
    return header, body


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
        parts = [p for p in args.parts if p not in ("lorenz", "defaults", "speed")]
    else:
        lengths = [100, 1000, 10_000, 100_000]
        systems = list(SYSTEMS)
        warm_length = 10_000
        parts = args.parts

    payload = {"environment": environment(), "cap": args.cap, "lengths": lengths}
    md = ["# Convergence study\n"]
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
        rows = part_speed(args.repeats)
        payload["speed"] = rows
        header, body = speed_table(rows)
        md.append("\n\n## Defaults against sequential (one window, median times)\n\n")
        md.append(
            "Measured on a shared, loaded 2-core CPU (other jobs running): the times "
            "are medians of interleaved calls, and the ratio (defaults / sequential, "
            "below 1 is faster) is the figure to read. `λ·T`: the solver's own "
            "estimate (`ParallelSolverState.lyapunov`, `Stats.lyapunov`). The "
            "chaotic window goes to the sequential fallback without an iteration.\n\n"
        )
        md.append(markdown_table(header, body))
        print(text_table(header, body), flush=True)
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
