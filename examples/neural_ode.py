"""Fit a neural ODE to a damped pendulum's trajectories, training in parallel in time.

The data are trajectories of a damped pendulum, `θ'' = -sin θ - 0.2 θ'`, from random
starts, generated here with diffrax. The model is `dy/dt = MLP(y)`. Each training
step solves the model over the whole horizon with `partime.ParallelSolver`: one diffrax
step (`dt0 = t1 - t0`) is one window of `num_steps` Tsit5 steps, all solved together by
Newton iterations whose linear part is a parallel scan; the gradient is taken by
implicit differentiation, one more parallel scan.

At the end the script times one training step against sequential diffrax (the same
Tsit5 steps, one after another), on the same grid, in the same run, after compiling
both, and saves a figure: data against fit, and the loss curve.

    python examples/neural_ode.py                # about a minute on a laptop CPU
    python examples/neural_ode.py --quick        # CI: a short run that checks itself
    python examples/neural_ode.py --out fit.png --num-steps 1000 --train-steps 500
"""

import argparse
import math
import pathlib
import statistics
import sys
import time

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import partime  # noqa: E402


T0, T1 = 0.0, 10.0
DAMPING = 0.2


def pendulum(t, y, args):
    angle, velocity = y
    return jnp.stack([velocity, -jnp.sin(angle) - DAMPING * velocity])


def make_data(num_trajectories, num_saves, *, key):
    """Pendulum trajectories `(θ, θ')` from random starts, at `num_saves` times."""
    angle_key, velocity_key = jr.split(key)
    angle = jr.uniform(angle_key, (num_trajectories,), minval=1.0, maxval=2.5)
    velocity = jr.uniform(velocity_key, (num_trajectories,), minval=-0.5, maxval=0.5)
    y0 = jnp.stack([angle, velocity], axis=-1)
    ts = jnp.linspace(T0, T1, num_saves)

    def solve(y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(pendulum),
            diffrax.Tsit5(),
            T0,
            T1,
            0.01,
            y0,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-6),
            max_steps=10_000,
        )
        return sol.ys

    return ts, jax.vmap(solve)(y0)


class VectorField(eqx.Module):
    """`dy/dt = MLP(y)`."""

    mlp: eqx.nn.MLP

    def __init__(self, *, key):
        mlp = eqx.nn.MLP(2, 2, width_size=64, depth=2, activation=jnp.tanh, key=key)
        # Start from slow dynamics: a random MLP's trajectories fly off, and the first
        # steps of training would only undo that.
        last = mlp.layers[-1]
        self.mlp = eqx.tree_at(
            lambda m: (m.layers[-1].weight, m.layers[-1].bias),
            mlp,
            (0.1 * last.weight, 0.1 * last.bias),
        )

    def __call__(self, t, y, args):
        return self.mlp(y)


def make_solve(solver, num_steps):
    """`solve(model, y0, ts) -> (ys, iterations)`: the model's trajectory at the save
    times `ts`, and the parallel solver's Newton iterations (0 for a sequential one).

    The parallel solver takes one diffrax step over the whole horizon (one window of
    `num_steps` inner steps); the sequential solver takes the same `num_steps` inner
    steps one by one. `max_steps` is as tight as it goes: diffrax sizes its
    checkpointing for the backward pass by it, and with `max_steps=1` the parallel
    solver solves its one window once, whatever the adjoint. The parallel solve's
    gradient uses `diffrax.DirectAdjoint()`: the loss reads the trajectory at save
    times inside the window, whose interpolation diffrax's default adjoint would
    differentiate save time by save time in a checkpointed loop (a first training
    step of 2.0x sequential diffrax's time instead of 1.4x, mostly compilation).
    """
    parallel = isinstance(solver, partime.ParallelSolver)
    if parallel:
        dt0, max_steps = T1 - T0, 1
        adjoint = diffrax.DirectAdjoint()
    else:
        dt0, max_steps = (T1 - T0) / num_steps, num_steps
        adjoint = diffrax.RecursiveCheckpointAdjoint()

    def solve(model, y0, ts):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(model),
            solver,
            T0,
            T1,
            dt0,
            y0,
            saveat=diffrax.SaveAt(ts=ts, solver_state=parallel),
            max_steps=max_steps,
            adjoint=adjoint,
        )
        # `sol.solver_state` is a `partime.ParallelSolverState`: its statistics.
        iterations = sol.solver_state.num_iterations if parallel else jnp.array(0)
        return sol.ys, iterations

    return solve


