"""Benchmark: the memory of `partime.scan`'s gradient, per method, against
`jax.lax.scan`'s, on the GRU of `benchmarks/scan.py`.

For each method the script compiles (never runs) `jax.jit` of the forward pass and
of `jax.grad` of `loss = sum(outputs)` with respect to the GRU parameters, for one
sequence of hidden size `d` and length `T`, and reads XLA's `memory_analysis()`:
the temporary bytes (what the computation allocates beyond its arguments and
outputs), which is where a `T·d²` Jacobian stack or an `O(T d)` trajectory shows.
The ratio is partime's gradient temporaries over `lax.scan`'s.

Usage, from the repository root:

    python benchmarks/memory.py                     # d=64, T=4096, float32
    python benchmarks/memory.py --quick             # d=16, T=256
    python benchmarks/memory.py --label after       # name this run in the JSON
    python benchmarks/memory.py --time              # and time the gradient

Results are merged into `benchmarks/results/memory-<platform>.json` under `--label`
(and a `.md` table beside it); `--quick` writes only with `--out`.
"""

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
from _common import (
    environment,
    markdown_table,
    max_rel_error,
    run_once,
    text_table,
    time_calls,
    write_json,
)
from scan import gru, gru_params

import partime


METHODS = {
    "Newton": partime.Newton,
    "QuasiNewton": partime.QuasiNewton,
    "Picard": partime.Picard,
    "Jacobi": partime.Jacobi,
    "ELK": partime.ELK,
    "QuasiELK": partime.QuasiELK,
}


def compile_stats(fn, *args) -> tuple[Any, int, int]:
    """`jax.jit(fn)` compiled for `args`, its temporary and its argument + output
    bytes."""
    compiled = jax.jit(fn).lower(*args).compile()
    stats = compiled.memory_analysis()
    io = stats.argument_size_in_bytes + stats.output_size_in_bytes
    return compiled, stats.temp_size_in_bytes, io


def lax_scan(step, h, xs):
    return jax.lax.scan(step, h, xs)


def partime_scan(method, step, h, xs):
    return partime.scan(step, h, xs, method=method)


def measure(
    scan_fn, params, xs, h0, time: bool, reference: Any = None
) -> dict[str, Any]:
    """The row of one method; with `time`, the gradient is also run, checked against
    `reference` (`lax.scan`'s) and timed."""

    def forward(params, xs, h0):
        return scan_fn(lambda h, x: gru(params, h, x), h0, xs)

    def loss(params, xs, h0):
        return jnp.sum(forward(params, xs, h0)[1])

    _, forward_temp, _ = compile_stats(forward, params, xs, h0)
    compiled, grad_temp, io = compile_stats(jax.grad(loss), params, xs, h0)
    row = {"forward_temp": forward_temp, "grad_temp": grad_temp, "grad_io": io}
    if time:
        grad, first = run_once(compiled, params, xs, h0)
        row["grad_s"] = time_calls(compiled, (params, xs, h0), 3, 60.0, first)
        row["gradient"] = grad
        if reference is not None:
            row["grad_error"] = max_rel_error(grad, reference["gradient"])
    return row


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def render(rows: list[dict[str, Any]], jacobians: int) -> tuple[list, list]:
    """The table's header and rows. Forward and gradient temporaries are also given
    over the `T·d²` Jacobian stack (`lax.scan`'s forward has next to none, so no
    ratio to it), and the gradient's over the forward's: a backward pass that needs
    no more than the forward keeps this near 1."""
    timed = all("grad_s" in row for row in rows)
    header = [
        "method",
        "forward temp MiB",
        "gradient temp MiB",
        "gradient / lax.scan's",
        "forward / T·d² stack",
        "gradient / T·d² stack",
        "gradient / forward",
    ] + (["gradient ms", "gradient error vs lax.scan"] if timed else [])
    table = [
        [
            row["method"],
            mib(row["forward_temp"]),
            mib(row["grad_temp"]),
            f"{row['grad_temp'] / rows[0]['grad_temp']:.1f}x",
            f"{row['forward_temp'] / jacobians:.2f}",
            f"{row['grad_temp'] / jacobians:.2f}",
            f"{row['grad_temp'] / row['forward_temp']:.1f}x"
            if row["method"] != "lax.scan"
            else "-",
        ]
        + (
            [
                f"{1e3 * row['grad_s']['median_s']:.0f}",
                f"{row['grad_error']:.1e}" if "grad_error" in row else "-",
            ]
            if timed
            else []
        )
        for row in rows
    ]
    return header, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--label", default="current")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--time", action="store_true", help="also time the gradient (median of 3)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    if args.quick:
        args.d, args.T = 16, 256
    dtype = jnp.dtype(args.dtype)
    k_params, k_xs, k_h = jr.split(jr.key(0), 3)
    params = gru_params(k_params, args.d, dtype)
    xs = jr.normal(k_xs, (args.T, args.d), dtype)
    h0 = 0.1 * jr.normal(k_h, (args.d,), dtype)

    reference = measure(lax_scan, params, xs, h0, args.time)
    jacobians = args.T * args.d**2 * dtype.itemsize
    rows = [{"method": "lax.scan", **reference}]
    for name in args.methods or list(METHODS):
        scan_fn = functools.partial(partime_scan, METHODS[name]())
        row = measure(scan_fn, params, xs, h0, args.time, reference)
        # Float32 gradients: `lax.scan`'s own differ from the exact ones by ~1e-5.
        if row.get("grad_error", 0.0) > 1e-3:
            raise AssertionError(
                f"{name}'s gradient is off lax.scan's by {row['grad_error']:.1e}."
            )
        rows.append({"method": name, **row})
        print(f"  measured {name}", file=sys.stderr, flush=True)
    for row in rows:
        row.pop("gradient", None)
        row["grad_ratio"] = row["grad_temp"] / reference["grad_temp"]
        row["grad_over_jacobians"] = row["grad_temp"] / jacobians
    header, table = render(rows, jacobians)
    title = (
        f"Gradient memory ({args.label}): GRU d={args.d}, T={args.T}, {args.dtype}; "
        f"a T·d² Jacobian stack is {mib(jacobians)} MiB"
    )
    print(title)
    print(text_table(header, table))

    out = args.out
    if out is None and not args.quick:
        platform = jax.devices()[0].platform
        out = Path(__file__).parent / "results" / f"memory-{platform}.json"
    if out is not None:
        payload = json.loads(out.read_text()) if out.exists() else {"runs": {}}
        payload["benchmark"] = "gradient memory of partime.scan vs jax.lax.scan, GRU"
        payload["runs"][args.label] = {
            "environment": environment(),
            "config": {"d": args.d, "T": args.T, "dtype": args.dtype},
            "jacobian_stack_bytes": jacobians,
            "rows": rows,
            "table": markdown_table(header, table),
        }
        write_json(out, payload)
        report = "".join(
            f"## {label}\n\n{run['table']}\n" for label, run in payload["runs"].items()
        )
        out.with_suffix(".md").write_text(f"# {payload['benchmark']}\n\n{report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
