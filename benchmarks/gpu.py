"""Benchmark: the headline table for one accelerator, in at most 8 minutes.

Two set-ups, float32, every matrix product at full float32 precision on both sides
(`jax_default_matmul_precision="highest"`: no TF32), against the sequential
computation on the same grid:

- **GRU** (DEER's set-up): a batch of 16 sequences, hidden size `d` (= input size),
  random weights that contract (`scan.gru_params`), random inputs; `partime.scan` with
  `Newton()` and `QuasiNewton()` against `jax.lax.scan`, for `d` in {1, 8, 64} and `T`
  in {1e3, 1e4, 1e5}, and `T` = 1e6 solved in windows (`window=W`, the sliding
  schedule; `W` the largest of 1e3, 1e4, 1e5 whose Jacobians, `W·d²·batch` floats,
  take at most 4 GiB, or `--window`). Forward: final carries and all outputs;
  gradient: `jax.value_and_grad` of the sum of the outputs with respect to the GRU's
  weights.
- **Neural ODE**: `dy/dt = MLP(y)` (`ode.VectorField`: width 64, depth 2, tanh) on
  `[0, 1]`, `y` in R^d; `diffrax.diffeqsolve` with `partime.ParallelSolver(Tsit5(),
  num_steps=T)` (one window) against `Tsit5()` stepping `dt0 = 1/T` sequentially, for
  `d` in {4, 16, 64} and `T` in {1e3, 1e4, 1e5}. Forward: `y(1)`; gradient:
  `jax.value_and_grad` of `sum(y(1)²)` with respect to the MLP and `y0` (diffrax's
  default adjoint on both sides).

Every function is compiled ahead of time (`compile s`: lowering + compiling, wall
seconds; a row's functions are lowered one by one, then compiled concurrently, up to
`--compile-threads` at once), then called once: that call is the warm-up and the
check. Values and gradients are compared with the reference's (largest absolute error
of each array relative to that array's largest magnitude: WRONG above 1e-3 for values,
1e-2 for gradients; NaN is WRONG), and so is the gradient's norm (a gradient that is
fast because it is zero is WRONG); a WRONG row is not timed. Then it is timed: the
median of up to `--repeats` blocking calls (`jax.block_until_ready`), as many as fit
in `--time-per-function` seconds, at least one; a function whose checking call took
longer than `--single-call` seconds is timed by that call alone (its warm-up costs are
then a negligible part), marked `1 call`. Speed-up = reference time / partime time
(above 1: partime is faster). A function that raises (out of memory, say) is marked
FAILED and the run goes on.

Per row it also reports the parallel iterations (over the batch: min-max), fallbacks
(sequences, or solves, that the exact sequential fallback finished), the compiled
function's memory (`memory_analysis()`: argument + output + temporary bytes) and the
device's peak: the most device memory in use during the checking call beyond what
was in use before it, from `device.memory_stats()` (where the backend reports it;
`≤` where an earlier, higher peak of the process hides the call's own).

**Budget.** Rows run in order of `T`: 1e4 first, then the larger, then the smaller
(1e3: on a GPU, compiling is all they cost), so the ones left out when time runs
short are the largest and the smallest. Before compiling a function the script
predicts its cost from the same function at the last `T` it ran at (compile time
scaled by `log T`, call time by `T`) and skips it, and says so in the table, when a
call would take longer than `--max-call` seconds or the function would not finish,
with a margin of half its predicted time, within `--budget` seconds of the start (a
function with nothing to predict from starts only with a minute left);
functions whose memory (estimated from their Jacobians before compiling, then read
off the compiled function) exceeds half the device's memory (`--max-memory-gb`) are
skipped too. The results are rewritten after every row, so a run stopped from outside
keeps what it measured.

Usage, from the repository root (the project on `PYTHONPATH` or installed):

    python benchmarks/gpu.py             # the full table: at most ~8 min on one GPU
    python benchmarks/gpu.py --quick     # tiny sizes, Newton only: CI on a CPU
    python benchmarks/gpu.py --problems gru --gru-d 8 --gru-T 1e4 1e5

Results go to `benchmarks/results/gpu-<device>.json` and a `.md` table beside it,
`<device>` the device's kind (e.g. `nvidia-h200`), with the device, JAX version and
commit; `--quick` writes only with `--out`. The exit status is 1 if any row is WRONG
or FAILED.
"""

