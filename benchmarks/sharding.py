"""Benchmark: the sharded fixed-point solve on 1, 2, 4, 8 devices — memory per device
and bytes communicated per iteration.

A GRU cell with random weights scaled so that the recurrence contracts, one sequence of
length `T`, hidden size `d`, float64. For every method and device count `P` the script
compiles the sharded forward solve and its gradient (of `sum(sin(states))` with respect
to the GRU parameters, which the step closes over), and reports

- the memory of the compiled program per device (`memory_analysis()`: argument +
  output + temporary bytes; under SPMD every device runs the same program on its own
  chunk), next to the one-device `partime.fixed_point_solve`;
- what the collectives move, read from the compiled HLO: per iteration (the collectives
  in the body of the iteration's loop: the neighbour's state, the `P` chunk summaries,
  the convergence flags), and in the gradient's implicit solve (the collectives outside
  any loop). Bytes are each collective's result size per device, i.e. what a device
  holds after it; a gather of the whole trajectory would be `T·d·8` bytes;
- the iterations, and the errors of the states and gradients against the one-device
  solve.

On a CPU the devices are virtual (`--xla_force_host_platform_device_count`), so they
share the machine's cores: wall times would say nothing about multi-device speed and are
not reported. Memory and communication are properties of the compiled program and are
the same on real devices.

Usage, from the repository root:

    python benchmarks/sharding.py            # writes benchmarks/results/
    python benchmarks/sharding.py --quick    # d=8, T=2048, Newton, 1 and 8 devices
    python benchmarks/sharding.py --d 32 --T 65536 --devices 1 8 --methods Newton

`--quick` writes only with `--out`. The exit status is 1 if any row is WRONG.
"""

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax


if __name__ == "__main__":
    # Before JAX initialises: eight virtual CPU devices, and float64.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8"
    jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from _common import (
    compile_fn,
    environment,
    markdown_table,
    max_rel_error,
    memory_bytes,
    text_table,
    write_json,
)
from jax.sharding import AxisType

import partime


METHODS = {"Newton": partime.Newton, "QuasiNewton": partime.QuasiNewton}
TOLERANCE = 1e-10  # float64, method tolerances 1e-12
_HIGHEST = jax.lax.Precision.HIGHEST


def gru_params(key: Any, d: int, scale: float = 0.5) -> dict:
    """Random GRU weights (input size 1); recurrent spectral norm about `2·scale`."""
    k_in, k_rec, k_bias = jr.split(key, 3)
    return {
        "W": jr.normal(k_in, (3, d)),
        "U": scale * jr.normal(k_rec, (3, d, d)) / np.sqrt(d),
        "b": 0.1 * jr.normal(k_bias, (4, d)),
    }


def gru(params: dict, h: jax.Array, x: jax.Array) -> jax.Array:
    uh = jnp.einsum("kij,j->ki", params["U"], h, precision=_HIGHEST)
    wx, b = params["W"] * x, params["b"]
    z = jax.nn.sigmoid(wx[0] + uh[0] + b[0])
    r = jax.nn.sigmoid(wx[1] + uh[1] + b[1])
    n = jnp.tanh(wx[2] + b[2] + r * (uh[2] + b[3]))
    return (1 - z) * n + z * h


def solve_fn(solve, method):
    def forward(params, h0, xs):
        states, stats = solve(lambda h, x: gru(params, h, x), h0, xs, method)
        return states, stats.num_iterations

    def loss(params, h0, xs):
        return jnp.sum(jnp.sin(forward(params, h0, xs)[0]))

    return forward, jax.grad(loss)


# Compiled HLO text: computations, and the collectives in them.

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_COLLECTIVE = re.compile(
    r"= (\(.*?\)|\S+) (all-gather|all-reduce|collective-permute|all-to-all|"
    r"reduce-scatter|collective-broadcast)(?:-start)?\("
)
_SHAPE = re.compile(r"([a-z]+)(\d+)\[([\d,]*)\]")
_LOOP = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")


