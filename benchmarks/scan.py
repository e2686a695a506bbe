"""Benchmark: `partime.scan` (every method) against `jax.lax.scan` on a GRU.

A GRU cell with random weights, scaled so that the recurrence contracts (Newton then
converges in a handful of iterations), random inputs, a batch of sequences (`jax.vmap`),
hidden size `d`, length `T`; `--cell tanh` replaces the GRU by a plain tanh RNN on
its weights (`h = tanh(1.6 U_0 h + W_0 x + b_0)`). With `--block k` the recurrent
weights are block-diagonal with `k x k` blocks (as in ParaRNN's cells), so that the
step's Jacobian is too, and the structured methods run: `Newton-block`
(`Newton(jacobian=BlockDiagonal(k))`, exact Newton from `k` products per step) and
`QuasiNewton-block`. `QuasiNewton-probes8` is `QuasiNewton(diagonal_probes=8)` (the
diagonal of a dense Jacobian estimated from 8 coloured products instead of `d`);
`QuasiNewton-refresh` and `QuasiNewton-keep` are `QuasiNewton(refresh=True)` (the
diagonal recomputed at every iteration) and `refresh=False` (kept from the first
iterate), against the default `refresh="auto"`; likewise `QuasiELK-refresh` and
`QuasiELK-keep`. For every `(d, T, method)` row the script

1. checks the values (final carry and outputs) and the gradient of
   `loss = sum(outputs)` with respect to the GRU parameters (closed over by the step
   function) against `jax.lax.scan`'s, and prints both errors: the largest absolute
   error of each array relative to that array's largest magnitude. A row beyond
   tolerance is marked WRONG and gets no timing and no ratio;
2. times the forward pass and the forward + gradient pass (`jax.value_and_grad`):
   median of `--repeats` calls after a warm-up call, `block_until_ready`;
3. reports the parallel iterations (the most over the batch: `vmap`ped loops run until
   every sequence has converged), whether the sequential fallback ran, the memory of
   the compiled functions (`memory_analysis()`: argument + output + temporary bytes),
   and the gradient's temporary bytes alone against `lax.scan`'s (as
   `benchmarks/memory.py` measures them: where a `T·d²` Jacobian stack shows).

Rows are skipped — and say why — when they cannot fit (dense Newton keeps `T·d²`
Jacobian entries per sequence, forward and backward; the other methods' gradients are
matrix-free, the structured ones' `T·d·k`), when the method already fell back at a
smaller or equal `d` and `T` (it hit its iteration cap: it would again, at a higher
cost), or when a call is predicted, from the same method at the previous `T`, to take
longer than `--max-call`. The speed-up is `lax time / partime time` (above 1: partime is
faster).

Usage, from the repository root:

    python benchmarks/scan.py            # the full sweep; writes benchmarks/results/
    python benchmarks/scan.py --quick    # d=4, T=1e3, two methods: well under a minute
    python benchmarks/scan.py --d 1 4 --T 1e4 --methods Newton Jacobi --repeats 3
    python benchmarks/scan.py --d 64 --T 4096 --batch 1 --float32 --block 2 \
        --out benchmarks/results/scan-d64-block2-cpu-float32.json

Results go to `benchmarks/results/scan-<platform>.json` (and a `.md` table beside it),
where `<platform>` is `jax.devices()[0].platform`; `--quick` writes only with `--out`.
The exit status is 1 if any row is WRONG.
"""

import argparse
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
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


# name -> method, given the block size of `--block` (`None`: a dense GRU).
METHODS = {
    "Newton": lambda k: partime.Newton(),
    "Newton-block": lambda k: partime.Newton(jacobian=partime.BlockDiagonal(k)),
    "QuasiNewton": lambda k: partime.QuasiNewton(),
    "QuasiNewton-block": lambda k: partime.QuasiNewton(
        jacobian=partime.BlockDiagonal(k)
    ),
    "QuasiNewton-probes8": lambda k: partime.QuasiNewton(diagonal_probes=8),
    "QuasiNewton-refresh": lambda k: partime.QuasiNewton(refresh=True),
    "QuasiNewton-keep": lambda k: partime.QuasiNewton(refresh=False),
    "QuasiELK": lambda k: partime.QuasiELK(),
    "QuasiELK-refresh": lambda k: partime.QuasiELK(refresh=True),
    "QuasiELK-keep": lambda k: partime.QuasiELK(refresh=False),
    "Picard": lambda k: partime.Picard(),
    "Jacobi": lambda k: partime.Jacobi(),
}
# Methods that declare the block structure: only with `--block`.
STRUCTURED = ("Newton-block", "QuasiNewton-block")
# (values, gradients): well above each method's convergence tolerance (100 ulps at
# unit scale), well below any real discrepancy.
TOLERANCES = {"float64": (1e-6, 1e-5), "float32": (1e-3, 1e-2)}
_HIGHEST = jax.lax.Precision.HIGHEST


