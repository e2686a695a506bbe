"""MkDocs hooks: the benchmark results, read from `benchmarks/results/` at build time.

The page `benchmarks.md` holds the marker `<!-- benchmark-results -->`; this hook
replaces it with one section per results file (`<name>-<platform>.json` and the `.md`
table the benchmark script wrote beside it): the set-up it was measured on, a plot
where the format is known, and the table. So new results appear on the site without
editing the page, and a missing or unfamiliar file never breaks the build.
"""

import io
import json
import logging
import pathlib
import re
from typing import Any

from mkdocs.structure.files import File


log = logging.getLogger("mkdocs.hooks.partime")
MARKER = "<!-- benchmark-results -->"
PAGE = "benchmarks.md"
FIGURE_DIR = "benchmarks/figures"
TITLES = {
    "scan": "`partime.scan` against `jax.lax.scan` (GRU)",
    "ode": "`partime.ParallelSolver` against sequential diffrax (neural ODE)",
    "windows": "Windowed solves (bounded memory)",
    "sharding": "The time axis sharded over devices",
    "gpu": "The GPU benchmark (neural ODE and GRU, float32)",
}

_sections: list[str] = []


def _results_dir(config) -> pathlib.Path:
    # The repository root is the parent of `docs/`.
    return pathlib.Path(config.docs_dir).parent / "benchmarks" / "results"


def _environment_line(env: dict[str, Any]) -> str:
    if not env:
        return ""
    device = env.get("device_kind", "?")
    platform = env.get("platform", "?")
    parts = [f"**{platform}** ({device}, {env.get('cpu_count', '?')} CPU cores)"]
    parts.append(f"jax {env.get('jax', '?')}")
    parts.append("float64" if env.get("x64") else "float32")
    if env.get("git_commit"):
        parts.append(f"commit `{env['git_commit']}`")
    if env.get("date"):
        parts.append(f"measured {env['date'][:10]}")
    load = env.get("load_average_at_start")
    if load:
        parts.append(f"load average at start {load[0]:.1f}")
    return "Measured on " + ", ".join(parts) + "."


def _median(entry: Any) -> float | None:
    if isinstance(entry, dict):
        value = entry.get("median_s")
        return value if isinstance(value, (int, float)) else None
    return None


def _plot_scan(rows: list[dict[str, Any]]):
    """Forward + gradient time against `T`, one panel per hidden size `d`."""
    import matplotlib.pyplot as plt

    sizes = sorted({row["d"] for row in rows})
    methods = list(dict.fromkeys(row["method"] for row in rows))
    # One colour per method in every panel.
    colours = {m: f"C{k}" for k, m in enumerate(methods)}
    columns = min(2, len(sizes))
    num_rows = -(-len(sizes) // columns)
    fig, axes = plt.subplots(
        num_rows, columns, figsize=(4.6 * columns, 3.4 * num_rows), squeeze=False
    )
    for ax in axes.flat[len(sizes) :]:
        ax.set_visible(False)
    for ax, d in zip(axes.flat, sizes):
        these = [row for row in rows if row["d"] == d]
        lax = {row["T"]: _median(row.get("lax_gradient")) for row in these}
        lax = sorted((T, s) for T, s in lax.items() if s is not None)
        if lax:
            ax.loglog(*zip(*lax), "k--")
        for method in methods:
            points = sorted(
                (row["T"], _median(row.get("gradient")))
                for row in these
                if row["method"] == method and _median(row.get("gradient"))
            )
            if points:
                ax.loglog(*zip(*points), "o-", color=colours[method], label=method)
        ax.set(
            xlabel="sequence length T",
            ylabel="forward + gradient (s)",
            title=f"GRU, hidden size d = {d}",
        )
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color="k", linestyle="--")] + [
        plt.Line2D([], [], color=colours[m], marker="o") for m in methods
    ]
    names = ["jax.lax.scan"] + [f"partime.scan, {m}" for m in methods]
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize="small")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def _plot_ode(rows: list[dict[str, Any]]):
    """Forward and forward + gradient times, sequential diffrax against partime, one
    group of bars per row (inner solver, `d`, `T`)."""
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [row for row in rows if "par_gradient_s" in row]
    labels = [
        f"{row['solver']}, {row.get('method', 'Newton')}\nd={row['d']}, T={row['T']:g}"
        for row in rows
    ]
    bars = [
        ("diffrax, forward", "seq_forward_s", "#9e9e9e"),
        ("partime, forward", "par_forward_s", "#7986cb"),
        ("diffrax, forward + gradient", "seq_gradient_s", "#424242"),
        ("partime, forward + gradient", "par_gradient_s", "#303f9f"),
    ]
    x = np.arange(len(rows))
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(rows) + 2), 3.8))
    for k, (label, key, colour) in enumerate(bars):
        ax.bar(
            x + (k - 1.5) * width,
            [row[key] for row in rows],
            width,
            label=label,
            color=colour,
        )
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("time per call (s)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


PLOTTERS = {"scan": _plot_scan, "ode": _plot_ode}


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _demote_headings(markdown: str, levels: int) -> str:
    return re.sub(
        r"^(#{1,6}) ",
        lambda m: "#" * min(6, len(m[1]) + levels) + " ",
        markdown,
        flags=re.MULTILINE,
    )


def on_files(files, config):
    import matplotlib

    matplotlib.use("Agg")
    _sections.clear()
    results = _results_dir(config)
    order = list(TITLES)
    paths = sorted(
        results.glob("*.json"),
        key=lambda p: (
            order.index(p.stem.split("-", 1)[0])
            if p.stem.split("-", 1)[0] in order
            else len(order),
            p.stem,
        ),
    )
    for path in paths:
        name = path.stem.split("-", 1)[0]
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            log.info("skipping %s: %s", path, error)
            continue
        if not isinstance(payload, dict):
            continue
        lines = [f"## {TITLES.get(name, name)}: `{path.stem}`", ""]
        env = _environment_line(payload.get("environment", {}))
        if env:
            lines += [env, ""]
        plotter = PLOTTERS.get(name)
        rows = payload.get("rows")
        if plotter is not None and isinstance(rows, list) and rows:
            try:
                png = _figure_bytes(plotter(rows))
            except (KeyError, TypeError, ValueError) as error:
                log.info("no figure for %s: %s", path, error)
            else:
                uri = f"{FIGURE_DIR}/{path.stem}.png"
                files.append(File.generated(config, uri, content=png))
                lines += [f"![{path.stem}]({uri})", ""]
        table = path.with_suffix(".md")
        if table.exists():
            lines += [_demote_headings(table.read_text(), 2), ""]
        lines += [
            f"Raw data: `benchmarks/results/{path.name}` in the repository.",
            "",
        ]
        # Wide tables in a smaller font (see docs/_static/custom.css).
        body = "\n".join(lines[1:])
        _sections.append(
            f'{lines[0]}\n\n<div class="benchmark" markdown>\n\n{body}\n</div>\n'
        )
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != PAGE:
        return markdown
    if _sections:
        body = "\n".join(_sections)
    else:
        body = (
            '!!! note "No results yet"\n\n'
            "    `benchmarks/results/` holds no results in this build. Run the "
            "scripts above and rebuild the site."
        )
    return markdown.replace(MARKER, body)