import argparse
import functools
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import ode
import scan
from _common import (
    device_memory_bytes,
    environment,
    markdown_table,
    memory_bytes,
    rel_errors,
    run_once,
    text_table,
    time_calls,
    write_json,
)

import partime


DTYPE = jnp.float32
ITEMSIZE = 4
VALUE_TOL, GRAD_TOL = scan.TOLERANCES["float32"]
METHODS = {"Newton": partime.Newton, "QuasiNewton": partime.QuasiNewton}
PREDICTION_MARGIN = 1.5
# A function with no prediction starts only with this many seconds left.
UNPREDICTED_S = 60.0


# The functions ----------------------------------------------------------------------


def partime_scan(method, window, step, h, x):
    """`partime.scan` with the stats a row reports: iterations and where the
    sequential fallback started (the sequence length if it did not run)."""
    carry, ys, stats = partime.scan(
        step, h, x, method=method, window=window, return_stats=True
    )
    return carry, ys, (stats.num_iterations, stats.fallback_start)


def gru_case(d: int, T: int, window: int | None, args) -> dict[str, Any]:
    """Inputs and functions of a GRU row: `{"make_args", "reference", "solvers"}`,
    the inputs made only if something runs, each function a `(forward, gradient)`
    pair."""

    def make_args():
        key = jr.fold_in(jr.fold_in(jr.key(0), d), T)
        k_params, k_xs, k_h0 = jr.split(key, 3)
        params = scan.gru_params(k_params, d, DTYPE)
        xs = jr.normal(k_xs, (args.batch, T, d), DTYPE)
        h0 = 0.1 * jr.normal(k_h0, (args.batch, d), DTYPE)
        return params, xs, h0

    solvers = {}
    for name in args.methods:
        scan_fn = functools.partial(partime_scan, METHODS[name](), window)
        solvers[name] = (scan.forward(scan_fn), scan.value_and_grad(scan_fn))
    return {
        "make_args": make_args,
        "reference": (
            "lax.scan",
            scan.forward(scan.lax_scan),
            scan.value_and_grad(scan.lax_scan),
        ),
        "solvers": solvers,
    }


def ode_case(d: int, T: int, args) -> dict[str, Any]:
    """`gru_case` for the neural ODE: `ParallelSolver(Tsit5(), num_steps=T)` against
    sequential Tsit5 on the same grid."""
    del args
    key = jr.fold_in(jr.fold_in(jr.key(1), d), T)
    k_field, k_y0 = jr.split(key)
    params, static = eqx.partition(ode.VectorField(d, k_field), eqx.is_array)
    params = jtu.tree_map(lambda x: x.astype(DTYPE), params)
    y0 = jr.normal(k_y0, (d,), DTYPE)  # small: made at once

    def functions(parallel: bool):
        solve, _ = ode.make_functions("tsit5", T, parallel, static)
        loss = lambda p, y: jnp.sum(solve(p, y)[0] ** 2)
        return solve, jax.value_and_grad(loss, argnums=(0, 1))

    return {
        "make_args": lambda: (params, y0),
        "reference": ("diffrax Tsit5", *functions(False)),
        "solvers": {"ParallelSolver": functions(True)},
    }


# Checks -----------------------------------------------------------------------------


@jax.jit
def _compare(x: Any, y: Any, u: Any, v: Any) -> tuple[jax.Array, jax.Array]:
    """`max_rel_error(x, y)` and the ratio of the norms of `u` and `v`, in one
    compiled program (op by op, every array shape would compile its own kernels)."""
    error = jnp.max(jnp.stack(rel_errors(x, y)))
    norm = lambda tree: jnp.sqrt(sum(jnp.sum(a**2) for a in jtu.tree_leaves(tree)))
    return error, norm(u) / norm(v)


