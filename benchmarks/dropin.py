"""Benchmark: diffrax's documented examples with only the solver swapped for
`partime.ParallelSolver` — alone (the trap: `dt0` and the controller then bound
*windows*), with `partime.WindowController` around the user's own controller, and
hand-tuned (a constant inner step, the windows chosen by hand).

Two set-ups from diffrax's documentation, small, in float64:

- `heat`: the "nonlinear heat PDE" example, y_t = (1 - y) y_xx on x in [-1, 1]
  (50 grid points, method of lines), y(0, x) = x², t in [0, 1]; Tsit5, dt0 = 1e-4,
  `PIDController(pcoeff=0.3, icoeff=0.4, rtol=1e-10, atol=1e-10, dtmax=1e-3)`.
- `cde`: the "neural CDE" example, one sample: a cubic interpolation of a decaying
  spiral (100 points over [0, 4π]) drives `ControlTerm(mlp, control).to_ode()`
  (hidden size 8, MLP width 32); Tsit5, dt0=None, `PIDController(rtol=1e-3,
  atol=1e-6)`.

Every row first checks its answer: against sequential diffrax (Tsit5, `StepTo`) on the
row's own inner grid (relative error, tolerance 1e-8: the parallel solve is exact on
its grid), and its accuracy against a tight solve (Tsit5, rtol = atol = 1e-12),
which must be at most twice the sequential diffrax call's own error (the user's
tolerance keeps its meaning; a hand-tuned row that is less accurate is marked
"inaccurate" and not ranked). A row failing the first check is WRONG and untimed.
Then the median of `--repeats` calls after a warm-up call. Speed-ups (reference
time / row time, above 1 is faster) are against sequential diffrax with the user's
controller (`vs diffrax`) and against the fastest accurate hand-tuned partime row
(`vs hand-tuned`; at least 0.5 means within 2x of it), measured in the same run. On a
CPU the parallel rows do several times the sequential work on few cores: the ratio
that matters here is the one against hand-tuned partime.

    python benchmarks/dropin.py            # both set-ups; a few minutes
    python benchmarks/dropin.py --quick    # no "solver only" row (the slow trap)

Results go to `benchmarks/results/dropin-<platform>.json` and a `.md` table beside it
(`--quick` writes only with `--out`). The exit status is 1 if any row is WRONG.
"""

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    compile_fn,
    environment,
    fmt,
    markdown_table,
    run_once,
    text_table,
    time_calls,
    write_json,
)

import partime  # noqa: E402


GRID_TOL = 1e-8


class Problem(eqx.Module):
    name: str = eqx.field(static=True)
    term: diffrax.AbstractTerm
    y0: jax.Array
    t0: float = eqx.field(static=True)
    t1: float = eqx.field(static=True)
    dt0: float | None = eqx.field(static=True)
    controller: diffrax.PIDController


def heat() -> Problem:
    x = np.linspace(-1.0, 1.0, 50)
    dx = x[1] - x[0]

    def field(t, y, args):
        interior = (1 - y[1:-1]) * (y[2:] - 2 * y[1:-1] + y[:-2]) / dx**2
        return jnp.concatenate([jnp.zeros(1), interior, jnp.zeros(1)])

    controller = diffrax.PIDController(
        pcoeff=0.3, icoeff=0.4, rtol=1e-10, atol=1e-10, dtmax=1e-3
    )
    return Problem(
        "heat", diffrax.ODETerm(field), jnp.asarray(x**2), 0.0, 1.0, 1e-4, controller
    )


class _CDEField(eqx.Module):
    mlp: eqx.nn.MLP

    def __call__(self, t, y, args):
        return jnp.tanh(self.mlp(y)).reshape(8, 3)


def cde() -> Problem:
    k_mlp, k_y0 = jr.split(jr.PRNGKey(0))
    ts = jnp.linspace(0.0, 4 * jnp.pi, 100)
    data = jnp.stack([ts, jnp.cos(ts) * jnp.exp(-0.1 * ts), jnp.sin(ts)], axis=-1)
    control = diffrax.CubicInterpolation(
        ts, diffrax.backward_hermite_coefficients(ts, data)
    )
    field = _CDEField(eqx.nn.MLP(8, 24, 32, 1, jax.nn.softplus, key=k_mlp))
    term = diffrax.ControlTerm(field, control).to_ode()
    controller = diffrax.PIDController(rtol=1e-3, atol=1e-6)
    y0 = 0.1 * jr.normal(k_y0, (8,))
    return Problem("cde", term, y0, 0.0, float(4 * np.pi), None, controller)


