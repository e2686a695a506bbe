"""Robertson's stiff chemical kinetics, in parallel in time with an implicit solver.

Robertson's problem is the classic stiff test: three species react as

    y1' = -k1 y1 + k3 y2 y3
    y2' =  k1 y1 - k3 y2 y3 - k2 y2²
    y3' =  k2 y2²

with `k1 = 0.04`, `k2 = 3e7`, `k3 = 1e4` and `y(0) = (1, 0, 0)`. The intermediate `y2`
rises to about 4e-5 within a millisecond and then decays over decades, while the
fastest time scale stays near 1e-4: explicit solvers would need millions of steps.

The inner solver is `diffrax.Kvaerno5()` (an L-stable implicit Runge--Kutta method)
with a tight `optimistix.Newton` root finder in every step. A fixed-step solve over a
horizon that spans decades needs its steps to grow with `t`, so the windows are
log-spaced: `partime.ParallelSolver(Kvaerno5, num_steps=200)` steps to the window ends
`0, 1e-4, 1e-3, ..., 1e2` (a `diffrax.StepTo` controller), one decade per window, each
window holding 200 equal Kvaerno5 steps solved together by Newton iterations; the
seven windows are taken one after another, as diffrax steps are. The horizon stops at
`t = 1e2`; longer ones work the same way, one window per decade more.

With fewer steps per window (50 or 100) the Newton iteration in one window makes no
progress from its first iterate (the implicit steps from states far off the slow
manifold are poor) and that window is finished by the exact sequential fallback:
the answer is the same, only not parallel. 200 steps per window avoid that, and the
`--quick` mode fails if any window falls back.

The script compares the result with sequential diffrax (the same Kvaerno5 and root
finder, stepping to the same inner grid one step at a time) and with an adaptive
reference solve, checks that `y1 + y2 + y3 = 1` is conserved, prints the parallel
solver's statistics, times both solves and saves a figure (log-time axis, `y2` scaled
by 1e4 as usual). Everything is in float64.

    python examples/stiff.py                  # half a minute, mostly compilation
    python examples/stiff.py --quick          # CI: fewer timing runs; checks itself
    python examples/stiff.py --num-steps 400 --out robertson.png
"""

import argparse
import pathlib
import statistics
import sys
import time

import jax


jax.config.update("jax_enable_x64", True)

import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optimistix as optx  # noqa: E402


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

import partime  # noqa: E402


K1, K2, K3 = 0.04, 3e7, 1e4
Y0 = np.array([1.0, 0.0, 0.0])
# The window ends: one decade per window past the first.
WINDOW_ENDS = np.array([0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2])
T0, T1 = WINDOW_ENDS[0], WINDOW_ENDS[-1]
# The same tight root finder on both sides, so that they agree to its tolerance.
ROOT_FINDER = optx.Newton(rtol=1e-10, atol=1e-12)


def robertson(t, y, args):
    y1, y2, y3 = y
    return jnp.stack(
        [
            -K1 * y1 + K3 * y2 * y3,
            K1 * y1 - K3 * y2 * y3 - K2 * y2**2,
            K2 * y2**2,
        ]
    )


def inner_grid(num_steps):
    """Every inner step time, bit for bit those that `partime.ParallelSolver` steps to:
    `t0 + (t1 - t0) * (k / num_steps)` in each window `[t0, t1]`, its last one exactly
    `t1`."""
    grids = []
    for t0, t1 in zip(WINDOW_ENDS[:-1], WINDOW_ENDS[1:]):
        t0, t1 = jnp.asarray(t0), jnp.asarray(t1)
        ts = t0 + (t1 - t0) * (jnp.arange(num_steps + 1) / num_steps).astype(t0.dtype)
        grids.append(ts.at[-1].set(t1))
    return jnp.concatenate([g[:-1] for g in grids] + [grids[-1][-1:]])