def check_forward(problem: str, T: int, out: Any, ref: Any) -> dict[str, Any]:
    """Errors of the values, iterations and fallbacks of a partime forward call."""
    if problem == "gru":
        carry, ys, (iterations, fallback_start) = out
        error, _ = _compare((carry, ys), ref[:2], carry, ref[0])
        fallbacks = int(np.sum(np.asarray(fallback_start) < T))
    else:
        y1, (iterations, fallbacks) = out
        error, _ = _compare(y1, ref[0], y1, ref[0])
        fallbacks = int(fallbacks)
    error = float(error)
    iterations = np.asarray(iterations)
    return {
        "error": error,
        "wrong": not error <= VALUE_TOL,  # NaN is wrong too
        "iterations": int(iterations.max()),
        "iterations_min": int(iterations.min()),
        "fallbacks": fallbacks,
    }


def check_gradient(out: Any, ref: Any) -> dict[str, Any]:
    """Errors of `(loss, gradient)` and the ratio of the gradients' norms: a zero or
    vanishing gradient is WRONG even where the loss agrees (a zero reference makes
    the ratio NaN: WRONG too)."""
    error, norm_ratio = _compare(out, ref, out[1], ref[1])
    error, norm_ratio = float(error), float(norm_ratio)
    wrong = not (error <= GRAD_TOL and abs(norm_ratio - 1) <= GRAD_TOL)
    return {"error": error, "norm_ratio": norm_ratio, "wrong": wrong}


# Measuring within a budget ----------------------------------------------------------


def _memory_stats() -> dict[str, int] | None:
    stats = jax.devices()[0].memory_stats()
    return stats if stats and "peak_bytes_in_use" in stats else None