def configurations(problem: Problem, quick: bool) -> list[dict[str, Any]]:
    """`kind`, the solver's `num_steps`, the controller and `dt0`, `max_steps`."""
    horizon = problem.t1 - problem.t0
    user = problem.controller
    rows = [dict(kind="diffrax", K=None, controller=user, dt0=problem.dt0)]
    if not quick:
        rows.append(dict(kind="solver only", K=10, controller=user, dt0=problem.dt0))
    window_ks = [10, 100, 1000] if problem.name == "heat" else [8, 16, 32, 100]
    rows += [
        dict(
            kind="WindowController",
            K=k,
            controller=partime.WindowController(user),
            dt0=problem.dt0,
        )
        for k in window_ks
    ]
    # Hand-tuned: a constant inner step, `windows` windows of K steps each.
    hand = (
        [(1, 1000), (10, 100), (100, 10)]
        if problem.name == "heat"
        else [(1, 16), (1, 32), (1, 64), (2, 32), (1, 128)]
    )
    rows += [
        dict(
            kind="hand-tuned",
            K=k,
            controller=diffrax.ConstantStepSize(),
            dt0=horizon / windows,
            windows=windows,
        )
        for windows, k in hand
    ]
    return rows


def make_solve(problem: Problem, config: dict[str, Any], max_steps: int):
    parallel = config["K"] is not None
    solver = (
        partime.ParallelSolver(diffrax.Tsit5(), num_steps=config["K"])
        if parallel
        else diffrax.Tsit5()
    )
    saveat = diffrax.SaveAt(steps=True, solver_state=parallel)

    def solve(y0):
        sol = diffrax.diffeqsolve(
            problem.term,
            solver,
            problem.t0,
            problem.t1,
            config["dt0"],
            y0,
            stepsize_controller=config["controller"],
            saveat=saveat,
            max_steps=max_steps,
        )
        state = sol.solver_state if parallel else None
        return sol.ts, sol.ys, sol.stats["num_accepted_steps"], state

    return solve


def sequential_on(problem: Problem, grid: np.ndarray, y0):
    sol = diffrax.diffeqsolve(
        problem.term,
        diffrax.Tsit5(),
        grid[0],
        grid[-1],
        None,
        y0,
        stepsize_controller=diffrax.StepTo(ts=jnp.asarray(grid)),
        max_steps=len(grid),
    )
    return sol.ys[-1]


def tight(problem: Problem):
    sol = diffrax.diffeqsolve(
        problem.term,
        diffrax.Tsit5(),
        problem.t0,
        problem.t1,
        problem.dt0,
        problem.y0,
        stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
        max_steps=10**6,
    )
    return sol.ys[-1]


def inner_grid(t0: float, ends: np.ndarray, num_steps: int) -> np.ndarray:
    starts = np.concatenate([[t0], ends[:-1]])
    pieces = [np.linspace(a, b, num_steps + 1)[:-1] for a, b in zip(starts, ends)]
    return np.concatenate(pieces + [ends[-1:]])


def rel_error(x, y) -> float:
    return float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for problem in (heat(), cde()):
        exact = eqx.filter_jit(tight)(problem)
        sequential_error = None
        for config in configurations(problem, args.quick):
            horizon = problem.t1 - problem.t0
            if config["kind"] == "diffrax":
                max_steps = 4096
            elif config["kind"] == "solver only":
                max_steps = 4096
            elif config["kind"] == "WindowController":
                max_steps = 64 + math.ceil(horizon / (config["K"] * 1e-3))
            else:
                max_steps = config["windows"]
            row: dict[str, Any] = {
                "problem": problem.name,
                "kind": config["kind"],
                "K": config["K"],
            }
            compiled, row["compile_s"] = compile_fn(
                make_solve(problem, config, max_steps), problem.y0
            )
            out, first_s = run_once(compiled, problem.y0)
            ts, ys, accepted, state = out
            accepted = int(accepted)
            row["windows"] = accepted
            y1 = ys[accepted - 1]
            row["error_vs_tight"] = rel_error(y1, exact)
            if config["K"] is None:
                row["inner_steps"] = accepted
                sequential_error = row["error_vs_tight"]
            else:
                grid = inner_grid(problem.t0, np.asarray(ts[:accepted]), config["K"])
                row["inner_steps"] = len(grid) - 1
                reference = eqx.filter_jit(sequential_on)(problem, grid, problem.y0)
                row["error_same_grid"] = rel_error(y1, reference)
                row["iterations"] = int(state.num_iterations)
                row["fallbacks"] = int(state.num_fallbacks)
                if not row["error_same_grid"] <= GRID_TOL:
                    row["wrong"] = True
            row["accurate"] = row["error_vs_tight"] <= 2 * sequential_error
            if not row.get("wrong"):
                timing = time_calls(
                    compiled, (problem.y0,), args.repeats, args.budget, first_s
                )
                row.update(timing)
            rows.append(row)
            print(format_row(row), flush=True)
        ranked = [
            r
            for r in rows
            if r["problem"] == problem.name
            and r["kind"] == "hand-tuned"
            and r["accurate"]
            and "median_s" in r
        ]
        best = min(r["median_s"] for r in ranked) if ranked else None
        base = next(
            r["median_s"]
            for r in rows
            if r["problem"] == problem.name and r["kind"] == "diffrax"
        )
        for r in rows:
            if r["problem"] == problem.name and "median_s" in r:
                r["speedup_vs_diffrax"] = base / r["median_s"]
                r["speedup_vs_hand_tuned"] = (
                    None if best is None else best / r["median_s"]
                )
    return rows