def make_solve(solver, ts, save_ts, *, max_steps):
    """The solve, jitted: `solve(y0) -> diffrax.Solution` on the step times `ts`,
    saved at `save_ts`."""
    parallel = isinstance(solver, partime.ParallelSolver)

    @jax.jit
    def solve(y0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(robertson),
            solver,
            T0,
            T1,
            None,
            y0,
            saveat=diffrax.SaveAt(ts=save_ts, solver_state=parallel),
            stepsize_controller=diffrax.StepTo(ts=ts),
            max_steps=max_steps,
        )

    return solve


@jax.jit
def reference_solve(y0, save_ts):
    """An adaptive Kvaerno5 solve at tight tolerances: the exact solution, for the
    accuracy of the fixed grid."""
    return diffrax.diffeqsolve(
        diffrax.ODETerm(robertson),
        diffrax.Kvaerno5(root_finder=ROOT_FINDER),
        T0,
        T1,
        1e-6,
        y0,
        saveat=diffrax.SaveAt(ts=save_ts),
        stepsize_controller=diffrax.PIDController(rtol=1e-10, atol=1e-14),
        max_steps=100_000,
    ).ys


def scaled_error(ys, ref):
    """Largest error of each species, relative to that species' largest value."""
    return jnp.max(jnp.abs(ys - ref), axis=0) / jnp.max(jnp.abs(ref), axis=0)


