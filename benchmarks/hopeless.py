"""The hopeless-case test's trade-off: patience with predictable recurrences whose
first updates go badly, against iterations wasted on chaotic ones (issue 14).

Every candidate rule of the test (`partime._loop._HopelessRule`; set before each
solve is traced) runs the same problems with the defaults otherwise:

- *predictable* (they should converge without the fallback): the RNN of
    `benchmarks/convergence.py` with gain 1.5 (`partime.scan`; unstable Jacobians at
    the constant guess, contracting along the trajectory), `T = 10³, 10⁴, 10⁵`; the
    damped pendulum over `[0, 100]`, `T = 10², 10³, 10⁴`, and van der Pol (`μ = 1`) over
    `[0, 100]`, `T = 10³` (`partime.ParallelSolver(diffrax.Tsit5(), num_steps=T)`,
    one window, as in `convergence.py --parts speed`; this van der Pol window does
    not converge within Newton's cap from any guess: it must fall back, the row
    shows the iterations that costs);
- *chaotic* (they should fall back after few iterations, exactly): Lorenz-63 over
    `[0, 20]` in `2·10⁴` Tsit5 steps through `ParallelSolver` (the defaults: its
    chaos test skips the iteration, so the rule is not used; and with
    `coarse_steps=0`, no chaos test), and through `partime.scan` on RK4 with
    `h = 0.01`, `T = 10³, 10⁴`; the logistic map (`r = 3.9`) and the Hénon map
    (`a = 1.4, b = 0.3`), `T = 10³, 10⁴`.

Columns: parallel iterations (the depth), whether the fallback ran, the speed-up
over the sequential solve (`jax.lax.scan`; sequential `diffrax.Tsit5` on the same
grid), median of interleaved calls, and the error against it (largest, relative to
the largest magnitude; "exact" within 1e-8). Each row checks its answer before
timing.

Usage, from the repository root (about 20 min on the shared 2-core CPU):

    python benchmarks/hopeless.py      # writes benchmarks/results/hopeless-<platform>.*
"""

import argparse
import math
import sys
import time
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from _common import environment, markdown_table, max_rel_error, text_table, write_json


jax.config.update("jax_enable_x64", True)

from convergence import (  # noqa: E402
    one_window_solve,
    sequential_solve,
    SPEED_ODES,
    SYSTEMS,
)

import partime  # noqa: E402
import partime._loop as loop  # noqa: E402


Rule = loop._HopelessRule
RULES = {
    "before": Rule(
        max_rejections=2,
        rejections_wait=True,
        frontier=False,
        restart_trusted_only=False,
        contracting=False,
        horizon_growth=None,
    ),
    "more patience": Rule(
        patience=0.25,
        max_rejections=4,
        rejections_wait=True,
        frontier=False,
        restart_trusted_only=False,
        contracting=False,
        horizon_growth=None,
    ),
    "no rejection limit": Rule(
        rejections_wait=True,
        frontier=False,
        restart_trusted_only=False,
        contracting=False,
        horizon_growth=None,
    ),
    "rejections wait": Rule(
        frontier=False,
        restart_trusted_only=False,
        contracting=False,
        horizon_growth=None,
    ),
    "+ frontier": Rule(
        restart_trusted_only=False, contracting=False, horizon_growth=None
    ),
    "+ restart": Rule(contracting=False, horizon_growth=None),
    "+ contracting prefix": Rule(horizon_growth=None),
    "+ horizon growth": Rule(horizon_growth="always"),
    "+ growth unless chaotic (chosen)": Rule(),
}
CHOSEN = "+ growth unless chaotic (chosen)"
assert RULES[CHOSEN] == loop._HOPELESS
EXACT_RTOL = 1e-8


def _logistic(length, r=3.9):
    cell = lambda x, _: (r * x * (1 - x),) * 2
    return cell, jnp.array([0.3]), jnp.zeros((length, 0))


def _henon(length, a=1.4, b=0.3):
    def cell(s, _):
        s = jnp.stack([1 - a * s[0] ** 2 + s[1], b * s[0]])
        return s, s

    return cell, jnp.array([0.1, 0.1]), jnp.zeros((length, 0))