HEADER = [
    "problem",
    "solve",
    "K",
    "windows",
    "inner steps",
    "iters",
    "fallbacks",
    "err same grid",
    "err vs tight",
    "ms",
    "vs diffrax",
    "vs hand-tuned",
    "note",
]


def table_row(row: dict[str, Any]) -> list[str]:
    notes = []
    if row.get("wrong"):
        notes.append("WRONG")
    if not row["accurate"]:
        notes.append("inaccurate")
    ms = None if "median_s" not in row else 1e3 * row["median_s"]
    return [
        row["problem"],
        row["kind"],
        fmt(row["K"], "d"),
        fmt(row["windows"], "d"),
        fmt(row["inner_steps"], "d"),
        fmt(row.get("iterations"), "d"),
        fmt(row.get("fallbacks"), "d"),
        fmt(row.get("error_same_grid"), ".1e"),
        fmt(row["error_vs_tight"], ".1e"),
        fmt(ms, ".1f"),
        fmt(row.get("speedup_vs_diffrax"), ".3f"),
        fmt(row.get("speedup_vs_hand_tuned"), ".2f"),
        "; ".join(notes),
    ]


def format_row(row: dict[str, Any]) -> str:
    return " | ".join(f"{h}={c}" for h, c in zip(HEADER, table_row(row)) if c)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="skip the slow 'solver only' rows"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    parser.add_argument(
        "--budget", type=float, default=10.0, help="seconds of timed calls per row"
    )
    parser.add_argument("--out", default=None, help="JSON path (.md beside it)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = environment()
    print(
        f"{env['platform']} ({env['device_kind']}), jax {env['jax']}, "
        f"{env['cpu_count']} CPUs, load {env['load_average_at_start']}",
        flush=True,
    )
    rows = run(args)
    table = [table_row(row) for row in rows]
    print()
    print(text_table(HEADER, table))
    wrong = any(row.get("wrong") for row in rows)
    out = args.out
    if out is None and not args.quick:
        out = Path(__file__).parent / "results" / f"dropin-{env['platform']}.json"
    if out is not None:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        write_json(out, {"environment": env, "settings": settings, "rows": rows})
        notes = (
            f"diffrax's heat-PDE and neural-CDE examples, float64, {env['platform']} "
            f"({env['device_kind']}, {env['cpu_count']} CPUs shared with other "
            f"work, load average at start {env['load_average_at_start']}), jax "
            f"{env['jax']}, commit {env['git_commit']}. diffrax: sequential Tsit5 "
            "with the example's own controller; solver only: that call with "
            "`ParallelSolver(num_steps=K)` swapped in; WindowController: also the "
            "controller wrapped in `partime.WindowController`; hand-tuned: a "
            "constant inner step, `windows` windows of K steps set by hand. err "
            "same grid: against sequential diffrax on the row's inner grid; err vs "
            "tight: against rtol = atol = 1e-12 (inaccurate: more than twice the "
            "diffrax row's). vs diffrax, vs hand-tuned: speed-ups (reference time "
            "/ row time) against the diffrax row and the fastest accurate "
            "hand-tuned row. Timings: median of repeated calls after a warm-up.\n\n"
        )
        Path(out).with_suffix(".md").write_text(
            "# diffrax's examples with the solver swapped\n\n"
            + notes
            + markdown_table(HEADER, table)
        )
        print(f"\nwrote {out}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