class Runner:
    """Compiles, checks and times functions, skipping what would not fit the memory
    or the time budget."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.start = time.perf_counter()
        if args.max_memory_gb is not None:
            self.memory_limit = int(args.max_memory_gb * 2**30)
        else:
            self.memory_limit = (device_memory_bytes() or 16 * 2**30) // 2
        # (problem, d, solver, kind) -> (T, compile seconds, seconds per call).
        self.history: dict[tuple, tuple[int, float, float]] = {}

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.start)

    def _calls(self, call_s: float) -> int:
        """Calls a function makes: the checking call and the timed ones."""
        if call_s > self.args.single_call:
            return 1
        timed = min(self.args.repeats, int(self.args.time_per_function // call_s))
        return 1 + max(1, timed)

    def predict(self, key: tuple, T: int) -> tuple[float, float] | None:
        """`(seconds per call, seconds in all)` from the same function at the
        previous `T` it ran at, `None` if it has not run."""
        if key not in self.history:
            return None
        T_0, compile_0, call_0 = self.history[key]
        call = call_0 * T / T_0
        compile_s = compile_0 * max(1.0, math.log(T) / math.log(T_0))
        return call, compile_s + call * self._calls(call)

    def plan(self, key: tuple, T: int, memory_estimate: int, spent: float):
        """`(reason to skip or None, predicted seconds)`, `spent` the seconds that
        the functions planned before it in this row are predicted to take. Not
        even compiled: functions whose estimated memory is over the limit."""
        if memory_estimate > self.memory_limit:
            return (
                f"~{memory_estimate / 2**30:.0f} GiB of Jacobians > "
                f"{self.memory_limit / 2**30:.0f} GiB (half the memory)"
            ), 0.0
        predicted = self.predict(key, T)
        left = self.left() - spent
        if predicted is None:  # the first T it runs at: its cost is unknown
            if left < UNPREDICTED_S:
                return f"out of time: cost unknown, {max(left, 0):.0f} s left", 0.0
            return None, 0.0
        call, total = predicted
        if call > self.args.max_call:
            return (
                f"predicted {call:.0f} s per call (from T={self.history[key][0]:.0e})"
                f" > --max-call {self.args.max_call:g} s"
            ), 0.0
        # A margin: compile times vary with the concurrency and the load (on the CPU
        # a row of T=1e5 took 1.2 times its prediction).
        total *= PREDICTION_MARGIN
        if total > left:
            return f"out of time: needs ~{total:.0f} s, {max(left, 0):.0f} s left", 0.0
        return None, total

    def compile_all(self, jobs: list[dict[str, Any]], fn_args: tuple) -> None:
        """Lowers every job's function (tracing: one at a time), then compiles them
        concurrently (XLA releases the GIL): `job["compiled"]`, `job["compile_s"]`
        (lowering + compiling, wall seconds), or `job["failed"]`."""

        def lower(job):
            start = time.perf_counter()
            job["lowered"] = jax.jit(job["fn"]).lower(*fn_args)
            job["lower_s"] = time.perf_counter() - start

        def compile_one(job):
            start = time.perf_counter()
            job["compiled"] = job.pop("lowered").compile()
            job["compile_s"] = job.pop("lower_s") + time.perf_counter() - start

        for job in jobs:
            _guard(job, lower)
        todo = [job for job in jobs if "lowered" in job]
        with ThreadPoolExecutor(max(1, self.args.compile_threads)) as pool:
            list(pool.map(lambda job: _guard(job, compile_one), todo))

    def execute(self, job: dict[str, Any], fn_args: tuple, T: int):
        """Check the memory, call once (warm-up and check), time: `(info, output)`.
        `job["check"]` maps the output to a dict; with `"wrong": True`, no timing."""
        compiled = job.pop("compiled")
        info: dict[str, Any] = {"compile_s": job["compile_s"]}
        info["memory_bytes"] = memory_bytes(compiled)
        if (info["memory_bytes"] or 0) > self.memory_limit:
            info["skip"] = (
                f"compiled memory {info['memory_bytes'] / 2**30:.1f} GiB > "
                f"{self.memory_limit / 2**30:.1f} GiB (half the memory)"
            )
            return info, None
        before = _memory_stats()
        out, first_s = run_once(compiled, *fn_args)
        after = _memory_stats()
        if before and after:
            new_peak = after["peak_bytes_in_use"] > before["peak_bytes_in_use"]
            peak = (
                after["peak_bytes_in_use"] if new_peak else before["peak_bytes_in_use"]
            )
            info["device_peak_bytes"] = peak - before["bytes_in_use"]
            info["device_peak_is_bound"] = not new_peak
        info["first_s"] = first_s
        self.history[job["key"]] = (T, info["compile_s"], first_s)
        info.update(job["check"](out))
        if info.get("wrong"):
            return info, out
        if first_s > self.args.single_call:
            info["median_s"], info["times_s"] = first_s, [first_s]
            info["timed_by_check"] = True
        else:
            timing = time_calls(
                compiled,
                fn_args,
                self.args.repeats,
                self.args.time_per_function,
                first_s,
            )
            info["median_s"], info["times_s"] = timing["median_s"], timing["times_s"]
        self.history[job["key"]] = (T, info["compile_s"], info["median_s"])
        return info, out

    def run_case(self, problem: str, d: int, T: int, window: int | None) -> list:
        """The reference's row and one row per partime solver."""
        batch = self.args.batch if problem == "gru" else 1
        case = (
            gru_case(d, T, window, self.args)
            if problem == "gru"
            else ode_case(d, T, self.args)
        )
        ref_name, ref_fwd, ref_grad = case["reference"]
        steps = window or T
        # Dense T·d² Jacobians: every gradient's implicit reverse scan, Newton's
        # forward (QuasiNewton's is diagonal). The compiled functions hold about
        # three times their size (seen on the CPU: 3.2 for Newton at d=64), and
        # the ODE's about eight (Tsit5's stages).
        copies = 3 if problem == "gru" else 8
        dense = copies * batch * steps * d * d * ITEMSIZE
        diagonal = copies * batch * steps * d * ITEMSIZE
        base = {"problem": problem, "d": d, "T": T, "window": window}

        # Plan: which functions run, in which order (the references first).
        rows = [{**base, "solver": ref_name, "reference": True}]
        rows += [
            {**base, "solver": name, "reference": False} for name in case["solvers"]
        ]
        jobs, spent = [], 0.0
        for row in rows:
            name = row["solver"]
            fns = (ref_fwd, ref_grad) if row["reference"] else case["solvers"][name]
            for kind, fn in zip(("forward", "gradient"), fns, strict=True):
                ref_part = rows[0].get(kind, {})
                if not row["reference"] and "skip" in ref_part:
                    row[kind] = {"skip": f"no {ref_name} {kind} to check against"}
                    continue
                if kind == "gradient" and "skip" in row["forward"]:
                    row[kind] = {"skip": row["forward"]["skip"]}
                    continue
                if row["reference"]:
                    jac = 0
                elif kind == "gradient" or name != "QuasiNewton":
                    jac = max(dense, diagonal)
                else:
                    jac = diagonal
                key = (problem, d, name, kind)
                reason, cost = self.plan(key, T, jac, spent)
                if reason:
                    row[kind] = {"skip": reason}
                    continue
                spent += cost
                row[kind] = {}
                jobs.append({"row": row, "kind": kind, "fn": fn, "key": key})

        # A reference with nothing to compare with is not run.
        for kind in KINDS:
            if not any(j["kind"] == kind and not j["row"]["reference"] for j in jobs):
                if "skip" not in rows[0][kind]:
                    rows[0][kind] = {"skip": "no partime function to compare with"}
                jobs = [j for j in jobs if j["kind"] != kind]
        if not jobs:
            for row in rows:
                for kind in KINDS:
                    self._progress(row, kind)
            return rows
        fn_args = case["make_args"]()
        self.compile_all(jobs, fn_args)
        outputs: dict[str, Any] = {}
        for job in jobs:
            row, kind = job["row"], job["kind"]
            reference = outputs.get(kind)
            if "failed" in job:
                row[kind] = {"failed": job["failed"]}
            elif not row["reference"] and reference is None:
                row[kind] = {"skip": f"no {ref_name} {kind} to check against"}
            else:
                if row["reference"]:
                    job["check"] = lambda _: {}
                elif kind == "gradient":
                    job["check"] = functools.partial(check_gradient, ref=reference)
                else:
                    job["check"] = functools.partial(
                        check_forward, problem, T, ref=reference
                    )
                result = _guard(job, lambda job: self.execute(job, fn_args, T))
                if result is None:
                    row[kind] = {"compile_s": job["compile_s"], "failed": job["failed"]}
                else:
                    row[kind], out = result
                    if row["reference"]:
                        outputs[kind] = out
            job.pop("compiled", None)
            self._progress(row, kind)
        for row in rows[1:]:
            for kind in ("forward", "gradient"):
                ref_s = rows[0][kind].get("median_s")
                s = row[kind].get("median_s")
                if ref_s is not None and s is not None:
                    row[kind]["speedup"] = ref_s / s
        return rows

    def _progress(self, row: dict[str, Any], kind: str) -> None:
        info = row[kind]
        if "skip" in info:
            done = f"skipped: {info['skip']}"
        elif "failed" in info:
            done = f"FAILED: {info['failed']}"
        elif info.get("wrong"):
            done = f"WRONG (error {info['error']:.1e})"
        else:
            ms, compile_s = 1e3 * info["median_s"], info["compile_s"]
            done = f"{ms:.1f} ms, compiled in {compile_s:.1f} s"
        print(
            f"  [{time.perf_counter() - self.start:5.0f} s] {row['problem']} "
            f"d={row['d']} T={row['T']:.0e} {row['solver']} {kind}: {done}",
            flush=True,
        )