def _bytes(shapes: str) -> tuple[int, list[str]]:
    total, names = 0, []
    for kind, bits, dims in _SHAPE.findall(shapes):
        sizes = [int(n) for n in dims.split(",") if n]
        bits = 8 if kind == "pred" else int(bits)
        total += int(np.prod(sizes, dtype=np.int64)) * bits // 8
        names.append(f"{kind}{bits}[{','.join(map(str, sizes))}]")
    return total, names


def collectives(text: str) -> dict[str, list[tuple[str, int, list[str]]]]:
    """Per computation: `(op, bytes, shapes)` of every collective in it."""
    out: dict[str, list] = {}
    current = None
    for line in text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(1)
            out.setdefault(current, [])
            continue
        found = _COLLECTIVE.search(line)
        if found and current is not None:
            nbytes, shapes = _bytes(found.group(1))
            out[current].append((found.group(2), nbytes, shapes))
    return out


def loop_computations(text: str) -> set[str]:
    return {name for pair in _LOOP.findall(text) for name in pair}


def per_iteration(text: str) -> tuple[int, list[str]]:
    """Bytes and collectives in the body of the iteration loop: the loop body that
    sums the two convergence flags (an `s32[2]` all-reduce)."""
    bodies = {body for _, body in _LOOP.findall(text)}
    candidates = [
        ops
        for name, ops in collectives(text).items()
        if name in bodies and ("all-reduce", 8, ["s32[2]"]) in ops
    ]
    if len(candidates) != 1:
        return -1, ["? (iteration body not found)"]
    (ops,) = candidates
    return sum(n for _, n, _ in ops), [f"{op} {' '.join(s)}" for op, _, s in ops]


def outside_loops(text: str) -> tuple[int, list[str]]:
    """Bytes and collectives outside every loop (in the gradient: the implicit solve,
    and the parameters' cotangent reduction)."""
    loops = loop_computations(text)
    ops = [
        op
        for name, comp in collectives(text).items()
        if name not in loops
        for op in comp
    ]
    return sum(n for _, n, _ in ops), [f"{op} {' '.join(s)}" for op, _, s in ops]


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.2f}"


def run(args: argparse.Namespace) -> tuple[list[dict], bool]:
    key = jr.PRNGKey(0)
    k_params, k_xs, k_h0 = jr.split(key, 3)
    params = gru_params(k_params, args.d)
    xs = jr.normal(k_xs, (args.T,))
    h0 = 0.5 * jr.normal(k_h0, (args.d,))
    rows, ok = [], True
    for name in args.methods:
        method = METHODS[name](rtol=1e-12, atol=1e-12)
        forward, grad = solve_fn(partime.fixed_point_solve, method)
        fwd_c, _ = compile_fn(forward, params, h0, xs)
        grad_c, _ = compile_fn(grad, params, h0, xs)
        ref_states, ref_iters = fwd_c(params, h0, xs)
        ref_grad = grad_c(params, h0, xs)
        rows.append(
            {
                "method": name,
                "devices": "one-device solve",
                "chunk": args.T,
                "iterations": int(ref_iters),
                "forward_bytes_per_device": memory_bytes(fwd_c),
                "gradient_bytes_per_device": memory_bytes(grad_c),
            }
        )
        print(f"{name}: one-device solve compiled and run", flush=True)
        for count in args.devices:
            mesh = jax.make_mesh(
                (count,),
                ("time",),
                axis_types=(AxisType.Auto,),
                devices=jax.devices()[:count],
            )
            sharded = lambda *a: partime.fixed_point_solve(*a, mesh=mesh)
            forward, grad = solve_fn(sharded, method)
            fwd_c, _ = compile_fn(forward, params, h0, xs)
            grad_c, _ = compile_fn(grad, params, h0, xs)
            states, iters = fwd_c(params, h0, xs)
            grads = grad_c(params, h0, xs)
            value_error = max_rel_error(states, ref_states)
            grad_error = max_rel_error(grads, ref_grad)
            wrong = not (value_error < TOLERANCE and grad_error < TOLERANCE)
            ok &= not wrong
            iteration_bytes, iteration_ops = per_iteration(fwd_c.as_text())
            solve_bytes, solve_ops = outside_loops(grad_c.as_text())
            rows.append(
                {
                    "method": name,
                    "devices": count,
                    "chunk": args.T // count,
                    "iterations": int(iters),
                    "value_error": value_error,
                    "gradient_error": grad_error,
                    "forward_bytes_per_device": memory_bytes(fwd_c),
                    "gradient_bytes_per_device": memory_bytes(grad_c),
                    "bytes_per_iteration": iteration_bytes,
                    "collectives_per_iteration": iteration_ops,
                    "gradient_solve_bytes": solve_bytes,
                    "gradient_solve_collectives": solve_ops,
                    "note": "WRONG" if wrong else "",
                }
            )
            print(
                f"{name}: {count} devices, {iteration_bytes} B per iteration, "
                f"{_mib(memory_bytes(fwd_c))} MiB forward per device",
                flush=True,
            )
    return rows, ok