def _from_study(name):
    def make(length):
        step, init, xs = SYSTEMS[name][0](length)
        return (lambda c, x: (step(c, x),) * 2), init, xs

    return make


# name: (kind, how, make or SPEED_ODES key, T, ParallelSolver options)
PROBLEMS = [
    ("rnn gain 1.5", "predictable", "scan", _from_study("rnn-1.5"), 1000, {}),
    ("rnn gain 1.5", "predictable", "scan", _from_study("rnn-1.5"), 10000, {}),
    ("rnn gain 1.5", "predictable", "scan", _from_study("rnn-1.5"), 100000, {}),
    ("damped pendulum [0, 100]", "predictable", "ode", "damped-pendulum", 100, {}),
    ("damped pendulum [0, 100]", "predictable", "ode", "damped-pendulum", 1000, {}),
    ("damped pendulum [0, 100]", "predictable", "ode", "damped-pendulum", 10000, {}),
    ("van der Pol μ=1 [0, 100]", "neutral", "ode", "van-der-pol μ=1", 1000, {}),
    ("lorenz [0, 20] ParallelSolver", "chaotic", "ode", "lorenz", 20000, {}),
    (
        "lorenz [0, 20] ParallelSolver(coarse_steps=0)",
        "chaotic",
        "ode",
        "lorenz",
        20000,
        {"coarse_steps": 0},
    ),
    ("lorenz RK4 h=0.01 scan", "chaotic", "scan", _from_study("lorenz"), 1000, {}),
    ("lorenz RK4 h=0.01 scan", "chaotic", "scan", _from_study("lorenz"), 10000, {}),
    ("logistic r=3.9 scan", "chaotic", "scan", _logistic, 1000, {}),
    ("logistic r=3.9 scan", "chaotic", "scan", _logistic, 10000, {}),
    ("hénon scan", "chaotic", "scan", _henon, 1000, {}),
    ("hénon scan", "chaotic", "scan", _henon, 10000, {}),
]


def _interleaved_medians(fns, args, budget_s):
    """Median wall time of each of `fns(*args)`, calls interleaved (at least 3
    rounds, more while within `budget_s`, at most 30)."""
    times = [[] for _ in fns]
    for i in range(30):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            out.append(time.perf_counter() - start)
        if i >= 2 and sum(map(sum, times)) > budget_s:
            break
    return [float(np.median(t)) for t in times]


def _scan_case(make, length):
    cell, init, xs = make(length)
    sequential = jax.jit(lambda i, x: jax.lax.scan(cell, i, x)[1])

    def parallel():
        fn = jax.jit(
            lambda i, x: partime.scan(cell, i, x, return_stats=True, throw=False)
        )

        def run(i, x):
            _, ys, stats = fn(i, x)
            return ys, {
                "iterations": int(stats.num_iterations),
                "fell_back": bool(stats.fell_back),
                "ok": bool(stats.result == partime.RESULTS.successful),
            }

        return run, lambda i, x: fn(i, x)[1]

    return sequential, parallel, (init, xs)


def _ode_case(key, length, options):
    saveat = diffrax.SaveAt(t1=True, solver_state=True)
    sequential = sequential_solve(key, length, saveat)

    def parallel():
        fn = one_window_solve(key, length, saveat, **options)

        def run(y0):
            ys, result, state = fn(y0)
            return ys, {
                "iterations": int(state.num_iterations),
                "fell_back": bool(state.num_fallbacks),
                "ok": bool(result == diffrax.RESULTS.successful),
            }

        return run, lambda y: fn(y)[0]

    return (lambda y: sequential(y)[0]), parallel, (jnp.asarray(SPEED_ODES[key][1]),)