def _guard(job: dict[str, Any], fn):
    """`fn(job)`, or `None` with `job["failed"]` set if it raised: one function that
    fails (out of memory, say) costs its row, not the run."""
    try:
        return fn(job)
    except Exception as error:  # reported in the table
        first_line = (str(error).splitlines() or [""])[0]
        job["failed"] = f"{type(error).__name__}: {first_line[:200]}"
        return None


def default_window(d: int, batch: int, limit: int = 4 * 2**30) -> int:
    """The largest of 1e3, 1e4, 1e5 whose `W·d²·batch` float32 Jacobians fit in
    `limit` bytes (1e3 if none does)."""
    fits = [W for W in (10**3, 10**4, 10**5) if W * d * d * batch * ITEMSIZE <= limit]
    return max(fits, default=10**3)


def cases(args) -> list[tuple[str, int, int, int | None]]:
    """`(problem, d, T, window)` in the order they run."""
    out = []
    if "gru" in args.problems:
        out += [("gru", d, T, None) for d in args.gru_d for T in args.gru_T]
        for T in args.windowed_T:
            for d in args.gru_d:
                W = args.window or default_window(d, args.batch)
                out.append(("gru", d, T, min(W, T)))
    if "ode" in args.problems:
        out += [("ode", d, T, None) for d in args.ode_d for T in args.ode_T]
    # T = 1e4 and up first, smallest first, so that each predicts the next; then the
    # smaller T (each row predicted from 1e4), left out first when time runs short.
    # Stable: within one T, the GRU before the ODE, small d first.
    return sorted(out, key=lambda c: (c[2] < 10**4, c[2]))


