"""Benchmark: `partime.ParallelSolver` against sequential diffrax, on three problems.

`--problem neural` (the default): a neural ODE `dy/dt = MLP(y)` (width 64, depth 2,
tanh, random weights) on `t ∈ [0, 1]`, `y ∈ R^d`, with `T` equal steps of the inner
solver (Tsit5 or Euler). diffrax steps sequentially on that grid;
`ParallelSolver(inner, num_steps=T)` solves the same `T` steps as one parallel window
(`dt0 = t1 - t0`).

`--methods` picks the fixed-point methods (default `Newton`; `QuasiNewton`,
`QuasiNewton-probes8` = `QuasiNewton(diagonal_probes=8)`, `QuasiNewton-refresh` =
`QuasiNewton(refresh=True)`). `--block k` (neural only)
makes the vector field `d / k` independent MLPs (width 16, depth 2) on consecutive
groups of `k` components, so that the Jacobian of every Runge–Kutta step is
block-diagonal with `k x k` blocks; the method `Newton-block` is then
`Newton(jacobian=BlockDiagonal(k))`, `QuasiNewton-block` likewise.

`--problem sde`: the neural SDE `dy = MLP(y) dt + diag(0.1 (1 + tanh(y)) / 2) dW`
(Itô), Euler--Maruyama (`diffrax.Euler()`) over
`MultiTerm(ODETerm, ControlTerm(..., VirtualBrownianTree))`, one parallel window of `T`
steps as above. The sequential solve steps to the parallel solver's inner grid,
`t0 + (t1 - t0) * (k / T)` (`StepTo`), through the same Brownian tree (tolerance a
sixteenth of a step), so both sides use bit for bit the same Brownian increments.
Gradients are with respect to `y0`, the MLP and the diffusion's scale.

`--problem stiff`: Robertson's problem (`k1, k2, k3 = 0.04, 3e7, 1e4`,
`y0 = (1, 0, 0)`, `t ∈ [0, 1e2]`, `d = 3`) with `diffrax.Kvaerno5` and a tight
`optimistix.Newton(rtol=1e-10, atol=1e-12)` root finder on both sides. As in
`examples/stiff.py`, the horizon is cut into 7 log-spaced windows
(`0, 1e-4, 1e-3, ..., 1e2`, a `StepTo` controller), taken one after another, each of
`T / 7` parallel Kvaerno5 steps (`T` must be a multiple of 7); diffrax steps to the same
`T` inner step times one at a time. Gradients (through each implicit step's root find,
by diffrax's implicit differentiation) are with respect to `y0` and the log rates.

For every `(solver, d, T)` row the script

1. checks the solution `y(t1)` and the gradient of `loss = sum(y(t1)²)` with respect to
   `y0` and the parameters against diffrax's, and prints both errors (the largest
   absolute error of each array relative to that array's largest magnitude). A row
   beyond tolerance is marked WRONG;
2. times the forward solve and the gradient (diffrax's default adjoint,
   `RecursiveCheckpointAdjoint`, for both): median of `--repeats` calls after a warm-up
   call, `block_until_ready`, and reports `speed-up = diffrax time / partime time`
   (above 1: partime is faster);
3. reports the Newton iterations (in all windows), whether the sequential fallback ran,
   and the memory of each compiled function (`memory_analysis()`: argument + output +
   temporary bytes).

Rows whose Newton Jacobians (`T·d²` entries, a few copies) would not fit in half the
device's memory are skipped, and say so. `--no-gradients` times forward solves only.

Usage, from the repository root:

    python benchmarks/ode.py                 # the full sweep (slow on a CPU)
    python benchmarks/ode.py --quick         # d=2, T=100, both solvers: seconds
    python benchmarks/ode.py --d 4 --T 1e4 --solvers tsit5
    python benchmarks/ode.py --problem sde   # d in {2, 16}, T in {1e3, 1e4, 1e5}
    python benchmarks/ode.py --problem stiff # T in {1400, 7000, 35000}
    python benchmarks/ode.py --problem stiff --quick   # T=1400: half a minute
    python benchmarks/ode.py --d 64 --T 1e3 --solvers tsit5 --float32 \
        --block 4 --methods Newton Newton-block   # structured Newton at d=64

Results go to `benchmarks/results/ode-<platform>.json` for `neural`, and
`ode-sde-<platform>.json`, `ode-stiff-<platform>.json` for the others (`-float32`
appended with `--float32`; a `.md` table beside each), where `<platform>` is
`jax.devices()[0].platform`; `--quick` writes only with `--out`. The results in
`benchmarks/results` for `sde` and `stiff` were run with `--repeats 3 --budget 10`.
The exit status is 1 if any row is WRONG.
"""

