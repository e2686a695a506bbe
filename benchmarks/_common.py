"""Helpers shared by the benchmark scripts: compiling, timing, memory, environment."""

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu


def compile_fn(fn: Callable, *args: Any) -> tuple[Any, float]:
    """Ahead-of-time compiles `jax.jit(fn)` for `args`: `(compiled, seconds)`."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def memory_bytes(compiled: Any) -> int | None:
    """Argument + output + temporary bytes of a compiled function, `None` if the
    backend does not report them."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not implemented on every backend
        return None
    if stats is None:
        return None
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
    )


def device_memory_bytes() -> int | None:
    """Memory of the default device: the accelerator's allocator limit, or the host's
    physical memory for a CPU device."""
    stats = jax.devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def run_once(compiled: Any, *args: Any) -> tuple[Any, float]:
    """One blocking call: `(output, seconds)`."""
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, time.perf_counter() - start


def time_calls(
    compiled: Any, args: tuple, repeats: int, budget_s: float, first_s: float
) -> dict[str, Any]:
    """Median wall time of `repeats` blocking calls, made after a warm-up call that
    took `first_s`. Fewer calls (at least one) when `repeats` of them would take longer
    than `budget_s`; the calls made are returned, so the reader can see it."""
    if first_s * repeats > budget_s:
        repeats = max(1, int(budget_s // max(first_s, 1e-9)))
    times = [run_once(compiled, *args)[1] for _ in range(repeats)]
    return {"median_s": statistics.median(times), "times_s": times}


def rel_errors(x: Any, y: Any) -> list[jax.Array]:
    """Per leaf, the largest error of `x` against the reference `y` relative to that
    leaf's largest magnitude in `y` (so that entries near zero do not dominate).
    Traceable: `jax.jit` it to compare large arrays in one compiled program."""
    return [
        jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y), strict=True)
    ]


def max_rel_error(x: Any, y: Any) -> float:
    """The largest of `rel_errors(x, y)`."""
    return max(float(error) for error in rel_errors(x, y))


def git_commit(where: str | Path | None = None, form: str = "%h") -> str | None:
    """The git commit of the tree holding `where` (default: these benchmarks), in
    `git log`'s `--format`; `None` outside git."""
    try:
        out = subprocess.run(
            ["git", "log", "-1", f"--format={form}"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent if where is None else where,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    try:
        load = os.getloadavg()
    except (OSError, AttributeError):
        load = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "device_memory_bytes": device_memory_bytes(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "x64": bool(jax.config.read("jax_enable_x64")),
        "load_average_at_start": load,
    }


def fmt(value: Any, spec: str, missing: str = "-") -> str:
    """`format(value, spec)`, or `missing` for `None`."""
    return missing if value is None else format(value, spec)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    fmt = lambda row: "  ".join(str(c).rjust(w) for c, w in zip(row, widths))
    return "\n".join(
        [fmt(header), fmt(["-" * w for w in widths])] + list(map(fmt, rows))
    )


def write_json(path: str | Path, payload: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
