"""Benchmark: `partime.ParallelSolver` (one window) against sequential diffrax.

A neural ODE `dy/dt = MLP(y)` (width 64, depth 2, tanh, random weights) on
`t ∈ [0, 1]`, `y ∈ R^d`, with `T` equal steps of the inner solver (Tsit5 or Euler).
diffrax steps sequentially on that grid; `ParallelSolver(inner, num_steps=T)` solves the
same `T` steps as one parallel window (`dt0 = t1 - t0`). For every `(solver, d, T)` row
the script

1. checks the solution `y(1)` and the gradient of `loss = sum(y(1)²)` with respect to
   `y0` and the MLP's parameters against diffrax's, and prints both errors (the largest
   absolute error of each array relative to that array's largest magnitude). A row
   beyond tolerance is marked WRONG;
2. times the forward solve and the gradient (diffrax's default adjoint,
   `RecursiveCheckpointAdjoint`, for both): median of `--repeats` calls after a warm-up
   call, `block_until_ready`, and reports `ratio = partime time / diffrax time`
   (below 1: partime is faster);
3. reports the Newton iterations, whether the sequential fallback ran, and the memory
   of each compiled function (`memory_analysis()`: argument + output + temporary bytes).

Rows whose Newton Jacobians (`T·d²` entries, a few copies) would not fit in half the
device's memory are skipped, and say so.

Usage, from the repository root:

    python benchmarks/ode.py                 # the full sweep (slow on a CPU)
    python benchmarks/ode.py --quick         # d=2, T=100, both solvers: seconds
    python benchmarks/ode.py --d 4 --T 1e4 --solvers tsit5

Results go to `benchmarks/results/ode-<platform>.json` (`ode-<platform>-float32.json`
with `--float32`; a `.md` table beside it), where `<platform>` is
`jax.devices()[0].platform`; `--quick` writes only with `--out`.
The exit status is 1 if any row is WRONG.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import jax


if __name__ == "__main__" and "--float32" not in sys.argv:
    # Before any array exists: the default is float64.
    jax.config.update("jax_enable_x64", True)

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from _common import (
    compile_fn,
    device_memory_bytes,
    environment,
    markdown_table,
    max_rel_error,
    memory_bytes,
    run_once,
    text_table,
    time_calls,
    write_json,
)

import partime


SOLVERS = {"tsit5": diffrax.Tsit5, "euler": diffrax.Euler}
WIDTH, DEPTH = 64, 2
T0, T1 = 0.0, 1.0
# (solution, gradient) tolerances, relative to each array's largest magnitude: well
# above the Newton tolerance (100 ulps), well below any real disagreement.
TOLERANCES = {"float64": (1e-8, 1e-6), "float32": (1e-3, 1e-2)}


class VectorField(eqx.Module):
    mlp: eqx.nn.MLP

    def __init__(self, d: int, key: Any):
        self.mlp = eqx.nn.MLP(d, d, WIDTH, DEPTH, activation=jnp.tanh, key=key)

    def __call__(self, t, y, args):
        return self.mlp(y)


def make_functions(solver_name: str, T: int, parallel: bool, static: Any):
    """`forward(params, y0) -> (y1, (iterations, fallbacks))` and
    `gradient(params, y0) -> (d params, d y0)`."""
    inner = SOLVERS[solver_name]()
    if parallel:
        solver = partime.ParallelSolver(inner, num_steps=T)
        dt0 = T1 - T0  # one window over the whole horizon
        max_steps = 1
    else:
        solver = inner
        dt0 = (T1 - T0) / T
        max_steps = T  # as tight as it goes: diffrax's checkpointing sizes by it

    def solve(params, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(eqx.combine(params, static)),
            solver,
            T0,
            T1,
            dt0,
            y0,
            saveat=diffrax.SaveAt(t1=True, solver_state=parallel),
            max_steps=max_steps,
        )
        if parallel:
            stats = (sol.solver_state.num_iterations, sol.solver_state.num_fallbacks)
        else:
            stats = (jnp.array(0), jnp.array(0))
        return sol.ys[0], stats

    def loss(params, y0):
        return jnp.sum(solve(params, y0)[0] ** 2)

    return solve, jax.grad(loss, argnums=(0, 1))


def run_row(solver_name: str, d: int, T: int, args: argparse.Namespace) -> dict:
    dtype = jnp.float32 if args.float32 else jnp.float64
    row: dict[str, Any] = dict(solver=solver_name, d=d, T=T, notes=[])
    itemsize = jnp.dtype(dtype).itemsize
    memory = device_memory_bytes()
    # Jacobians, their tangent-mode intermediates and the scan's partial products.
    estimate = 8 * T * d * d * itemsize
    if memory is not None and estimate > memory / 2:
        row["notes"].append(f"skipped: ~{estimate / 2**30:.0f} GiB of Jacobians")
        return row
    field = VectorField(d, jr.key(d))
    params, static = eqx.partition(field, eqx.is_array)
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    y0 = jr.normal(jr.key(d + 1), (d,), dtype)

    outputs = {}
    for parallel in (True, False):
        side = "par" if parallel else "seq"
        forward, gradient = make_functions(solver_name, T, parallel, static)
        for kind, fn in (("forward", forward), ("gradient", gradient)):
            compiled, compile_s = compile_fn(fn, params, y0)
            out, first_s = run_once(compiled, params, y0)
            outputs[side, kind] = out
            timing = time_calls(
                compiled, (params, y0), args.repeats, args.budget, first_s
            )
            row[f"{side}_{kind}_s"] = timing["median_s"]
            row[f"{side}_{kind}_calls"] = len(timing["times_s"])
            row[f"{side}_{kind}_compile_s"] = compile_s
            row[f"{side}_{kind}_bytes"] = memory_bytes(compiled)

    y_par, (iterations, fallbacks) = outputs["par", "forward"]
    y_seq, _ = outputs["seq", "forward"]
    row["iterations"] = int(iterations)
    row["fell_back"] = bool(fallbacks)
    row["solution_error"] = max_rel_error(y_par, y_seq)
    row["gradient_error"] = max_rel_error(
        outputs["par", "gradient"], outputs["seq", "gradient"]
    )
    value_tol, grad_tol = TOLERANCES[jnp.dtype(dtype).name]
    if row["solution_error"] > value_tol:
        row["notes"].append("WRONG solution")
    if row["gradient_error"] > grad_tol:
        row["notes"].append("WRONG gradient")
    for kind in ("forward", "gradient"):
        row[f"{kind}_ratio"] = row[f"par_{kind}_s"] / row[f"seq_{kind}_s"]
    return row


HEADER = [
    "solver", "d", "T", "iters", "fb", "err y", "err grad",
    "seq fwd ms", "par fwd ms", "fwd ratio",
    "seq grad ms", "par grad ms", "grad ratio",
    "seq grad MiB", "par grad MiB", "notes",
]  # fmt: skip


def format_row(row: dict) -> list[str]:
    if "iterations" not in row:
        return (
            [row["solver"], str(row["d"]), str(row["T"])]
            + ["-"] * 12
            + ["; ".join(row["notes"])]
        )
    ms = lambda key: f"{row[key] * 1e3:.1f}"
    mib = lambda key: "-" if row[key] is None else f"{row[key] / 2**20:.1f}"
    return [
        row["solver"],
        str(row["d"]),
        str(row["T"]),
        str(row["iterations"]),
        "yes" if row["fell_back"] else "no",
        f"{row['solution_error']:.1e}",
        f"{row['gradient_error']:.1e}",
        ms("seq_forward_s"),
        ms("par_forward_s"),
        f"{row['forward_ratio']:.2f}",
        ms("seq_gradient_s"),
        ms("par_gradient_s"),
        f"{row['gradient_ratio']:.2f}",
        mib("seq_gradient_bytes"),
        mib("par_gradient_bytes"),
        "; ".join(row["notes"]),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, nargs="+", default=[2, 4, 16, 64])
    parser.add_argument(
        "--T", type=float, nargs="+", default=[1e3, 1e4, 1e5], help="e.g. 1e4"
    )
    parser.add_argument("--solvers", nargs="+", choices=SOLVERS, default=list(SOLVERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget", type=float, default=30.0, help="seconds of timed calls per function"
    )
    parser.add_argument("--float32", action="store_true", help="default: float64")
    parser.add_argument("--quick", action="store_true", help="d=2, T=100: seconds")
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    args = parser.parse_args()
    if args.quick:
        args.d, args.T, args.repeats = [2], [100], 3

    env = environment()
    print(
        f"{env['platform']} ({env['device_kind']}), x64={env['x64']}, "
        f"load average {env['load_average_at_start']}"
    )
    rows = []
    for solver_name in args.solvers:
        for d in args.d:
            for T in args.T:
                row = run_row(solver_name, d, int(T), args)
                rows.append(row)
                print(" | ".join(format_row(row)), flush=True)
    table = [format_row(row) for row in rows]
    print()
    print(text_table(HEADER, table))

    out = args.out
    if out is None and not args.quick:
        suffix = "-float32" if args.float32 else ""
        out = Path(__file__).parent / "results" / f"ode-{env['platform']}{suffix}.json"
    if out is not None:
        value_tol, grad_tol = TOLERANCES["float32" if args.float32 else "float64"]
        payload = dict(
            benchmark="ode",
            problem=(
                f"dy/dt = MLP(y), width {WIDTH}, depth {DEPTH}, tanh; t in [{T0}, {T1}]"
            ),
            parallel="partime.ParallelSolver(inner, num_steps=T, method=Newton()), "
            "one window (dt0 = t1 - t0)",
            sequential="diffrax.diffeqsolve(inner, dt0=(t1 - t0) / T)",
            adjoint="diffrax.RecursiveCheckpointAdjoint() (the default)",
            ratio="partime time / diffrax time (below 1: partime is faster)",
            value_tolerance=value_tol,
            gradient_tolerance=grad_tol,
            environment=env,
            rows=rows,
        )
        write_json(out, payload)
        out.with_suffix(".md").write_text(markdown_table(HEADER, table))
        print(f"wrote {out}")
    wrong = [row for row in rows if any("WRONG" in n for n in row["notes"])]
    if wrong:
        print(f"{len(wrong)} row(s) WRONG", file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