# Reporting --------------------------------------------------------------------------

HEADER = [
    "problem",
    "d",
    "T",
    "solver",
    "iters",
    "fallbacks",
    "value err",
    "grad err",
    "fwd ms",
    "grad ms",
    "fwd speed-up",
    "grad speed-up",
    "compile s fwd/grad",
    "MiB fwd/grad",
    "peak MiB fwd/grad",
    "note",
]


def _ms(part):
    s = part.get("median_s")
    if s is None:
        return "-"
    return f"{1e3 * s:.1f}" + (" (1 call)" if part.get("timed_by_check") else "")


def _pair(fwd, grad, fmt):
    return f"{fmt(fwd)}/{fmt(grad)}"


def _mib(part: dict[str, Any]) -> str:
    if part.get("memory_bytes") is None:
        return "-" if "compile_s" not in part else "n/a"
    return f"{part['memory_bytes'] / 2**20:.0f}"


def _peak_mib(part: dict[str, Any]) -> str:
    if "first_s" not in part:
        return "-"
    if part.get("device_peak_bytes") is None:
        return "n/a"
    bound = "≤" if part["device_peak_is_bound"] else ""
    return f"{bound}{part['device_peak_bytes'] / 2**20:.0f}"


KINDS = ("forward", "gradient")


def sorted_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """By problem (as run), `d`, `T`; the reference first within each."""
    problems = list(dict.fromkeys(row["problem"] for row in rows))
    return sorted(
        rows,
        key=lambda r: (
            problems.index(r["problem"]),
            r["d"],
            r["T"],
            not r["reference"],
        ),
    )