def gru_params(
    key: Any, d: int, dtype: Any, scale: float = 0.5, block: int | None = None
) -> dict:
    """Random GRU weights; input size `d`. The recurrent weights have spectral norm
    about `2 · scale` (= 1), which the gates damp: the step contracts, and Newton
    converges in a few iterations. With `block = k` they are block-diagonal with
    `k x k` blocks (entries scaled by `1/√k` instead of `1/√d`), and so is the
    step's Jacobian."""
    k_in, k_rec, k_bias = jr.split(key, 3)
    recurrent = jr.normal(k_rec, (3, d, d), dtype)
    if block is None:
        recurrent = recurrent / np.sqrt(d)
    else:
        same_block = (np.arange(d) // block)[:, None] == np.arange(d) // block
        recurrent = jnp.where(same_block, recurrent / np.sqrt(block), 0)
    return {
        "W": jr.normal(k_in, (3, d, d), dtype) / np.sqrt(d),
        "U": scale * recurrent,
        "b": 0.1 * jr.normal(k_bias, (4, d), dtype),
    }


def gru(params: dict, h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One GRU step; the output is the new hidden state."""
    # HIGHEST: no reduced-precision matmuls (TF32 on GPUs) in either implementation.
    wx = jnp.einsum("kij,j->ki", params["W"], x, precision=_HIGHEST)
    uh = jnp.einsum("kij,j->ki", params["U"], h, precision=_HIGHEST)
    b = params["b"]
    z = jax.nn.sigmoid(wx[0] + uh[0] + b[0])
    r = jax.nn.sigmoid(wx[1] + uh[1] + b[1])
    n = jnp.tanh(wx[2] + b[2] + r * (uh[2] + b[3]))
    h = (1 - z) * n + z * h
    return h, h


def tanh_rnn(params: dict, h: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A plain tanh RNN on the GRU's first weights, `h = tanh(1.6 U_0 h + W_0 x + b_0)`:
    recurrent weights of spectral norm about 1.6, contracting through `tanh' < 1`;
    no gate puts a large term on the Jacobian's diagonal."""
    pre = (
        1.6 * jnp.matmul(params["U"][0], h, precision=_HIGHEST)
        + jnp.matmul(params["W"][0], x, precision=_HIGHEST)
        + params["b"][0]
    )
    h = jnp.tanh(pre)
    return h, h


CELLS = {"gru": gru, "tanh": tanh_rnn}


def forward(scan_fn, cell=gru):
    """`(params, xs, h0) -> (carry, ys, extras)` over the batch."""

    def fn(params, xs, h0):
        step = lambda h, x: cell(params, h, x)
        return jax.vmap(lambda x, h: scan_fn(step, h, x))(xs, h0)

    return fn


def lax_scan(step, h, x):
    carry, ys = jax.lax.scan(step, h, x)
    return carry, ys, None


def partime_scan(method, step, h, x):
    carry, ys, stats = partime.scan(step, h, x, method=method, return_stats=True)
    return carry, ys, (stats.num_iterations, stats.num_sequential_steps)


def value_and_grad(scan_fn, cell=gru):
    """`(params, xs, h0) -> (loss, d loss / d params)`, `loss = sum(outputs)`."""

    def loss(params, xs, h0):
        _, ys, _ = forward(scan_fn, cell)(params, xs, h0)
        return jnp.sum(ys)

    return jax.value_and_grad(loss)


def _fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1e3 * seconds:.1f}"


def _fmt_mb(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.0f}"


def _fmt_temp(part: dict[str, Any], reference: dict[str, Any]) -> str:
    """Temporary MiB, and the ratio to the reference's."""
    temp, ref = part.get("temp_bytes"), reference.get("temp_bytes")
    if temp is None:
        return "-"
    ratio = f" ({temp / ref:.1f}x)" if ref else ""
    return f"{temp / 2**20:.1f}{ratio}"


def _temp_bytes(compiled: Any) -> int | None:
    """The temporary bytes of a compiled function (`None` if not reported)."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # not implemented on every backend
        return None


def _fmt_err(error: float | None) -> str:
    return "-" if error is None else f"{error:.1e}"


def _fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3g}"


class Sweep:
    """Runs the rows, skipping what cannot fit or would take too long."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cell = CELLS[args.cell]
        self.dtype = jnp.float32 if args.float32 else jnp.float64
        self.itemsize = jnp.dtype(self.dtype).itemsize
        self.value_tol, self.grad_tol = TOLERANCES[jnp.dtype(self.dtype).name]
        if args.max_memory_gb is not None:
            self.memory_limit = int(args.max_memory_gb * 2**30)
        else:
            # A quarter of the device: room for XLA's own buffers, the reference
            # computation and (on a shared machine) everybody else.
            self.memory_limit = (device_memory_bytes() or 16 * 2**30) // 4
        # Compiling is not free: rows whose dominant buffer alone is over half the
        # limit (the compiled function holds at least twice that) are not compiled.
        self.estimate_limit = self.memory_limit // 2
        # (method, d, "f" or "g") -> (T, seconds) of the last call made.
        self.last_call: dict[tuple, tuple[int, float]] = {}
        # method -> (d, T) of the first row where it fell back.
        self.fell_back: dict[str, tuple[int, int]] = {}

    def measure(self, fn, args, key, T, check) -> tuple[dict[str, Any], Any]:
        """Compile, check with one call, then time: `(info, output of the call)`.

        `check(output)` returns `(error, tolerance, extras)`. Skips (output `None`)
        when over the memory limit or predicted to be slower than `--max-call`."""
        method = key[0]
        out: dict[str, Any] = {}
        if key in self.last_call and method != "lax.scan":
            prev_T, prev_s = self.last_call[key]
            predicted = prev_s * T / prev_T
            if predicted > self.args.max_call:
                out["skip"] = (
                    f"predicted {predicted:.0f} s per call (from T={prev_T}) > "
                    f"--max-call {self.args.max_call:g} s"
                )
                return out, None
        compiled, out["compile_s"] = compile_fn(fn, *args)
        out["memory_bytes"] = memory_bytes(compiled)
        out["temp_bytes"] = _temp_bytes(compiled)
        if out["memory_bytes"] is not None and out["memory_bytes"] > self.memory_limit:
            out["skip"] = (
                f"compiled memory {out['memory_bytes'] / 2**30:.1f} GiB > limit "
                f"{self.memory_limit / 2**30:.1f} GiB"
            )
            return out, None
        result, first_s = run_once(compiled, *args)
        self.last_call[key] = (T, first_s)
        error, tol, extras = check(result)
        out.update(extras)
        out["error"] = error
        if error is not None and not error <= tol:  # NaN is wrong too
            out["wrong"] = True
            return out, result
        timing = time_calls(
            compiled, args, self.args.repeats, self.args.budget, first_s
        )
        out["median_s"] = timing["median_s"]
        out["times_s"] = timing["times_s"]
        self.last_call[key] = (T, timing["median_s"])
        return out, result

    def run_case(self, d: int, T: int) -> list[dict[str, Any]]:
        batch = self.args.batch
        k_params, k_xs, k_h0 = jr.split(jr.fold_in(jr.PRNGKey(0), d), 3)
        params = gru_params(k_params, d, self.dtype, block=self.args.block)
        xs = jr.normal(k_xs, (batch, T, d), self.dtype)
        h0 = 0.1 * jr.normal(k_h0, (batch, d), self.dtype)
        args = (params, xs, h0)
        no_check = lambda _: (None, None, {})

        lax_fwd, reference = self.measure(
            forward(lax_scan, self.cell), args, ("lax.scan", d, "f"), T, no_check
        )
        lax_grad, grad_reference = self.measure(
            value_and_grad(lax_scan, self.cell),
            args,
            ("lax.scan", d, "g"),
            T,
            no_check,
        )
        print(
            f"\nd={d} T={T} batch={batch}: lax.scan forward "
            f"{_fmt_ms(lax_fwd.get('median_s'))} ms "
            f"({_fmt_mb(lax_fwd.get('memory_bytes'))} MiB), forward+gradient "
            f"{_fmt_ms(lax_grad.get('median_s'))} ms "
            f"({_fmt_mb(lax_grad.get('memory_bytes'))} MiB)",
            flush=True,
        )

        def check_values(result):
            carry, ys, (iterations, sequential) = result
            error = max_rel_error((carry, ys), reference[:2])
            extras = {
                "iterations": int(jnp.max(iterations)),
                "iterations_min": int(jnp.min(iterations)),
                "fell_back": bool(jnp.any(sequential > 0)),
                "sequential_steps": int(jnp.max(sequential)),
            }
            return error, self.value_tol, extras

        def check_grads(result):
            error = max_rel_error(result, grad_reference)
            return error, self.grad_tol, {}

        rows = []
        for name in self.methods:
            scan_fn = functools.partial(partime_scan, METHODS[name](self.args.block))
            row: dict[str, Any] = {"d": d, "T": T, "batch": batch, "method": name}
            row["lax_forward"], row["lax_gradient"] = lax_fwd, lax_grad
            forward_skip, gradient_skip = self.plan(name, d, T)
            if reference is None:
                forward_skip = forward_skip or "lax.scan reference skipped"
            if grad_reference is None:
                gradient_skip = gradient_skip or "lax.scan reference skipped"
            if forward_skip:
                row["forward"] = {"skip": forward_skip}
            else:
                row["forward"], _ = self.measure(
                    forward(scan_fn, self.cell),
                    args,
                    (name, d, "f"),
                    T,
                    check_values,
                )
                if "skip" in row["forward"]:
                    gradient_skip = gradient_skip or row["forward"]["skip"]
            if gradient_skip or forward_skip:
                row["gradient"] = {"skip": gradient_skip or forward_skip}
            else:
                row["gradient"], _ = self.measure(
                    value_and_grad(scan_fn, self.cell),
                    args,
                    (name, d, "g"),
                    T,
                    check_grads,
                )
            if row["forward"].get("fell_back"):
                self.fell_back.setdefault(name, (d, T))
            for kind in ("forward", "gradient"):
                lax_s = row["lax_" + kind].get("median_s")
                s = row[kind].get("median_s")
                row[kind]["speedup"] = None if s is None or lax_s is None else lax_s / s
            rows.append(row)
            print("  " + " | ".join(table_row(row)[2:]), flush=True)
        return rows

    def plan(self, name: str, d: int, T: int) -> tuple[str | None, str | None]:
        """Reasons to skip the forward and the gradient row before compiling them."""
        if name in self.fell_back:
            d_0, T_0 = self.fell_back[name]
            if d_0 <= d and T_0 <= T:
                reason = (
                    f"fell back (hit its iteration cap) at d={d_0}, T={T_0}: would "
                    "fall back again, at higher cost"
                )
                return reason, reason
        # Dense Newton stores a d x d Jacobian per step, forward and backward (its
        # derivative is one dense scan); the other methods' derivatives are
        # matrix-free, the structured ones' d x k per step.
        jacobians = T * d * d * self.args.batch * self.itemsize
        if name != "Newton" or jacobians <= self.estimate_limit:
            return None, None
        reason = (
            f"T·d²·batch Jacobians {jacobians / 2**30:.1f} GiB > "
            f"{self.estimate_limit / 2**30:.1f} GiB (half the memory limit)"
        )
        return reason, reason

    def run(self) -> list[dict[str, Any]]:
        self.methods = self.args.methods
        rows = []
        for d in self.args.d:
            for T in sorted(self.args.T):
                rows += self.run_case(d, T)
        return rows


HEADER = [
    "d",
    "T",
    "method",
    "iters",
    "fell back",
    "value err",
    "grad err",
    "lax fwd ms",
    "fwd ms",
    "fwd ms / iter",
    "fwd speed-up",
    "lax grad ms",
    "grad ms",
    "grad speed-up",
    "fwd/grad MiB",
    "grad temp MiB (x lax)",
    "note",
]


def table_row(row: dict[str, Any]) -> list[str]:
    fwd, grad = row["forward"], row["gradient"]
    notes = []
    for kind, part in (("values", fwd), ("gradients", grad)):
        if part.get("wrong"):
            notes.append(f"WRONG {kind}")
    if "skip" in fwd:
        notes.append("skipped: " + fwd["skip"])
    if "skip" in grad and grad["skip"] != fwd.get("skip"):
        notes.append("gradient skipped: " + grad["skip"])
    for kind in ("forward", "gradient"):
        if "skip" in row["lax_" + kind]:
            notes.append(f"lax.scan {kind} skipped: " + row["lax_" + kind]["skip"])
    if fwd.get("fell_back"):
        notes.append(f"{fwd['sequential_steps']} steps sequential")
    iterations = fwd.get("iterations")
    if iterations is not None and iterations != fwd["iterations_min"]:
        iters = f"{fwd['iterations_min']}-{iterations}"
    else:
        iters = "-" if iterations is None else str(iterations)
    return [
        str(row["d"]),
        f"{row['T']:.0e}".replace("e+0", "e"),
        row["method"],
        iters,
        "-" if "fell_back" not in fwd else ("yes" if fwd["fell_back"] else "no"),
        _fmt_err(fwd.get("error")),
        _fmt_err(grad.get("error")),
        _fmt_ms(row["lax_forward"].get("median_s")),
        _fmt_ms(fwd.get("median_s")),
        _fmt_ms(
            fwd["median_s"] / iterations if fwd.get("median_s") and iterations else None
        ),
        _fmt_ratio(fwd.get("speedup")),
        _fmt_ms(row["lax_gradient"].get("median_s")),
        _fmt_ms(grad.get("median_s")),
        _fmt_ratio(grad.get("speedup")),
        f"{_fmt_mb(fwd.get('memory_bytes'))}/{_fmt_mb(grad.get('memory_bytes'))}",
        _fmt_temp(grad, row["lax_gradient"]),
        "; ".join(notes),
    ]


def markdown_report(payload: dict[str, Any]) -> str:
    """The table of a results JSON, under a paragraph on what it was measured on."""
    env, settings = payload["environment"], payload["settings"]
    dtype = "float32" if settings["float32"] else "float64"
    loads = [env.get(f"load_average_at_{when}") for when in ("start", "end")]
    busy = any(load and load[0] > (env["cpu_count"] or 1) for load in loads)
    about = (
        f"{env['device_kind']} ({env['platform']}, {env['cpu_count']} CPUs), "
        f"jax {env['jax']}, {dtype}, batch {settings['batch']}, {env['date']}, "
        f"commit {env['git_commit']}; load average at start/end "
        f"{_fmt_load(loads[0])} / {_fmt_load(loads[1])}"
        + (" (more busy threads than CPUs: the timings are noisy)" if busy else "")
        + f"; {payload['wall_s']:.0f} s in all. Times in ms (median after warm-up; "
        "per iteration: the forward time over the iterations); "
        "speed-up = lax.scan time / partime time; errors are max |partime - lax| / "
        f"max |lax| (WRONG above {settings['value_tolerance']:g} for values, "
        f"{settings['gradient_tolerance']:g} for gradients); memory from "
        "`memory_analysis()` of the compiled forward / forward+gradient function "
        "(argument + output + temporary), and the forward+gradient function's "
        "temporary bytes alone with their ratio to lax.scan's."
        + (
            f" GRU recurrent weights block-diagonal, {settings['block']}x"
            f"{settings['block']} blocks."
            if settings.get("block")
            else ""
        )
    )
    table = [table_row(row) for row in payload["rows"]]
    return f"# {payload['benchmark']}\n\n{about}\n\n" + markdown_table(HEADER, table)


def _fmt_load(load: list[float] | None) -> str:
    return "n/a" if load is None else f"{load[0]:.1f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true", help="d=4, T=1e3, 2 methods")
    parser.add_argument("--d", type=int, nargs="+", help="default: 1 4 16 64")
    parser.add_argument(
        "--T", type=lambda s: int(float(s)), nargs="+", help="default: 1e3 1e4 1e5"
    )
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), help="default: all"
    )
    parser.add_argument("--batch", type=int, default=16, help="default: 16")
    parser.add_argument(
        "--cell",
        choices=list(CELLS),
        default="gru",
        help="the recurrence: a GRU (default) or a plain tanh RNN on its weights",
    )
    parser.add_argument(
        "--block",
        type=int,
        default=None,
        help="block-diagonal recurrent weights with this block size, and the "
        "structured methods; default: dense",
    )
    parser.add_argument("--repeats", type=int, help="timed calls per row; default: 5")
    parser.add_argument(
        "--budget",
        type=float,
        default=5.0,
        help="seconds of timed calls per measurement: fewer repeats (at least one) "
        "for slow calls; default: 5",
    )
    parser.add_argument(
        "--max-call",
        type=float,
        default=20.0,
        help="skip a row whose call is predicted (from the previous T) to take "
        "longer (seconds); default: 20",
    )
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="skip rows whose compiled function needs more; default: a quarter of "
        "the device's memory",
    )
    parser.add_argument("--float32", action="store_true", help="default: float64")
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (a .md table is written beside it); default "
        "benchmarks/results/scan-<platform>.json, none with --quick",
    )
    args = parser.parse_args(argv)
    # --quick changes the defaults; explicit options still win.
    defaults = {
        "d": [1, 4, 16, 64],
        "T": [10**3, 10**4, 10**5],
        "methods": [
            m for m in METHODS if args.block is not None or m not in STRUCTURED
        ],
        "repeats": 5,
    }
    if args.quick:
        defaults.update(d=[4], T=[10**3], methods=["Newton", "QuasiNewton"], repeats=3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.block is None and set(args.methods) & set(STRUCTURED):
        parser.error(f"{', '.join(STRUCTURED)} need --block (a block-diagonal GRU)")
    if args.block is not None and any(d % args.block for d in args.d):
        parser.error(f"every --d must be a multiple of --block {args.block}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Before any array exists. With x64 on, float32 inputs would be silently promoted.
    jax.config.update("jax_enable_x64", not args.float32)
    env = environment()
    print(
        f"partime.scan vs jax.lax.scan ({args.cell}, batch {args.batch}) on "
        f"{env['device_kind']} ({env['platform']}, {env['cpu_count']} CPUs), "
        f"jax {env['jax']}, {'float32' if args.float32 else 'float64'}",
        flush=True,
    )
    sweep = Sweep(args)
    start = time.perf_counter()
    rows = sweep.run()
    wall_s = time.perf_counter() - start
    table = [table_row(row) for row in rows]
    print("\n" + text_table(HEADER, table))
    print(f"{wall_s:.0f} s in all")
    wrong = [r for r in rows if r["forward"].get("wrong") or r["gradient"].get("wrong")]

    out = args.out
    if out is None and not args.quick:
        results = Path(__file__).parent / "results"
        out = results / f"scan-{env['platform']}.json"
    if out is not None:
        out = Path(out)
        env["load_average_at_end"] = list(os.getloadavg())
        payload = {
            "benchmark": f"partime.scan vs jax.lax.scan, {args.cell} cell"
            + ("" if args.block is None else f", {args.block}x{args.block} blocks"),
            "environment": env,
            "settings": {
                **{k: v for k, v in vars(args).items() if k != "out"},
                "memory_limit_bytes": sweep.memory_limit,
                "value_tolerance": sweep.value_tol,
                "gradient_tolerance": sweep.grad_tol,
                "loss": "sum of outputs; gradient w.r.t. the GRU parameters",
                "error": "max |partime - lax| / max |lax|, per array, largest",
            },
            "wall_s": wall_s,
            "rows": rows,
        }
        write_json(out, payload)
        out.with_suffix(".md").write_text(markdown_report(payload))
        print(f"wrote {out} and {out.with_suffix('.md')}")
    if wrong:
        print(f"{len(wrong)} row(s) WRONG", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