import argparse
import sys
from itertools import pairwise
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
import numpy as np
import optimistix as optx
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


BLOCK_WIDTH = 16


class BlockVectorField(eqx.Module):
    """`d / k` independent MLPs, one per group of `k` consecutive components: a
    block-diagonal Jacobian."""

    mlps: eqx.nn.MLP
    block: int = eqx.field(static=True)

    def __init__(self, d: int, block: int, key: Any):
        keys = jr.split(key, d // block)
        make = lambda k: eqx.nn.MLP(
            block, block, BLOCK_WIDTH, DEPTH, activation=jnp.tanh, key=k
        )
        self.mlps = eqx.filter_vmap(make)(keys)
        self.block = block

    def __call__(self, t, y, args):
        groups = y.reshape(-1, self.block)
        out = eqx.filter_vmap(lambda mlp, g: mlp(g))(self.mlps, groups)
        return out.reshape(y.shape)


# name -> method, given `--block`.
METHODS = {
    "Newton": lambda k: partime.Newton(),
    "Newton-block": lambda k: partime.Newton(jacobian=partime.BlockDiagonal(k)),
    "QuasiNewton": lambda k: partime.QuasiNewton(),
    "QuasiNewton-block": lambda k: partime.QuasiNewton(
        jacobian=partime.BlockDiagonal(k)
    ),
    "QuasiNewton-probes8": lambda k: partime.QuasiNewton(diagonal_probes=8),
    "QuasiNewton-refresh": lambda k: partime.QuasiNewton(refresh=True),
}


def make_functions(
    solver_name: str,
    T: int,
    parallel: bool,
    static: Any,
    method: Any = None,
    adjoint: Any = None,
):
    """`forward(params, y0) -> (y1, (iterations, fallbacks))` and
    `gradient(params, y0) -> (d params, d y0)`; `adjoint` for the parallel solve
    (default: diffrax's, `RecursiveCheckpointAdjoint`)."""
    inner = SOLVERS[solver_name]()
    if parallel:
        solver = partime.ParallelSolver(
            inner, num_steps=T, method=partime.Newton() if method is None else method
        )
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
            **_adjoint(parallel, adjoint),
        )
        if parallel:
            stats = (sol.solver_state.num_iterations, sol.solver_state.num_fallbacks)
        else:
            stats = (jnp.array(0), jnp.array(0))
        return sol.ys[0], stats

    def loss(params, y0):
        return jnp.sum(solve(params, y0)[0] ** 2)

    return solve, jax.grad(loss, argnums=(0, 1))


SDE_SOLVERS = {"euler": diffrax.Euler}
# `--adjoint`: the parallel solve's. With one window (`max_steps=1`) the solver's `init`
# solves it, once, for both; with several, diffrax's default solves each window again
# on the backward pass, and `DirectAdjoint` differentiates the forward's.
ADJOINTS = {
    "recursive": diffrax.RecursiveCheckpointAdjoint,
    "direct": diffrax.DirectAdjoint,
}
SIGMA = 0.1  # the diffusion's scale