def table(rows: list[dict], args: argparse.Namespace) -> tuple[list[str], list[list]]:
    header = [
        "method",
        "devices",
        "T/P",
        "iters",
        "value err",
        "grad err",
        "fwd MiB/device",
        "grad MiB/device",
        "B/iteration",
        "grad solve B",
        "note",
    ]
    body = []
    for row in rows:
        fmt_err = lambda key: f"{row[key]:.1e}" if key in row else "-"
        body.append(
            [
                row["method"],
                str(row["devices"]),
                str(row["chunk"]),
                str(row["iterations"]),
                fmt_err("value_error"),
                fmt_err("gradient_error"),
                _mib(row["forward_bytes_per_device"]),
                _mib(row["gradient_bytes_per_device"]),
                str(row.get("bytes_per_iteration", "-")),
                str(row.get("gradient_solve_bytes", "-")),
                row.get("note", ""),
            ]
        )
    return header, body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--T", type=int, default=2**14)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS)
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.d, args.T, args.devices, args.methods = 8, 2048, [1, 8], ["Newton"]
    if max(args.devices) > jax.device_count():
        parser.error(f"only {jax.device_count()} devices")
    if any(args.T % count for count in args.devices):
        parser.error("--T must be a multiple of every device count")

    env = environment()
    rows, ok = run(args)
    header, body = table(rows, args)
    print()
    print(text_table(header, body))
    trajectory = args.T * args.d * 8
    example = next((r for r in rows if r["devices"] == max(args.devices)), None)
    if example is not None:
        print("\nper iteration on", example["devices"], "devices:")
        for op in example["collectives_per_iteration"]:
            print("  ", op)
        print("gradient's implicit solve:")
        for op in example["gradient_solve_collectives"]:
            print("  ", op)
    print(f"\n(a gather of the trajectory would be T·d·8 = {trajectory} bytes)")

    out = args.out
    if out is None and not args.quick:
        out = Path(__file__).parent / "results" / f"sharding-{env['platform']}.json"
    if out is not None:
        payload = {
            "benchmark": "sharding",
            "config": {
                "d": args.d,
                "T": args.T,
                "devices": args.devices,
                "methods": args.methods,
                "dtype": "float64",
                "rtol": 1e-12,
                "atol": 1e-12,
                "trajectory_bytes": trajectory,
            },
            "environment": env,
            "rows": rows,
        }
        write_json(out, payload)
        lines = [
            "# Sharded solves: memory per device and communication\n",
            f"GRU, d={args.d}, T={args.T}, one sequence, float64, tolerances 1e-12, "
            f"{env['platform']} ({env['device_count']} virtual devices on "
            f"{env['cpu_count']} CPUs), jax {env['jax']}, commit "
            f"{env['git_commit']}. Memory: compiled argument + output + temporary "
            "bytes per device. B/iteration: bytes each device receives from the "
            "collectives in one iteration (from the compiled HLO); grad solve B: the "
            "gradient's collectives outside the iteration (its implicit solve and the "
            "parameters' cotangent sum). Errors against the one-device solve. A "
            f"gather of the trajectory would be {trajectory} bytes.\n",
            markdown_table(header, body),
        ]
        if example is not None:
            lines.append(
                f"\nCollectives per iteration on {example['devices']} devices: "
                + "; ".join(example["collectives_per_iteration"])
                + ".\n"
            )
        out.with_suffix(".md").write_text("\n".join(lines))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