def time_solves(solves, y0, repeats):
    """Each solve's median time over `repeats` calls, compiled beforehand. The calls
    alternate, so that a machine busy with other work slows them alike."""
    times = {name: [] for name in solves}
    for _ in tqdm(range(repeats), desc="timing"):
        for name, solve in solves.items():
            start = time.perf_counter()
            jax.block_until_ready(solve(y0))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def plot(path, save_ts, ys, ref, grid):
    fig, (ax_y, ax_err) = plt.subplots(1, 2, figsize=(10, 4.2))
    scales = [1.0, 1e4, 1.0]
    labels = ["$y_1$", "$10^4\\,y_2$", "$y_3$"]
    colours = ["tab:blue", "tab:orange", "tab:green"]
    for i, (scale, label, colour) in enumerate(zip(scales, labels, colours)):
        ax_y.semilogx(save_ts, scale * ref[:, i], "-", color=colour, label=label)
        ax_y.semilogx(save_ts[::8], scale * ys[::8, i], "o", color=colour, ms=3)
    ax_y.plot([], [], "k-", label="adaptive reference")
    ax_y.plot([], [], "ko", ms=3, label="partime.ParallelSolver")
    for t in WINDOW_ENDS[1:-1]:
        ax_y.axvline(t, color="gray", linewidth=0.6, linestyle=":")
    ax_y.set(xlabel="time t", ylabel="concentration", title="Robertson's problem")
    ax_y.legend(loc="center left", fontsize=8)
    deviation = np.maximum(np.abs(np.sum(ys, axis=-1) - 1), 1e-17)
    ax_err.loglog(save_ts, deviation, "k-", label="$|y_1 + y_2 + y_3 - 1|$")
    relative = np.abs(ys - ref) / np.max(np.abs(ref), axis=0)
    for i, (label, colour) in enumerate(zip(["$y_1$", "$y_2$", "$y_3$"], colours)):
        ax_err.loglog(
            save_ts,
            np.maximum(relative[:, i], 1e-17),
            color=colour,
            linewidth=0.8,
            label=f"{label}: error vs reference",
        )
    for t in WINDOW_ENDS[1:-1]:
        ax_err.axvline(t, color="gray", linewidth=0.6, linestyle=":")
    ax_err.set(
        xlabel="time t",
        ylabel="error (relative to each species' maximum)",
        title=f"Errors on the fixed grid ({len(grid) - 1} Kvaerno5 steps)",
    )
    ax_err.legend(loc="upper left", fontsize=8)
    ax_err.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short CI run")
    parser.add_argument("--num-steps", type=int, help="Kvaerno5 steps per window")
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).with_suffix(".png"),
        help="where to save the figure",
    )
    args = parser.parse_args(argv)
    num_steps = args.num_steps or 200
    num_windows = len(WINDOW_ENDS) - 1
    grid = inner_grid(num_steps)
    save_ts = jnp.concatenate([jnp.zeros(1), jnp.logspace(-6, 2, 161)])

    inner = diffrax.Kvaerno5(root_finder=ROOT_FINDER)
    parallel = partime.ParallelSolver(inner, num_steps=num_steps)
    solves = {
        "parallel": make_solve(parallel, WINDOW_ENDS, save_ts, max_steps=num_windows),
        "sequential": make_solve(inner, grid, save_ts, max_steps=len(grid) - 1),
    }
    print(
        f"Robertson's problem on [0, {T1:g}] with partime.ParallelSolver(Kvaerno5, "
        f"num_steps={num_steps}): {num_windows} log-spaced windows, "
        f"{len(grid) - 1} steps in all, on {jax.devices()[0].device_kind} (float64)."
    )

    first = {}
    for name, solve in solves.items():
        start = time.perf_counter()
        jax.block_until_ready(solve(Y0))
        first[name] = time.perf_counter() - start
    sol = solves["parallel"](Y0)
    ys = sol.ys
    sequential_ys = solves["sequential"](Y0).ys
    ref = reference_solve(Y0, save_ts)
    median = time_solves(solves, Y0, 5 if args.quick else 20)

    versus_sequential = scaled_error(ys, sequential_ys)
    versus_reference = scaled_error(ys, ref)
    conservation = float(jnp.max(jnp.abs(jnp.sum(ys, axis=-1) - 1)))
    iterations = int(sol.solver_state.num_iterations)
    fallbacks = int(sol.solver_state.num_fallbacks)
    fmt = lambda errors: ", ".join(f"y{i + 1} {e:.1e}" for i, e in enumerate(errors))

    print("\nError, relative to each species' maximum, at the save times:")
    print(f"  parallel vs sequential diffrax (same grid) : {fmt(versus_sequential)}")
    print(f"  parallel vs adaptive reference            : {fmt(versus_reference)}")
    print(f"  conservation, max |y1 + y2 + y3 - 1|      : {conservation:.1e}")
    print("\nParallel solver statistics (sol.solver_state, sol.stats):")
    print(
        f"  Newton iterations: {iterations} over {int(sol.stats['num_steps'])} "
        f"windows ({iterations / num_windows:.1f} per window of {num_steps} steps); "
        f"sequential fallbacks: {fallbacks}"
    )
    print(f"\nTime per solve ({len(grid) - 1} Kvaerno5 steps):")
    print(f"  partime.ParallelSolver : {1e3 * median['parallel']:8.1f} ms")
    print(f"  sequential diffrax     : {1e3 * median['sequential']:8.1f} ms")
    ratio = median["sequential"] / median["parallel"]
    verdict = "faster" if ratio >= 1 else "slower"
    print(
        f"  parallel is {max(ratio, 1 / ratio):.2f}x {verdict} on this device "
        f"(first call, with compilation: parallel {first['parallel']:.1f} s, "
        f"sequential {first['sequential']:.1f} s)."
    )

    plot(args.out, np.asarray(save_ts), np.asarray(ys), np.asarray(ref), grid)
    print(f"Figure saved to {args.out}")

    failures = []
    if not np.all(np.isfinite(np.asarray(ys))):
        failures.append("the solution is not finite")
    if not np.max(versus_sequential) < 1e-8:
        failures.append(
            f"parallel and sequential differ: {fmt(versus_sequential)} (relative)"
        )
    if not conservation < 1e-10:
        failures.append(f"y1 + y2 + y3 drifts from 1 by {conservation:.1e}")
    if not np.max(versus_reference) < 1e-2:
        failures.append(f"far from the reference: {fmt(versus_reference)} (relative)")
    if fallbacks:
        failures.append(f"{fallbacks} windows fell back to sequential stepping")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