class Diffusion(eqx.Module):
    """`g(y) = diag(sigma * (1 + tanh(y)) / 2)`: diagonal, between 0 and `sigma`."""

    sigma: Any

    def __init__(self, d: int):
        self.sigma = SIGMA * jnp.ones(d)

    def __call__(self, t, y, args):
        return jnp.diag(self.sigma * (1 + jnp.tanh(y)) / 2)


def brownian_tolerance(T: int) -> float:
    """The Brownian tree's resolution in time: a sixteenth of a step."""
    return (T1 - T0) / T / 16


def make_sde_functions(
    solver_name: str, T: int, parallel: bool, static: Any, adjoint: Any = None
):
    """`make_functions` for the SDE `dy = MLP(y) dt + g(y) dW` (Itô, Euler--Maruyama),
    `params = (drift, diffusion)`; both sides use the same `VirtualBrownianTree` and the
    same inner grid (diffrax steps to it with `StepTo`)."""
    inner = SDE_SOLVERS[solver_name]()
    if parallel:
        solver = partime.ParallelSolver(inner, num_steps=T)
        kwargs = dict(dt0=T1 - T0, max_steps=1)
    else:
        solver = inner
        controller = diffrax.StepTo(ts=partime.inner_grid(T0, T1, T))
        kwargs = dict(dt0=None, stepsize_controller=controller, max_steps=T)

    def solve(params, y0):
        drift, diffusion = eqx.combine(params, static)
        brownian = diffrax.VirtualBrownianTree(
            T0, T1, tol=brownian_tolerance(T), shape=y0.shape, key=jr.key(0)
        )
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian)
        )
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            T0,
            T1,
            y0=y0,
            saveat=diffrax.SaveAt(t1=True, solver_state=parallel),
            **kwargs,
            **_adjoint(parallel, adjoint),
        )
        return sol.ys[0], _stats(sol, parallel)

    def loss(params, y0):
        return jnp.sum(solve(params, y0)[0] ** 2)

    return solve, jax.grad(loss, argnums=(0, 1))


# Robertson's problem: y(0) = (1, 0, 0), rates (k1, k2, k3); params = log rates.
RATES = (0.04, 3e7, 1e4)
STIFF_Y0 = (1.0, 0.0, 0.0)
# Log-spaced windows, as in examples/stiff.py: one decade each past the first.
WINDOW_ENDS = np.array([0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2])
NUM_WINDOWS = len(WINDOW_ENDS) - 1
# The same tight root finder on both sides, so that they agree to its tolerance.
ROOT_FINDER = optx.Newton(rtol=1e-10, atol=1e-12)
STIFF_SOLVERS = {"kvaerno5": lambda: diffrax.Kvaerno5(root_finder=ROOT_FINDER)}


def robertson(t, y, log_rates):
    k1, k2, k3 = jnp.exp(log_rates)
    y1, y2, y3 = y
    return jnp.stack(
        [
            -k1 * y1 + k3 * y2 * y3,
            k1 * y1 - k3 * y2 * y3 - k2 * y2**2,
            k2 * y2**2,
        ]
    )


