"""Benchmark: compile time of `partime.ParallelSolver` against sequential diffrax.

What a user pays on the first call, before any solve runs, split into its three
phases: tracing (`jax.jit(fn).trace`), lowering to StableHLO (`.lower()`) and XLA's
compilation (`.compile()`); plus the number of times the user's Python vector field
was called while tracing (the program grows with every trace), the size of the
lowered program (characters of its StableHLO text) and the number of kernels XLA
compiled it to (`kernels`: fusions and other work-launching instructions outside
fused computations, in the compiled HLO; XLA:CPU generates code for each). For the
forward solve and for `jax.value_and_grad` of `loss = sum(y(t1)²)` (with respect to
the parameters and `y0`), on the problems of `benchmarks/ode.py`, float32, with
diffrax's default adjoint (`RecursiveCheckpointAdjoint`, which solves every window
again on the backward pass, except with `max_steps=1`: the one-window problems here,
whose window the solver's `init` solves once) and with `diffrax.DirectAdjoint()`
(which differentiates the forward pass's windows):

- `neural`: the neural ODE `dy/dt = MLP(y)` (width 64, depth 2), `d = 4`, Tsit5,
  `T = 1000` steps in one parallel window;
- `sde`: the neural SDE, Euler--Maruyama, `d = 4`, `T = 1000`;
- `stiff`: Robertson's problem, Kvaerno5, `T = 1400` (7 windows of 200).

JAX's caches are cleared before every measurement, so that each one traces from
scratch, as a fresh process does. The ratio is partime's total over diffrax's.

Usage, from the repository root:

    python benchmarks/compile.py                  # all three problems
    python benchmarks/compile.py --quick          # neural, T=100: a minute or two
    python benchmarks/compile.py --problems neural

Results go to `benchmarks/results/compile-<platform>.json` (and a `.md` table beside
it); `--quick` writes only with `--out`.
"""

import argparse
import gc
import re
import sys
import time
from pathlib import Path
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import ode
from _common import environment, markdown_table, text_table, write_json


PROBLEMS = {
    # name: (make_functions, inner solver name, d, T)
    "neural": (ode.make_functions, "tsit5", 4, 1000),
    "sde": (ode.make_sde_functions, "euler", 4, 1000),
    "stiff": (ode.make_stiff_functions, "kvaerno5", 3, 1400),
}


class _Counter:
    """Counts the calls of the problems' vector fields (drift, diffusion, Robertson's
    rates) by wrapping them where `benchmarks/ode.py` looks them up."""

    calls = 0

    @classmethod
    def install(cls) -> None:
        for owner, name in (
            (ode.VectorField, "__call__"),
            (ode.Diffusion, "__call__"),
            (ode, "robertson"),
        ):
            original = getattr(owner, name)

            def counted(*args, _original=original):
                cls.calls += 1
                return _original(*args)

            setattr(owner, name, counted)


_KERNELS = {
    "fusion", "custom-call", "dot", "convolution", "sort", "scatter", "gather",
    "reduce", "reduce-window", "copy", "dynamic-update-slice", "dynamic-slice",
    "concatenate", "pad", "transpose", "select-and-scatter",
}  # fmt: skip
# `%name = shape opcode(...)`; a tuple shape holds spaces, no `=`.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (?:\([^=]*?\)|\S+) ([\w\-]+)\(")


def count_kernels(hlo: str) -> int:
    """The work-launching instructions of a compiled HLO module outside its fused
    computations (each fusion counts once)."""
    fused = set(re.findall(r"fusion\(.*?calls=%([\w.\-]+)", hlo))
    total, inside = 0, False
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header:
            inside = header.group(1) not in fused
        elif line.startswith("}"):
            inside = False
        elif inside:
            instruction = _INSTRUCTION.match(line)
            total += bool(instruction and instruction.group(1) in _KERNELS)
    return total