def run(budget_s):
    rows = []
    for name, kind, how, make, length, options in PROBLEMS:
        if how == "scan":
            sequential, parallel, args = _scan_case(make, length)
        else:
            sequential, parallel, args = _ode_case(make, length, options)
        reference = jax.block_until_ready(sequential(*args))
        for rule_name, rule in RULES.items():
            # Read when the solve is traced: no trace of another rule may be reused
            # (`ParallelSolver`'s window step is an `eqx.filter_jit` of its own).
            jax.clear_caches()
            loop._HOPELESS = rule
            try:
                check, timed = parallel()
                ys, stats = check(*args)
            finally:
                loop._HOPELESS = RULES[CHOSEN]
            error = max_rel_error(ys, reference) if stats["ok"] else math.inf
            exact = stats["ok"] and error <= EXACT_RTOL
            row = dict(
                problem=name,
                kind=kind,
                T=length,
                rule=rule_name,
                error=error,
                exact=exact,
                **stats,
            )
            if exact:
                t_seq, t_par = _interleaved_medians((sequential, timed), args, budget_s)
                row.update(sequential_s=t_seq, parallel_s=t_par, speedup=t_seq / t_par)
            else:
                print(f"!!! NOT EXACT: {name} T={length} {rule_name}: {error:.2e}")
            rows.append(row)
            print("  " + " ".join(_cells(row)), flush=True)
    return rows


def _cells(row):
    speedup = row.get("speedup")
    return [
        row["problem"],
        row["kind"],
        str(row["T"]),
        row["rule"],
        str(row["iterations"]),
        "yes" if row["fell_back"] else "no",
        "—" if speedup is None else f"{speedup:.2f}",
        f"{row['error']:.1e}",
        "exact" if row["exact"] else "**WRONG**",
    ]


HEADER = [
    "problem",
    "kind",
    "T",
    "rule",
    "iterations",
    "fell back",
    "speed-up",
    "error",
    "answer",
]

NOTE = """\
Rules (`partime._loop._HopelessRule`), each adding to the one above from "no
rejection limit" on:

- **before**: hopeless after 2 undamped updates rejected in a row, or when, at the
  rates at which the converged prefix and the merit progressed over the last tenth
  of the cap (5 iterations at Newton's 50), the iteration would not finish within
  the cap; the fallback restarts after the prefix exact to rounding (100 ulps).
- **more patience**: the same over a quarter of the cap (13 iterations), and 4
  rejections in a row (the old rule's scaling at a cap of 125).
- **no rejection limit**: a rejection is hopeless only over a horizon of one step
  (no shorter one is left to try); the rate test as before.
- **rejections wait**: rejected iterations do not count towards the patience (they
  only shrink the trust horizon 4×).
- **+ frontier**: the advance of the trusted frontier (converged prefix + trust
  horizon) counts as progress too.
- **+ restart** (the rule of the last session): where the last trust horizon fell
  short of the end, the fallback restarts after the steps whose residual is
  exactly zero.
- **+ contracting prefix**: where the rates say hopeless, an iteration whose
  Lyapunov estimate along the converged prefix (at least 8 steps) is negative goes
  on.
- **+ horizon growth**: so does one whose frontier, with the trust horizon growing
  by the factor per iteration it grew by over the last window, would reach the
  end within the cap.
- **+ growth unless chaotic (chosen)**: the horizon's growth counts only while the
  Lyapunov estimate is not positive (unknown: a prefix shorter than 8 steps).

Speed-up: sequential time / parallel time (above 1 the parallel solve is faster;
on a CPU it rarely is: read the ratios between rules). Times are medians of
interleaved calls on a shared CPU; the load is in the JSON.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per row")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = environment()
    rows = run(args.budget)
    table = [_cells(row) for row in rows]
    print(text_table(HEADER, table))
    out = Path(args.out or f"benchmarks/results/hopeless-{env['platform']}.json")
    command = "python benchmarks/" + " ".join([Path(__file__).name, *sys.argv[1:]])
    write_json(out, {"environment": env, "command": command, "rows": rows})
    text = (
        "# The hopeless-case test: candidate rules\n\n"
        f"Written by `{command}` at {env['date']} (commit {env['git_commit']}, "
        f"load average at start {env['load_average_at_start']}).\n\n"
        + NOTE
        + "\n"
        + markdown_table(HEADER, table)
    )
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