def stiff_grid(T: int) -> Any:
    """All `T` inner steps: `T / NUM_WINDOWS` in each window."""
    grids = [
        partime.inner_grid(a, b, T // NUM_WINDOWS) for a, b in pairwise(WINDOW_ENDS)
    ]
    return jnp.concatenate([g[:-1] for g in grids] + [grids[-1][-1:]])


def make_stiff_functions(
    solver_name: str, T: int, parallel: bool, static: Any, adjoint: Any = None
):
    """`make_functions` for Robertson's problem on `[0, 1e2]`, `params` its log rates:
    `ParallelSolver(Kvaerno5, num_steps=T / 7)` steps to the 7 log-spaced window ends,
    diffrax to the same `T` inner steps, one at a time."""
    inner = STIFF_SOLVERS[solver_name]()
    if parallel:
        solver = partime.ParallelSolver(inner, num_steps=T // NUM_WINDOWS)
        ts, max_steps = jnp.asarray(WINDOW_ENDS), NUM_WINDOWS
    else:
        solver, ts, max_steps = inner, stiff_grid(T), T

    def solve(params, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(robertson),
            solver,
            WINDOW_ENDS[0],
            WINDOW_ENDS[-1],
            None,
            y0,
            args=params,
            saveat=diffrax.SaveAt(t1=True, solver_state=parallel),
            stepsize_controller=diffrax.StepTo(ts=ts),
            max_steps=max_steps,
            **_adjoint(parallel, adjoint),
        )
        return sol.ys[0], _stats(sol, parallel)

    def loss(params, y0):
        return jnp.sum(solve(params, y0)[0] ** 2)

    return solve, jax.grad(loss, argnums=(0, 1))


def _adjoint(parallel: bool, adjoint: Any) -> dict:
    """`adjoint=` for the parallel solve, if one is given; the sequential one keeps
    diffrax's default."""
    return {} if adjoint is None or not parallel else {"adjoint": adjoint}


def _stats(sol: Any, parallel: bool) -> tuple:
    if parallel:
        return sol.solver_state.num_iterations, sol.solver_state.num_fallbacks
    return jnp.array(0), jnp.array(0)


def setup(problem: str, d: int, dtype: Any, block: int | None = None) -> tuple:
    """`(params, static, y0, make_functions)` of a problem."""
    if problem == "stiff":
        params = jnp.log(jnp.array(RATES, dtype))
        return params, None, jnp.array(STIFF_Y0, dtype), make_stiff_functions
    if block is None:
        field = VectorField(d, jr.key(d))
    else:
        field = BlockVectorField(d, block, jr.key(d))
    if problem == "sde":
        params, static = eqx.partition((field, Diffusion(d)), eqx.is_array)
        make = make_sde_functions
    else:
        params, static = eqx.partition(field, eqx.is_array)
        make = make_functions
    params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
    y0 = jr.normal(jr.key(d + 1), (d,), dtype)
    return params, static, y0, make


def run_row(
    solver_name: str,
    d: int,
    T: int,
    args: argparse.Namespace,
    problem: str = "neural",
    method_name: str = "Newton",
) -> dict:
    dtype = jnp.float32 if args.float32 else jnp.float64
    row: dict[str, Any] = dict(
        solver=solver_name, method=method_name, block=args.block, d=d, T=T, notes=[]
    )
    itemsize = jnp.dtype(dtype).itemsize
    memory = device_memory_bytes()
    # Jacobians, their tangent-mode intermediates and the scan's partial products.
    estimate = 8 * T * d * d * itemsize
    if method_name == "Newton" and memory is not None and estimate > memory / 2:
        row["notes"].append(f"skipped: ~{estimate / 2**30:.0f} GiB of Jacobians")
        return row
    params, static, y0, make = setup(problem, d, dtype, args.block)
    if args.block is not None:
        row["notes"].append(f"block-diagonal field, {args.block}x{args.block}")
    if problem == "stiff":
        row["notes"].append(f"{NUM_WINDOWS} windows x {T // NUM_WINDOWS} steps")

    outputs = {}
    for parallel in (True, False):
        side = "par" if parallel else "seq"
        adjoint = ADJOINTS[args.adjoint]()
        if problem == "neural":
            method = METHODS[method_name](args.block)
            forward, gradient = make(
                solver_name, T, parallel, static, method, adjoint=adjoint
            )
        else:
            forward, gradient = make(solver_name, T, parallel, static, adjoint=adjoint)
        for kind, fn in (("forward", forward), ("gradient", gradient)):
            if kind == "gradient" and args.no_gradients:
                continue
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
    value_tol, grad_tol = TOLERANCES[jnp.dtype(dtype).name]
    if row["solution_error"] > value_tol:
        row["notes"].append("WRONG solution")
    row["forward_speedup"] = row["seq_forward_s"] / row["par_forward_s"]
    if args.no_gradients:
        row["notes"].append("gradients not run")
        return row
    row["gradient_error"] = max_rel_error(
        outputs["par", "gradient"], outputs["seq", "gradient"]
    )
    if row["gradient_error"] > grad_tol:
        row["notes"].append("WRONG gradient")
    row["gradient_speedup"] = row["seq_gradient_s"] / row["par_gradient_s"]
    return row


HEADER = [
    "solver", "method", "d", "T", "iters", "fb", "err y", "err grad",
    "seq fwd ms", "par fwd ms", "fwd speed-up",
    "seq grad ms", "par grad ms", "grad speed-up",
    "seq grad MiB", "par grad MiB", "notes",
]  # fmt: skip


def format_row(row: dict) -> list[str]:
    if "iterations" not in row:
        return (
            [row["solver"], row.get("method", "Newton"), str(row["d"]), str(row["T"])]
            + ["-"] * 12
            + ["; ".join(row["notes"])]
        )
    ms = lambda key: f"{row[key] * 1e3:.1f}" if key in row else "-"
    mib = lambda key: "-" if row.get(key) is None else f"{row[key] / 2**20:.1f}"
    sci = lambda key: f"{row[key]:.1e}" if key in row else "-"
    speedup = lambda key: f"{row[key]:.2f}" if key in row else "-"
    return [
        row["solver"],
        row.get("method", "Newton"),
        str(row["d"]),
        str(row["T"]),
        str(row["iterations"]),
        "yes" if row["fell_back"] else "no",
        sci("solution_error"),
        sci("gradient_error"),
        ms("seq_forward_s"),
        ms("par_forward_s"),
        speedup("forward_speedup"),
        ms("seq_gradient_s"),
        ms("par_gradient_s"),
        speedup("gradient_speedup"),
        mib("seq_gradient_bytes"),
        mib("par_gradient_bytes"),
        "; ".join(row["notes"]),
    ]


# Per problem: the solvers, the default `--d` and `--T`, and `--quick`'s `(d, T)`.
PROBLEMS = {
    "neural": (SOLVERS, [2, 4, 16, 64], [1e3, 1e4, 1e5], ([2], [100])),
    "sde": (SDE_SOLVERS, [2, 16], [1e3, 1e4, 1e5], ([2], [100])),
    "stiff": (STIFF_SOLVERS, [3], [1400, 7000, 35000], ([3], [1400])),
}


def describe(problem: str) -> dict:
    """The JSON's description of a problem."""
    if problem == "sde":
        return dict(
            problem=(
                f"dy = MLP(y) dt + diag({SIGMA} (1 + tanh(y)) / 2) dW (Ito), MLP width "
                f"{WIDTH}, depth {DEPTH}, tanh; t in [{T0}, {T1}]; "
                "diffrax.VirtualBrownianTree(tol=(t1 - t0) / (16 T)), the same on both "
                "sides; gradients w.r.t. y0, the MLP and the diffusion's scale"
            ),
            parallel="partime.ParallelSolver(inner, num_steps=T, method=Newton()), "
            "one window (dt0 = t1 - t0)",
            sequential="diffrax.diffeqsolve(inner, stepsize_controller=StepTo(the "
            "parallel solver's inner grid, t0 + (t1 - t0) * (k / T)))",
        )
    if problem == "stiff":
        return dict(
            problem=(
                f"Robertson's problem, rates {RATES}, y0 = {STIFF_Y0}, t in [0, "
                f"{WINDOW_ENDS[-1]:g}]; gradients w.r.t. y0 and the log rates"
            ),
            parallel="partime.ParallelSolver(Kvaerno5(root_finder=optimistix.Newton("
            f"rtol=1e-10, atol=1e-12)), num_steps=T / {NUM_WINDOWS}, method=Newton()), "
            f"StepTo(window ends {WINDOW_ENDS.tolist()}): {NUM_WINDOWS} windows, "
            "one after another",
            sequential="diffrax.diffeqsolve(the same Kvaerno5, stepsize_controller="
            "StepTo(the parallel solver's T inner step times))",
        )
    return dict(
        problem=(
            f"dy/dt = MLP(y), width {WIDTH}, depth {DEPTH}, tanh; t in [{T0}, {T1}]"
        ),
        parallel="partime.ParallelSolver(inner, num_steps=T, method=the row's "
        "method), one window (dt0 = t1 - t0)",
        sequential="diffrax.diffeqsolve(inner, dt0=(t1 - t0) / T)",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=PROBLEMS, default="neural")
    parser.add_argument(
        "--d", type=int, nargs="+", default=None, help="ignored by --problem stiff"
    )
    parser.add_argument("--T", type=float, nargs="+", default=None, help="e.g. 1e4")
    parser.add_argument("--solvers", nargs="+", default=None)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=["Newton"],
        help="neural only; default: Newton",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=None,
        help="neural only: a vector field of independent MLPs on groups of this size",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget", type=float, default=30.0, help="seconds of timed calls per function"
    )
    parser.add_argument("--float32", action="store_true", help="default: float64")
    parser.add_argument(
        "--adjoint",
        choices=list(ADJOINTS),
        default="recursive",
        help="the parallel solve's adjoint (diffrax keeps its default)",
    )
    parser.add_argument("--quick", action="store_true", help="one small row: seconds")
    parser.add_argument(
        "--no-gradients", action="store_true", help="forward solves only"
    )
    parser.add_argument("--out", type=Path, default=None, help="the JSON to write")
    args = parser.parse_args()
    solvers, default_d, default_T, (quick_d, quick_T) = PROBLEMS[args.problem]
    args.solvers = args.solvers or list(solvers)
    unknown = set(args.solvers) - set(solvers)
    if unknown:
        parser.error(f"--problem {args.problem} has no solvers {sorted(unknown)}")
    args.d = args.d or default_d
    args.T = args.T or default_T
    if args.problem != "neural" and (args.methods != ["Newton"] or args.block):
        parser.error("--methods and --block are for --problem neural")
    if args.block is None and any(m.endswith("-block") for m in args.methods):
        parser.error("the -block methods need --block")
    if args.block is not None and any(d % args.block for d in args.d):
        parser.error(f"every --d must be a multiple of --block {args.block}")
    if args.quick:
        args.d, args.T, args.repeats = quick_d, quick_T, 3
    if args.problem == "stiff":
        args.d = [3]
        if any(int(T) % NUM_WINDOWS for T in args.T):
            parser.error(f"--problem stiff: T must be a multiple of {NUM_WINDOWS}")

    env = environment()
    print(
        f"{env['platform']} ({env['device_kind']}), x64={env['x64']}, "
        f"load average {env['load_average_at_start']}"
    )
    rows = []
    for solver_name in args.solvers:
        for method_name in args.methods:
            for d in args.d:
                for T in args.T:
                    row = run_row(
                        solver_name, d, int(T), args, args.problem, method_name
                    )
                    rows.append(row)
                    print(" | ".join(format_row(row)), flush=True)
    table = [format_row(row) for row in rows]
    print()
    print(text_table(HEADER, table))

    out = args.out
    if out is None and not args.quick:
        name = "ode" if args.problem == "neural" else f"ode-{args.problem}"
        suffix = "-float32" if args.float32 else ""
        filename = f"{name}-{env['platform']}{suffix}.json"
        out = Path(__file__).parent / "results" / filename
    if out is not None:
        value_tol, grad_tol = TOLERANCES["float32" if args.float32 else "float64"]
        payload = dict(
            benchmark="ode" if args.problem == "neural" else f"ode-{args.problem}",
            **describe(args.problem),
            adjoint=f"{ADJOINTS[args.adjoint]().__class__.__name__} for partime; "
            "diffrax's default (RecursiveCheckpointAdjoint) for diffrax",
            speedup="diffrax time / partime time (above 1: partime is faster)",
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