def measure(fn, *args) -> dict[str, Any]:
    """Seconds to trace, lower and compile `jax.jit(fn)` for `args` from cold caches,
    the vector-field calls while tracing, and the size of the lowered program."""
    jax.clear_caches()
    gc.collect()
    _Counter.calls = 0
    start = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    trace_s = time.perf_counter() - start
    calls = _Counter.calls
    start = time.perf_counter()
    lowered = traced.lower()
    lower_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    return {
        "trace_s": trace_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "total_s": trace_s + lower_s + compile_s,
        "field_calls": calls,
        "stablehlo_chars": len(lowered.as_text()),
        "kernels": count_kernels(compiled.as_text()),
    }


def run_problem(name: str, T: int) -> list[dict[str, Any]]:
    make, inner, d, _ = PROBLEMS[name]
    params, static, y0, _ = ode.setup(name, d, jnp.float32)
    rows = []
    for solver, parallel, adjoint in (
        ("partime", True, None),
        ("partime, DirectAdjoint", True, diffrax.DirectAdjoint()),
        ("diffrax", False, None),
    ):
        solve, _ = make(inner, T, parallel, static, adjoint=adjoint)

        def loss(params, y0, solve=solve):
            return jnp.sum(solve(params, y0)[0] ** 2)

        for mode, fn in (
            ("forward", lambda p, y, solve=solve: solve(p, y)[0]),
            ("value_and_grad", jax.value_and_grad(loss, argnums=(0, 1))),
        ):
            row = {"problem": name, "T": T, "solver": solver, "mode": mode}
            row.update(measure(fn, params, y0))
            rows.append(row)
            print(
                f"  {name} {solver} {mode}: {row['total_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
    for row in rows:
        if row["solver"].startswith("partime"):
            (reference,) = [
                r for r in rows if r["solver"] == "diffrax" and r["mode"] == row["mode"]
            ]
            row["ratio"] = row["total_s"] / reference["total_s"]
            row["field_calls_ratio"] = row["field_calls"] / max(
                reference["field_calls"], 1
            )
            row["stablehlo_ratio"] = (
                row["stablehlo_chars"] / reference["stablehlo_chars"]
            )
            row["kernels_ratio"] = row["kernels"] / max(reference["kernels"], 1)
    return rows


def table_row(row: dict[str, Any]) -> list[str]:
    ratio = lambda key: f"{row[key]:.2f}x" if key in row else ""
    return [
        row["problem"],
        str(row["T"]),
        row["solver"],
        row["mode"],
        f"{row['trace_s']:.1f}",
        f"{row['lower_s']:.1f}",
        f"{row['compile_s']:.1f}",
        f"{row['total_s']:.1f}",
        ratio("ratio"),
        str(row["field_calls"]),
        f"{row['stablehlo_chars'] / 1e3:.0f}k",
        ratio("stablehlo_ratio"),
        str(row["kernels"]),
        ratio("kernels_ratio"),
    ]


HEADER = [
    "problem",
    "T",
    "solver",
    "mode",
    "trace s",
    "lower s",
    "compile s",
    "total s",
    "total / diffrax",
    "field traces",
    "StableHLO",
    "size / diffrax",
    "kernels",
    "kernels / diffrax",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", choices=list(PROBLEMS))
    parser.add_argument("--quick", action="store_true", help="neural, T=100")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    _Counter.install()
    problems = args.problems or (["neural"] if args.quick else list(PROBLEMS))
    rows = []
    for name in problems:
        T = PROBLEMS[name][3]
        if args.quick:
            T = 140 if name == "stiff" else 100
        rows += run_problem(name, T)

    table = [table_row(row) for row in rows]
    print(f"Compile time, float32, on {jax.devices()[0].platform}")
    print(text_table(HEADER, table))
    out = args.out
    if out is None and not args.quick:
        platform = jax.devices()[0].platform
        out = Path(__file__).parent / "results" / f"compile-{platform}.json"
    if out is not None:
        payload = {
            "benchmark": "compile time: partime.ParallelSolver vs sequential diffrax",
            "environment": environment(),
            "rows": rows,
        }
        write_json(out, payload)
        out.with_suffix(".md").write_text(
            f"# {payload['benchmark']}\n\n{markdown_table(HEADER, table)}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
