"""Benchmark: windowed `partime.scan` (sliding window, fixed blocks) against the
unwindowed solve and `jax.lax.scan`, for long horizons.

A GRU cell with hidden size `d` (random weights scaled so that the recurrence
contracts), random inputs, one sequence of length `T`; Newton by default. For every
`T` the script runs `jax.lax.scan`, the unwindowed `partime.scan`, and
`partime.scan(..., window=W, schedule=...)` for every window `W` and both schedules,
and for each row

1. checks the values (final carry and outputs) against `jax.lax.scan`'s — the largest
   absolute error of each array relative to that array's largest magnitude — and, for
   `T <= --grad-max-T`, the gradient of `loss = sum(outputs)` with respect to the GRU
   weights (closed over by the step function). A row beyond tolerance (1e-8 values,
   1e-6 gradients, float64) is marked WRONG and gets no timing;
2. reports the memory of the compiled function (`memory_analysis()`: argument +
   output + temporary bytes), the parallel iterations (summed over windows), how
   often the window moved, and the steps computed by the sequential fallback;
3. times it: median of `--repeats` blocking calls after a warm-up call.

Rows whose dominant buffer would not fit (`--max-memory-gb`) are skipped and say so.
On a CPU the parallel solves are slower than `lax.scan` (they do several times its
work on two cores); what the benchmark shows is that memory stays bounded by the
window as `T` grows while the unwindowed solve's grows like `T·d²`, and what the
window costs in iterations. Depth — the time on a parallel device — is about
`iterations × log2(W)` scan levels, against `T` sequential steps.

    python benchmarks/windows.py             # default sweep (T = 1e5, 1e6); minutes
    python benchmarks/windows.py --quick     # T = 1e4, W = 1000: under a minute
    python benchmarks/windows.py --T 1e5 --windows 100 1000 --schedules sliding

Results go to `benchmarks/results/windows-<platform>.json` and a `.md` table beside
it (`--quick` writes only with `--out`). The exit status is 1 if any row is WRONG.
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402
from _common import (  # noqa: E402
    compile_fn,
    environment,
    fmt,
    markdown_table,
    max_rel_error,
    memory_bytes,
    run_once,
    text_table,
    time_calls,
    write_json,
)
from scan import gru, gru_params  # noqa: E402

import partime  # noqa: E402


VALUE_TOL, GRAD_TOL = 1e-8, 1e-6
METHODS = {"Newton": partime.Newton, "QuasiNewton": partime.QuasiNewton}


def make_scan(kind: str, method: str, window: int | None):
    """`(step, h0, xs) -> (carry, ys, (iterations, advances, sequential_steps))`."""
    if kind == "lax.scan":

        def scan(step, h0, xs):
            carry, ys = jax.lax.scan(step, h0, xs)
            return carry, ys, None

        return scan

    def scan(step, h0, xs):
        kwargs = {} if kind == "unwindowed" else dict(window=window, schedule=kind)
        carry, ys, stats = partime.scan(
            step, h0, xs, method=METHODS[method](), return_stats=True, **kwargs
        )
        advances = jnp.array(1) if kind == "unwindowed" else stats.num_advances
        counts = (stats.num_iterations, advances, stats.num_sequential_steps)
        return carry, ys, counts

    return scan


def forward(scan):
    def fn(params, h0, xs):
        return scan(lambda h, x: gru(params, h, x), h0, xs)

    return fn


def value_and_grad(scan):
    def loss(params, h0, xs):
        _, ys, _ = forward(scan)(params, h0, xs)
        return jnp.sum(ys)

    return jax.value_and_grad(loss)


def measure(fn, args, repeats, budget, check) -> tuple[dict[str, Any], Any]:
    """Compile; one call, checked; then timed calls (only if the check passed)."""
    info: dict[str, Any] = {}
    compiled, info["compile_s"] = compile_fn(fn, *args)
    info["memory_bytes"] = memory_bytes(compiled)
    out, first_s = run_once(compiled, *args)
    error, extras = check(out)
    info.update(extras)
    info["error"] = error
    if error is not None and not error <= info.get("tolerance", np.inf):
        info["wrong"] = True
        return info, out
    timing = time_calls(compiled, args, repeats, budget, first_s)
    info["median_s"] = timing["median_s"]
    info["times_s"] = timing["times_s"]
    return info, out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    limit = int(args.max_memory_gb * 2**30)
    for T in sorted(args.T):
        k_params, k_xs, k_h0 = jr.split(jr.PRNGKey(0), 3)
        params = gru_params(k_params, args.d, jnp.float64)
        xs = jr.normal(k_xs, (T, args.d))
        h0 = 0.1 * jr.normal(k_h0, (args.d,))
        call_args = (params, h0, xs)
        do_grad = T <= args.grad_max_T

        reference, ref_out = measure(
            forward(make_scan("lax.scan", "", None)),
            call_args,
            args.repeats,
            args.budget,
            lambda out: (None, {}),
        )
        grad_ref = grad_ref_out = None
        if do_grad:
            grad_ref, grad_ref_out = measure(
                value_and_grad(make_scan("lax.scan", "", None)),
                call_args,
                args.repeats,
                args.budget,
                lambda out: (None, {}),
            )
        lax_row = {"T": T, "d": args.d, "kind": "lax.scan", "method": "-"}
        lax_row["window"] = None
        lax_row["forward"], lax_row["gradient"] = reference, grad_ref or {}
        rows.append(lax_row)
        print(format_row(lax_row), flush=True)

        def check_values(out):
            carry, ys, (iterations, advances, sequential) = out
            error = max_rel_error((carry, ys), ref_out[:2])
            return error, {
                "tolerance": VALUE_TOL,
                "iterations": int(iterations),
                "advances": int(advances),
                "sequential_steps": int(sequential),
            }

        def check_grads(out):
            return max_rel_error(out, grad_ref_out), {"tolerance": GRAD_TOL}

        configs = [("unwindowed", None)] + [
            (schedule, w)
            for w in sorted(args.windows)
            for schedule in args.schedules
            if w < T
        ]
        for method in args.methods:
            for kind, window in configs:
                row = {"T": T, "d": args.d, "kind": kind, "method": method}
                row["window"] = window
                row["lax_memory_bytes"] = reference.get("memory_bytes")
                # The dominant buffer: one d x d Jacobian per step in flight (the
                # unwindowed solve holds all T; its gradient too).
                in_flight = T if window is None else window
                jacobians = in_flight * args.d**2 * 8
                if jacobians > limit // 4:
                    row["forward"] = row["gradient"] = {
                        "skip": f"Jacobians {jacobians / 2**30:.1f} GiB > a quarter "
                        f"of --max-memory-gb"
                    }
                else:
                    scan = make_scan(kind, method, window)
                    row["forward"], _ = measure(
                        forward(scan),
                        call_args,
                        args.repeats,
                        args.budget,
                        check_values,
                    )
                    if do_grad and not row["forward"].get("wrong"):
                        row["gradient"], _ = measure(
                            value_and_grad(scan),
                            call_args,
                            args.repeats,
                            args.budget,
                            check_grads,
                        )
                    else:
                        row["gradient"] = {}
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


HEADER = [
    "T",
    "method",
    "schedule",
    "W",
    "iters",
    "advances",
    "seq. steps",
    "value err",
    "grad err",
    "fwd ms",
    "fwd MiB",
    "over lax",
    "grad ms",
    "grad MiB",
    "note",
]


def table_row(row: dict[str, Any]) -> list[str]:
    fwd, grad = row["forward"], row["gradient"]
    notes = [
        f"WRONG {k}" for k, p in (("values", fwd), ("gradients", grad)) if "wrong" in p
    ]
    if "skip" in fwd:
        notes.append("skipped: " + fwd["skip"])
    mib = lambda b: None if b is None else b / 2**20
    over = None
    if fwd.get("memory_bytes") is not None and row.get("lax_memory_bytes") is not None:
        over = fwd["memory_bytes"] - row["lax_memory_bytes"]
    ms = lambda s: None if s is None else 1e3 * s
    return [
        f"{row['T']:.0e}".replace("e+0", "e"),
        row["method"],
        row["kind"],
        fmt(row["window"], "d"),
        fmt(fwd.get("iterations"), "d"),
        fmt(fwd.get("advances"), "d"),
        fmt(fwd.get("sequential_steps"), "d"),
        fmt(fwd.get("error"), ".1e"),
        fmt(grad.get("error"), ".1e"),
        fmt(ms(fwd.get("median_s")), ".0f"),
        fmt(mib(fwd.get("memory_bytes")), ".1f"),
        fmt(mib(over), ".1f"),
        fmt(ms(grad.get("median_s")), ".0f"),
        fmt(mib(grad.get("memory_bytes")), ".1f"),
        "; ".join(notes),
    ]


def format_row(row: dict[str, Any]) -> str:
    return " | ".join(f"{h}={c}" for h, c in zip(HEADER, table_row(row)) if c)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T=1e4, W=1000")
    parse_int = lambda s: int(float(s))
    parser.add_argument("--T", type=parse_int, nargs="+", help="default: 1e5 1e6")
    parser.add_argument(
        "--windows", type=parse_int, nargs="+", help="default: 100 1000 10000"
    )
    parser.add_argument(
        "--schedules",
        nargs="+",
        choices=["sliding", "blocks"],
        default=["sliding", "blocks"],
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=["Newton"]
    )
    parser.add_argument("--d", type=int, default=4, help="hidden size; default 4")
    parser.add_argument(
        "--grad-max-T",
        type=parse_int,
        default=None,
        help="gradients only for T up to this; default 1e5 (1e4 with --quick)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row")
    parser.add_argument(
        "--budget", type=float, default=5.0, help="seconds of timed calls per row"
    )
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=4.0,
        help="skip rows whose T·d² (or W·d²) Jacobians exceed a quarter of this",
    )
    parser.add_argument("--out", default=None, help="JSON path (.md beside it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.T = args.T or [10**4]
        args.windows = args.windows or [1000]
        args.grad_max_T = args.grad_max_T or 10**4
        args.repeats = min(args.repeats, 2)
    args.T = args.T or [10**5, 10**6]
    args.windows = args.windows or [100, 1000, 10000]
    args.grad_max_T = args.grad_max_T or 10**5
    return args


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
    wrong = any("WRONG" in row[-1] for row in table)
    out = args.out
    if out is None and not args.quick:
        out = Path(__file__).parent / "results" / f"windows-{env['platform']}.json"
    if out is not None:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        write_json(out, {"environment": env, "settings": settings, "rows": rows})
        notes = (
            f"GRU, d={args.d}, one sequence, float64, {env['platform']} "
            f"({env['device_kind']}, {env['cpu_count']} CPUs, load average at "
            f"start {env['load_average_at_start']}), jax {env['jax']}, commit "
            f"{env['git_commit']}. Values and gradients checked against "
            f"jax.lax.scan (tolerances {VALUE_TOL:g} / {GRAD_TOL:g}) before "
            "timing. iters: parallel iterations summed over windows; advances: "
            "blocks solved, or sliding-window moves; memory: compiled "
            "argument + output + temporary bytes; over lax: forward memory beyond "
            "lax.scan's (which holds the inputs and outputs).\n\n"
        )
        Path(out).with_suffix(".md").write_text(
            "# Windowed solves\n\n" + notes + markdown_table(HEADER, table)
        )
        print(f"\nwrote {out}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