def make_train_step(solve, optimiser):
    def loss_fn(model, ts, ys):
        pred, iterations = jax.vmap(solve, in_axes=(None, 0, None))(model, ys[:, 0], ts)
        return jnp.mean((pred - ys) ** 2), (pred, jnp.max(iterations))

    @eqx.filter_jit
    def train_step(model, opt_state, ts, ys):
        (loss, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, ts, ys
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss, aux

    return train_step


def time_steps(steps, args, repeats):
    """Per training step function: its first call's time (compilation included, from
    cold caches, as in a fresh process: JAX caches the traces of helpers that the
    functions share) and the median time of `repeats` calls after it. The calls
    alternate between the functions, so that a machine busy with other work slows
    them alike."""
    first, times = {}, {name: [] for name in steps}
    for name, step in steps.items():
        jax.clear_caches()
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            times[name].append(time.perf_counter() - start)
    return first, {name: statistics.median(t) for name, t in times.items()}


def plot(path, ts, ys, fit, losses):
    fig, (ax_fit, ax_loss) = plt.subplots(1, 2, figsize=(10, 4.2))
    shown = min(len(ys), 4)  # a few trajectories keep the phase plane legible
    colours = plt.cm.viridis(jnp.linspace(0.0, 0.85, shown))
    for y, f, colour in zip(ys[:shown], fit[:shown], colours):
        ax_fit.plot(y[:, 0], y[:, 1], ".", color=colour, markersize=3)
        ax_fit.plot(f[:, 0], f[:, 1], "-", color=colour, linewidth=1.2)
    ax_fit.plot([], [], "k.", label="data")
    ax_fit.plot([], [], "k-", label="neural ODE")
    ax_fit.set(
        xlabel="angle θ",
        ylabel="angular velocity θ'",
        title="Phase plane: data and fit",
    )
    ax_fit.set_aspect("equal", adjustable="datalim")
    ax_fit.legend(loc="lower left")
    ax_loss.semilogy(range(1, len(losses) + 1), losses)
    ax_loss.set(
        xlabel="training step",
        ylabel="mean squared error",
        title="Training loss (partime.ParallelSolver)",
    )
    ax_loss.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short CI run")
    parser.add_argument("--train-steps", type=int, help="optimiser steps")
    parser.add_argument("--num-steps", type=int, help="Tsit5 steps over the horizon")
    parser.add_argument("--trajectories", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-2, help="initial learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).with_suffix(".png"),
        help="where to save the figure",
    )
    args = parser.parse_args(argv)
    train_steps = args.train_steps or (60 if args.quick else 200)
    num_steps = args.num_steps or (100 if args.quick else 200)

    data_key, model_key = jr.split(jr.key(args.seed))
    ts, ys = make_data(args.trajectories, num_saves=51, key=data_key)
    model = VectorField(key=model_key)
    optimiser = optax.adam(optax.exponential_decay(args.lr, train_steps, 0.1))
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))

    parallel = partime.ParallelSolver(diffrax.Tsit5(), num_steps=num_steps)
    parallel_solve = make_solve(parallel, num_steps)
    train_step = make_train_step(parallel_solve, optimiser)

    print(
        f"Fitting a neural ODE to {args.trajectories} pendulum trajectories with "
        f"partime.ParallelSolver(Tsit5, num_steps={num_steps}) on "
        f"{jax.devices()[0].device_kind}."
    )
    losses, step_times = [], []
    bar = tqdm(range(train_steps), desc="training (1st step compiles)")
    for step in bar:
        start = time.perf_counter()
        model, opt_state, loss, (_, iterations) = train_step(model, opt_state, ts, ys)
        loss = float(loss)
        step_times.append(time.perf_counter() - start)
        losses.append(loss)
        if step == 0:
            bar.set_description("training")
        bar.set_postfix(loss=f"{loss:.4f}", newton_iters=int(iterations))
    bar.close()

    # Time one training step both ways, from the same model, after compiling each.
    sequential_solve = make_solve(diffrax.Tsit5(), num_steps)
    sequential_step = make_train_step(sequential_solve, optimiser)
    repeats = 5 if args.quick else 10
    first, median = time_steps(
        {"parallel": train_step, "sequential": sequential_step},
        (model, opt_state, ts, ys),
        repeats,
    )
    parallel_s, sequential_s = median["parallel"], median["sequential"]
    *_, parallel_loss, (fit, iterations) = train_step(model, opt_state, ts, ys)
    *_, sequential_loss, _ = sequential_step(model, opt_state, ts, ys)
    parallel_loss, sequential_loss = float(parallel_loss), float(sequential_loss)

    print(f"\nTime per training step ({num_steps} Tsit5 steps, batch {len(ys)}):")
    print(f"  partime.ParallelSolver : {1e3 * parallel_s:8.1f} ms")
    print(f"  sequential diffrax     : {1e3 * sequential_s:8.1f} ms")
    ratio = sequential_s / parallel_s
    verdict = "faster" if ratio >= 1 else "slower"
    print(
        f"  parallel is {max(ratio, 1 / ratio):.2f}x {verdict} on this device "
        f"(first parallel step, with compilation: {step_times[0]:.1f} s; "
        f"sequential: {first['sequential']:.1f} s)."
    )
    print(f"  loss, parallel / sequential: {parallel_loss:.6g} / {sequential_loss:.6g}")
    print(
        f"  Newton iterations per window: at most {int(iterations)} over the batch "
        f"(the window has {num_steps} steps)."
    )

    plot(args.out, ts, ys, fit, losses)
    print(f"Figure saved to {args.out}")

    failures = []
    if not losses[-1] <= 0.5 * losses[0]:
        failures.append(f"the loss did not halve: {losses[0]:.4g} -> {losses[-1]:.4g}")
    if not (jnp.all(jnp.isfinite(fit)) and all(map(math.isfinite, losses))):
        failures.append("the figure's data are not finite")
    if not math.isclose(parallel_loss, sequential_loss, rel_tol=1e-3, abs_tol=1e-6):
        failures.append(
            "parallel and sequential losses differ: "
            f"{parallel_loss:.6g} vs {sequential_loss:.6g}"
        )
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