def table_row(row: dict[str, Any]) -> list[str]:
    fwd, grad = row["forward"], row["gradient"]
    notes = []
    for kind, part in (("values", fwd), ("gradient", grad)):
        if "failed" in part:
            notes.append(f"FAILED {kind}: {part['failed']}")
        if part.get("wrong"):
            notes.append(f"WRONG {kind}")
            if "norm_ratio" in part:
                notes.append(f"gradient norm ratio {part['norm_ratio']:.3g}")
    if "skip" in fwd:
        notes.append("skipped: " + fwd["skip"])
    if "skip" in grad and grad["skip"] != fwd.get("skip"):
        notes.append("gradient skipped: " + grad["skip"])
    if row["window"] is not None and not row["reference"]:
        notes.append(f"window {row['window']}")
    iters = "-"
    if "iterations" in fwd:
        lo, hi = fwd["iterations_min"], fwd["iterations"]
        iters = str(hi) if lo == hi else f"{lo}-{hi}"
    err = lambda part: "-" if part.get("error") is None else f"{part['error']:.1e}"
    speedup = lambda part: "-" if "speedup" not in part else f"{part['speedup']:.3g}"
    if row["reference"]:
        speedup = lambda part: "1" if "median_s" in part else "-"
    compile_s = lambda part: (
        "-" if "compile_s" not in part else f"{part['compile_s']:.1f}"
    )
    return [
        row["problem"],
        str(row["d"]),
        f"{row['T']:.0e}".replace("e+0", "e"),
        row["solver"],
        iters,
        str(fwd.get("fallbacks", "-")),
        err(fwd),
        err(grad),
        _ms(fwd),
        _ms(grad),
        speedup(fwd),
        speedup(grad),
        _pair(fwd, grad, compile_s),
        _pair(fwd, grad, _mib),
        _pair(fwd, grad, _peak_mib),
        "; ".join(notes),
    ]


def _load(env: dict[str, Any], when: str) -> str:
    load = env.get(f"load_average_at_{when}")
    return "n/a" if not load else f"{load[0]:.1f}"


def markdown_report(payload: dict[str, Any]) -> str:
    env, s = payload["environment"], payload["settings"]
    about = (
        f"{env['device_kind']} ({env['platform']}), jax {env['jax']} (jaxlib "
        f"{env['jaxlib']}), commit {env['git_commit']}, {env['date']}; float32, "
        f"matrix products at `{env['default_matmul_precision']}` precision; "
        f"XLA_FLAGS={env['xla_flags'] or '(none)'}; GRU batch {s['batch']}; "
        f"budget {s['budget']:g} s, {payload['wall_s']:.0f} s in all; up to "
        f"{s['compile_threads']} functions compiled at once; {env['cpu_count']} CPUs, "
        f"load average at start / end {_load(env, 'start')} / {_load(env, 'end')}"
        + ("" if payload.get("finished") else " (unfinished: stopped from outside)")
        + ". Times in ms: median of up to "
        f"{s['repeats']} calls after a checking call (`1 call`: timed by the checking "
        f"call, which took over {s['single_call']:g} s). Speed-up = reference time / "
        "partime time (above 1: partime is faster). Errors: max |partime - reference| "
        f"/ max |reference| per array (WRONG above {VALUE_TOL:g} for values, "
        f"{GRAD_TOL:g} for gradients, or a gradient norm off by more than "
        f"{GRAD_TOL:g}). iters: parallel iterations (min-max over the batch; summed "
        "over windows); fallbacks: sequences (solves) that the exact sequential "
        "fallback finished. MiB: the compiled function's argument + output + "
        "temporary memory; peak MiB: device memory in use during the checking call "
        "beyond what was in use before it (`memory_stats()`; n/a where the backend "
        "does not report it, ≤ where an earlier peak of the process hides it)."
    )
    table = [table_row(row) for row in sorted_rows(payload["rows"])]
    return f"# {payload['benchmark']}\n\n{about}\n\n" + markdown_table(HEADER, table)


