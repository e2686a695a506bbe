"""Fit a neural SDE to a noisy damped oscillator's paths, training in parallel in time.

The data are paths of a stochastic damped oscillator, `dx = v dt`,
`dv = (-x - 0.3 v) dt + 0.4 dW`, all from the same start, generated here with diffrax.
The model is the Itô SDE `dy = f(y) dt + diag(g(y)) dW` with two MLPs: the drift `f`
and the diagonal diffusion `g` (positive, through a softplus). Each training step
samples a batch of model paths, each driven by its own `diffrax.VirtualBrownianTree`,
and solves each over the whole horizon with `partime.ParallelSolver`: one diffrax step
(`dt0 = t1 - t0`) is one window of `num_steps` Euler--Maruyama steps, all solved
together by Newton iterations whose linear part is a parallel scan; the gradient is
taken by implicit differentiation, one more parallel scan.

The loss needs no adversary: it matches the model's mean and standard deviation of
each coordinate, over its sampled paths, to the data's, at every save time (moment
matching). Fresh Brownian motions are drawn at every step.

Before training, the script checks on the initial model that the parallel solve is
sequential diffrax's (the same Euler steps, one after another, on the same grid and
the same Brownian motions): the sampled paths, the loss and its gradient (float32;
relative errors below 1e-4). At the end it times one training step both ways and saves
a figure: the data's and the model's mean and spread, and the loss curve.

    python examples/neural_sde.py                # about a minute on a laptop CPU
    python examples/neural_sde.py --quick        # CI: a short run that checks itself
    python examples/neural_sde.py --out fit.png --num-steps 500 --train-steps 500
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
Y0 = jnp.array([1.5, 0.0])
DAMPING, NOISE = 0.3, 0.4
# The Brownian trees are exact to this tolerance in time; the solves compared below
# use the same trees, so it does not enter the comparison.
BROWNIAN_TOL = 1e-3


def brownian(key):
    return diffrax.VirtualBrownianTree(T0, T1, tol=BROWNIAN_TOL, shape=(2,), key=key)


def oscillator_drift(t, y, args):
    x, v = y
    return jnp.stack([v, -x - DAMPING * v])


def oscillator_diffusion(t, y, args):
    return jnp.diag(jnp.array([0.0, NOISE]))


def make_data(num_paths, num_saves, *, key):
    """`num_paths` oscillator paths `(x, v)` from `Y0`, at `num_saves` times: a fine
    sequential Euler--Maruyama solve (2000 steps) for each Brownian motion."""
    ts = jnp.linspace(T0, T1, num_saves)

    def solve(key):
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(oscillator_drift),
            diffrax.ControlTerm(oscillator_diffusion, brownian(key)),
        )
        sol = diffrax.diffeqsolve(
            terms,
            diffrax.Euler(),
            T0,
            T1,
            (T1 - T0) / 2000,
            Y0,
            saveat=diffrax.SaveAt(ts=ts),
            max_steps=2000,
        )
        return sol.ys

    return ts, jax.jit(jax.vmap(solve))(jr.split(key, num_paths))


class NeuralSDE(eqx.Module):
    """`dy = f(y) dt + diag(g(y)) dW`, with MLPs `f` and `g` (`g > 0`)."""

    drift_mlp: eqx.nn.MLP
    diffusion_mlp: eqx.nn.MLP

    def __init__(self, *, key):
        drift_key, diffusion_key = jr.split(key)
        mlp = lambda key: eqx.nn.MLP(2, 2, 64, 2, activation=jnp.tanh, key=key)
        drift, diffusion = mlp(drift_key), mlp(diffusion_key)
        # Start from slow dynamics and small noise: the first steps of training then
        # learn the data rather than undo a random MLP's excursions.
        self.drift_mlp = eqx.tree_at(
            lambda m: (m.layers[-1].weight, m.layers[-1].bias),
            drift,
            (0.1 * drift.layers[-1].weight, 0.1 * drift.layers[-1].bias),
        )
        self.diffusion_mlp = eqx.tree_at(
            lambda m: (m.layers[-1].weight, m.layers[-1].bias),
            diffusion,
            (0.1 * diffusion.layers[-1].weight, diffusion.layers[-1].bias - 2.0),
        )

    def drift(self, t, y, args):
        return self.drift_mlp(y)

    def diffusion(self, t, y, args):
        return jnp.diag(jax.nn.softplus(self.diffusion_mlp(y)))


def make_solve(solver, num_steps):
    """`solve(model, key, ts) -> (ys, iterations)`: one model path, driven by the
    Brownian tree of `key`, at the save times `ts`; and the parallel solver's Newton
    iterations (0 for a sequential one).

    The parallel solver takes one diffrax step over the whole horizon (one window of
    `num_steps` inner steps); the sequential solver steps to the same inner grid one
    step at a time. `max_steps` is as tight as it goes: diffrax sizes its
    checkpointing for the backward pass by it.
    """
    parallel = isinstance(solver, partime.ParallelSolver)
    if parallel:
        # One window, solved once (`max_steps=1`); `DirectAdjoint` differentiates the
        # saves inside it at a smaller compile than the default (see neural_ode.py).
        kwargs = dict(dt0=T1 - T0, max_steps=1, adjoint=diffrax.DirectAdjoint())
    else:
        controller = diffrax.StepTo(ts=partime.inner_grid(T0, T1, num_steps))
        kwargs = dict(dt0=None, stepsize_controller=controller, max_steps=num_steps)

    def solve(model, key, ts):
        terms = diffrax.MultiTerm(
            diffrax.ODETerm(model.drift),
            diffrax.ControlTerm(model.diffusion, brownian(key)),
        )
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            T0,
            T1,
            y0=Y0,
            saveat=diffrax.SaveAt(ts=ts, solver_state=parallel),
            **kwargs,
        )
        # `sol.solver_state` is a `partime.ParallelSolverState`: its statistics.
        iterations = sol.solver_state.num_iterations if parallel else jnp.array(0)
        return sol.ys, iterations

    return solve


def moments(ys):
    """Mean and standard deviation over paths (axis 0), at each time, of each
    coordinate."""
    return jnp.mean(ys, axis=0), jnp.std(ys, axis=0)


def make_train_step(solve, optimiser):
    def loss_fn(model, keys, ts, data_mean, data_std):
        paths, iterations = jax.vmap(solve, in_axes=(None, 0, None))(model, keys, ts)
        # At `t0` every path is at `Y0`: a zero spread, where `std`'s gradient is NaN.
        mean, std = moments(paths[:, 1:])
        loss = jnp.mean((mean - data_mean[1:]) ** 2) + jnp.mean(
            (std - data_std[1:]) ** 2
        )
        return loss, (paths, jnp.max(iterations))

    @eqx.filter_jit
    def train_step(model, opt_state, keys, ts, data_mean, data_std):
        (loss, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, keys, ts, data_mean, data_std
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss, grads, aux

    return train_step


def relative_error(x, y):
    """Largest `|x - y|` over all leaves, relative to the largest `|y|` of its leaf."""
    errors = [
        jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    ]
    return float(jnp.max(jnp.stack(errors)))


def time_steps(steps, args, repeats):
    """Per training step function: its first call's time (compilation included) and
    the median time of `repeats` calls after it. The calls alternate between the
    functions, so that a machine busy with other work slows them alike."""
    first, times = {}, {name: [] for name in steps}
    for name, step in steps.items():
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            times[name].append(time.perf_counter() - start)
    return first, {name: statistics.median(t) for name, t in times.items()}


def plot(path, ts, data, paths, losses):
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    data_mean, data_std = moments(data)
    model_mean, model_std = moments(paths)
    for i, (ax, name) in enumerate(zip(axes, ["position x", "velocity v"])):
        for y in data[:3, :, i]:
            ax.plot(ts, y, color="tab:blue", linewidth=0.6, alpha=0.5)
        for y in paths[:3, :, i]:
            ax.plot(ts, y, color="tab:orange", linewidth=0.6, alpha=0.5)
        low, high = (
            data_mean[:, i] - 2 * data_std[:, i],
            data_mean[:, i] + 2 * data_std[:, i],
        )
        ax.fill_between(ts, low, high, color="tab:blue", alpha=0.15)
        ax.plot(ts, data_mean[:, i], color="tab:blue", label="data: mean ± 2 std")
        ax.plot(ts, model_mean[:, i], "--", color="tab:orange", label="neural SDE")
        for sign in (-2, 2):
            ax.plot(
                ts,
                model_mean[:, i] + sign * model_std[:, i],
                ":",
                color="tab:orange",
            )
        ax.plot([], [], color="gray", linewidth=0.6, label="three sample paths each")
        ax.set(xlabel="time t", ylabel=name, title=f"{name.capitalize()}: data and fit")
        ax.legend(loc="upper right", fontsize=8)
    axes[2].semilogy(range(1, len(losses) + 1), losses)
    axes[2].set(
        xlabel="training step",
        ylabel="moment-matching loss",
        title="Training loss (partime.ParallelSolver)",
    )
    axes[2].grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short CI run")
    parser.add_argument("--train-steps", type=int, help="optimiser steps")
    parser.add_argument("--num-steps", type=int, help="Euler steps over the horizon")
    parser.add_argument("--batch", type=int, help="model paths sampled per step")
    parser.add_argument("--data-paths", type=int, default=256, help="data paths")
    parser.add_argument("--lr", type=float, default=1e-2, help="initial learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).with_suffix(".png"),
        help="where to save the figure",
    )
    args = parser.parse_args(argv)
    train_steps = args.train_steps or (60 if args.quick else 150)
    num_steps = args.num_steps or (100 if args.quick else 200)
    batch = args.batch or (32 if args.quick else 64)

    data_key, model_key, check_key, train_key = jr.split(jr.key(args.seed), 4)
    ts, data = make_data(args.data_paths, num_saves=41, key=data_key)
    data_mean, data_std = moments(data)
    model = NeuralSDE(key=model_key)
    optimiser = optax.adam(optax.exponential_decay(args.lr, train_steps, 0.1))
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))

    parallel = partime.ParallelSolver(diffrax.Euler(), num_steps=num_steps)
    train_step = make_train_step(make_solve(parallel, num_steps), optimiser)
    sequential_step = make_train_step(make_solve(diffrax.Euler(), num_steps), optimiser)

    print(
        f"Fitting a neural SDE to {args.data_paths} noisy oscillator paths with "
        f"partime.ParallelSolver(Euler, num_steps={num_steps}), {batch} model paths "
        f"per step, on {jax.devices()[0].device_kind} ({jnp.zeros(()).dtype})."
    )

    # The parallel solve is the sequential one: same paths, loss and gradient, on the
    # initial model with the same Brownian motions.
    keys = jr.split(check_key, batch)
    step_args = (model, opt_state, keys, ts, data_mean, data_std)
    start = time.perf_counter()
    *_, parallel_loss, parallel_grads, (parallel_paths, _) = train_step(*step_args)
    parallel_first = time.perf_counter() - start
    # From cold caches, as the parallel step's first call was (JAX caches the traces
    # of helpers that both steps use: the second would find them there).
    jax.clear_caches()
    start = time.perf_counter()
    *_, sequential_loss, sequential_grads, (sequential_paths, _) = sequential_step(
        *step_args
    )
    sequential_first = time.perf_counter() - start
    errors = {
        "paths": relative_error(parallel_paths, sequential_paths),
        "loss": relative_error(parallel_loss, sequential_loss),
        "gradient": relative_error(parallel_grads, sequential_grads),
    }
    print(
        "Parallel against sequential diffrax, same Brownian motions (relative error):"
    )
    print("  " + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))

    losses = []
    bar = tqdm(range(train_steps), desc="training")
    for step in bar:
        keys = jr.split(jr.fold_in(train_key, step), batch)
        model, opt_state, loss, _, (paths, iterations) = train_step(
            model, opt_state, keys, ts, data_mean, data_std
        )
        loss = float(loss)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", newton_iters=int(iterations))
    bar.close()

    # Time one training step both ways, from the same model, both already compiled.
    repeats = 5 if args.quick else 10
    step_args = (model, opt_state, keys, ts, data_mean, data_std)
    _, median = time_steps(
        {"parallel": train_step, "sequential": sequential_step}, step_args, repeats
    )
    parallel_s, sequential_s = median["parallel"], median["sequential"]
    # The figure shows the trained model's batch of paths.
    *_, (paths, iterations) = train_step(*step_args)

    print(f"\nTime per training step ({num_steps} Euler steps, batch {batch}):")
    print(f"  partime.ParallelSolver : {1e3 * parallel_s:8.1f} ms")
    print(f"  sequential diffrax     : {1e3 * sequential_s:8.1f} ms")
    ratio = sequential_s / parallel_s
    verdict = "faster" if ratio >= 1 else "slower"
    print(
        f"  parallel is {max(ratio, 1 / ratio):.2f}x {verdict} on this device "
        f"(first parallel step, with compilation: {parallel_first:.1f} s; "
        f"sequential: {sequential_first:.1f} s)."
    )
    # The loss is noisy (fresh Brownian motions every step): averages of five steps.
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    print(f"  loss, first / last five steps: {first:.4g} / {last:.4g}")
    print(
        f"  Newton iterations per window: at most {int(iterations)} over the batch "
        f"(the window has {num_steps} steps)."
    )

    plot(args.out, ts, data, paths, losses)
    print(f"Figure saved to {args.out}")

    failures = []
    tolerance = 1e-4 if jnp.zeros(()).dtype == jnp.float32 else 1e-6
    for name, error in errors.items():
        if not error < tolerance:
            failures.append(
                f"parallel and sequential {name} differ: relative error {error:.2g}"
            )
    if not last <= 0.5 * first:
        failures.append(f"the loss did not halve: {first:.4g} -> {last:.4g}")
    if not (jnp.all(jnp.isfinite(paths)) and all(map(math.isfinite, losses))):
        failures.append("the figure's data are not finite")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