# Main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    count = lambda s: int(float(s))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--problems", nargs="+", choices=["gru", "ode"])
    parser.add_argument("--gru-d", type=count, nargs="+", help="default: 1 8 64")
    parser.add_argument("--gru-T", type=count, nargs="+", help="default: 1e3 1e4 1e5")
    parser.add_argument(
        "--windowed-T", type=count, nargs="*", help="GRU in windows; default: 1e6"
    )
    parser.add_argument(
        "--window",
        type=count,
        help="default: the largest of 1e3, 1e4, 1e5 whose Jacobians take at most 4 GiB",
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS))
    parser.add_argument("--ode-d", type=count, nargs="+", help="default: 4 16 64")
    parser.add_argument("--ode-T", type=count, nargs="+", help="default: 1e3 1e4 1e5")
    parser.add_argument("--batch", type=int, default=16, help="GRU; default: 16")
    parser.add_argument("--repeats", type=int, default=5, help="default: 5")
    parser.add_argument(
        "--time-per-function",
        type=float,
        default=2.0,
        help="seconds of timed calls per function (fewer repeats for slow calls, at "
        "least one); default: 2",
    )
    parser.add_argument(
        "--single-call",
        type=float,
        default=3.0,
        help="a function whose checking call took longer is timed by that call; "
        "default: 3",
    )
    parser.add_argument(
        "--max-call",
        type=float,
        default=30.0,
        help="skip functions predicted to take longer per call; default: 30",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=400.0,
        help="seconds from the start after which nothing new starts, and within "
        "which every started function is predicted to finish; default: 400",
    )
    parser.add_argument(
        "--compile-threads",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="functions of a row compiled at once; default: the CPUs, at most 8",
    )
    parser.add_argument(
        "--max-memory-gb",
        type=float,
        default=None,
        help="compiled memory above which a function is not run; default: half the "
        "device's memory",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON path (a .md beside it); default "
        "benchmarks/results/gpu-<device>.json, none with --quick",
    )
    args = parser.parse_args(argv)
    defaults = {
        "problems": ["gru", "ode"],
        "gru_d": [1, 8, 64],
        "gru_T": [10**3, 10**4, 10**5],
        "windowed_T": [10**6],
        "methods": list(METHODS),
        "ode_d": [4, 16, 64],
        "ode_T": [10**3, 10**4, 10**5],
    }
    if args.quick:
        # One method: QuasiNewton's rows run the same code, and each compile counts.
        defaults.update(
            gru_d=[2],
            gru_T=[300],
            windowed_T=[3000],
            methods=["Newton"],
            ode_d=[2],
            ode_T=[100],
        )
        args.window = args.window or 300
        args.repeats = min(args.repeats, 3)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def device_slug(kind: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "device"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # float32 throughout (x64 stays off), and no TF32 in either implementation: the
    # MLP's matrix products use the default precision, which this makes the highest.
    jax.config.update("jax_default_matmul_precision", "highest")
    env = environment()
    # A copy of the tree without its .git (a lent GPU machine) is told its commit.
    env["git_commit"] = env["git_commit"] or os.environ.get("PARTIME_GIT_COMMIT")
    env["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    env["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    print(
        f"partime on {env['device_kind']} ({env['platform']}), jax {env['jax']}, "
        f"commit {env['git_commit']}, budget {args.budget:g} s",
        flush=True,
    )
    out = args.out
    if out is None and not args.quick:
        name = f"gpu-{device_slug(env['device_kind'])}.json"
        out = Path(__file__).parent / "results" / name
    payload = {
        "benchmark": "partime against the sequential computation, float32",
        "environment": env,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": [],
    }

    def save(finished: bool) -> None:
        payload["wall_s"] = time.perf_counter() - runner.start
        payload["finished"] = finished
        if out is not None:
            env["load_average_at_end"] = list(os.getloadavg())
            write_json(out, payload)
            Path(out).with_suffix(".md").write_text(markdown_report(payload))

    runner = Runner(args)
    payload["settings"]["memory_limit_bytes"] = runner.memory_limit
    for problem, d, T, window in cases(args):
        payload["rows"] += runner.run_case(problem, d, T, window)
        save(finished=False)
    save(finished=True)
    rows = payload["rows"]
    print("\n" + text_table(HEADER, [table_row(row) for row in sorted_rows(rows)]))
    print(f"{payload['wall_s']:.0f} s in all (budget {args.budget:g} s)")
    if out is not None:
        print(f"wrote {out} and {Path(out).with_suffix('.md')}")
    wrong = [r for r in rows if any(r[k].get("wrong") for k in KINDS)]
    failed = [r for r in rows if any("failed" in r[k] for k in KINDS)]
    if wrong or failed:
        print(f"{len(wrong)} row(s) WRONG, {len(failed)} FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
