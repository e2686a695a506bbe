"""Train a GRU classifier on long time series with `partime.scan`.

The series are synthetic, shaped like the UEA EigenWorms data set (6 channels, 17 984
steps, 5 classes): each class is a different mix of slow undulations across the six
channels, with random phases, amplitude drift and noise. They are generated here.

The GRU runs over time with `partime.scan`, a drop-in for `jax.lax.scan` that solves
for every hidden state at once by Newton iterations (DEER) whose linear part is a
parallel scan; its gradient is one more parallel scan (implicit differentiation). The
hidden states are pooled over time (mean and standard deviation) and classified by a
linear layer.

At the end the script times one training step against the same model run with
`jax.lax.scan`, in the same run, after compiling both.

    python examples/long_sequences.py            # CPU default: T = 2000, hidden 16
    python examples/long_sequences.py --quick    # CI: a short run that checks itself
    python examples/long_sequences.py --full     # EigenWorms size (T = 17 984): a GPU
    python examples/long_sequences.py --method quasi-newton --hidden 64
"""

import argparse
import math
import pathlib
import statistics
import sys
import time

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


NUM_CHANNELS, NUM_CLASSES = 6, 5
METHODS = {"newton": partime.Newton, "quasi-newton": partime.QuasiNewton}


def make_data(num_series, length, *, key):
    """`num_series` series of shape `(length, 6)`, and their labels in `0..4`.

    Class `k` undulates with its own period (from 40 to 160 steps) and its own loadings
    on the six channels (as the eigenworm coefficients of different gaits would), plus
    the second harmonic. Every series gets random phases, a slow amplitude drift and
    Gaussian noise.
    """
    label_key, loading_key, phase_key, drift_key, noise_key = jr.split(key, 5)
    labels = jr.randint(label_key, (num_series,), 0, NUM_CLASSES)
    periods = jnp.linspace(40.0, 160.0, NUM_CLASSES)[labels]
    # Fixed per-class loadings (the same key for every data set of this seed).
    loadings = jr.uniform(loading_key, (NUM_CLASSES, NUM_CHANNELS), minval=0.2)
    t = jnp.arange(length)
    phase = jr.uniform(phase_key, (num_series, 1, NUM_CHANNELS), maxval=2 * jnp.pi)
    angle = 2 * jnp.pi * t[None, :, None] / periods[:, None, None] + phase
    signal = loadings[labels][:, None, :] * (jnp.sin(angle) + 0.5 * jnp.sin(2 * angle))
    drift_phase = jr.uniform(drift_key, (num_series, 1, 1), maxval=2 * jnp.pi)
    drift = 1 + 0.3 * jnp.sin(2 * jnp.pi * t[None, :, None] / length + drift_phase)
    noise = 0.2 * jr.normal(noise_key, signal.shape)
    return 2 * drift * signal + noise, labels


class Classifier(eqx.Module):
    """A GRU over time; the mean and standard deviation of its hidden states over time
    go to a linear layer."""

    cell: eqx.nn.GRUCell
    norm: eqx.nn.LayerNorm
    readout: eqx.nn.Linear
    hidden_size: int = eqx.field(static=True)

    def __init__(self, hidden_size, *, key):
        cell_key, readout_key = jr.split(key)
        self.cell = eqx.nn.GRUCell(NUM_CHANNELS, hidden_size, key=cell_key)
        self.norm = eqx.nn.LayerNorm(2 * hidden_size)
        self.readout = eqx.nn.Linear(2 * hidden_size, NUM_CLASSES, key=readout_key)
        self.hidden_size = hidden_size

    def __call__(self, xs, scan):
        """`scan` is `partime.scan` or `jax.lax.scan`: the same call for both."""

        def step(hidden, x):
            hidden = self.cell(x, hidden)
            return hidden, hidden

        h0 = jnp.zeros(self.hidden_size)
        _, hiddens = scan(step, h0, xs)
        pooled = jnp.concatenate([jnp.mean(hiddens, axis=0), jnp.std(hiddens, axis=0)])
        return self.readout(self.norm(pooled))


def make_train_step(scan, optimiser):
    def loss_fn(model, xs, labels):
        logits = jax.vmap(lambda x: model(x, scan))(xs)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        return jnp.mean(loss), accuracy

    @eqx.filter_jit
    def train_step(model, opt_state, xs, labels):
        (loss, accuracy), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
            model, xs, labels
        )
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss, accuracy

    return train_step


def make_evaluate(method):
    """`evaluate(model, xs) -> (logits, iterations, fell_back)`, per series: the
    predictions, and the statistics of each `partime.scan`."""

    @eqx.filter_jit
    def evaluate(model, xs):
        def one(x):
            stats = []

            def scan(f, init, xs):
                final, ys, stats_ = partime.scan(
                    f, init, xs, method=method, return_stats=True
                )
                stats.append(stats_)
                return final, ys

            logits = model(x, scan)
            return logits, stats[0].num_iterations, stats[0].fell_back

        return jax.vmap(one)(xs)

    return evaluate


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


def plot(path, xs, labels, losses, accuracies):
    fig, (ax_data, ax_loss) = plt.subplots(1, 2, figsize=(10, 4.2))
    shown = min(len(xs[0]), 600)
    for k in range(NUM_CLASSES):
        (index,) = jnp.nonzero(labels == k, size=1, fill_value=-1)
        if index[0] < 0:
            continue
        series = xs[index[0], :shown, 0]
        ax_data.plot(series + 4 * k, linewidth=0.8, label=f"class {k}")
    ax_data.set(
        xlabel=f"time step (first {shown})",
        ylabel="channel 0 (offset by class)",
        title="Synthetic EigenWorms-like series",
    )
    ax_data.set_yticks([])
    bottom, top = ax_data.get_ylim()
    ax_data.set_ylim(bottom, top + 2)  # room for the legend above the series
    ax_data.legend(loc="upper center", ncol=NUM_CLASSES, fontsize="x-small")
    steps = range(1, len(losses) + 1)
    ax_loss.plot(steps, losses, label="cross-entropy")
    ax_loss.plot(steps, accuracies, label="accuracy (batch)")
    ax_loss.set(xlabel="training step", title="Training (partime.scan)")
    ax_loss.set_ylim(bottom=0)
    ax_loss.grid(True, alpha=0.3)
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="short CI run")
    size.add_argument("--full", action="store_true", help="EigenWorms size (a GPU)")
    parser.add_argument("--length", type=int, help="time steps per series")
    parser.add_argument("--hidden", type=int, help="GRU hidden size")
    parser.add_argument("--batch", type=int, help="series per training step")
    parser.add_argument("--train-steps", type=int, help="optimiser steps")
    parser.add_argument("--method", choices=sorted(METHODS), default="newton")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).with_suffix(".png"),
        help="where to save the figure",
    )
    args = parser.parse_args(argv)
    if args.full:
        defaults = dict(length=17_984, hidden=32, batch=32, train_steps=200)
    elif args.quick:
        defaults = dict(length=500, hidden=8, batch=16, train_steps=60)
    else:
        defaults = dict(length=2_000, hidden=16, batch=16, train_steps=60)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    data_key, model_key, batch_key = jr.split(jr.key(args.seed), 3)
    num_series = 8 * args.batch
    num_test = 2 * args.batch
    all_xs, all_labels = make_data(num_series + num_test, args.length, key=data_key)
    xs, labels = all_xs[:num_series], all_labels[:num_series]
    test_xs, test_labels = all_xs[num_series:], all_labels[num_series:]
    model = Classifier(args.hidden, key=model_key)
    optimiser = optax.adam(args.lr)
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))

    method = METHODS[args.method]()
    parallel_scan = lambda f, init, xs: partime.scan(f, init, xs, method=method)
    train_step = make_train_step(parallel_scan, optimiser)

    print(
        f"Training a GRU (hidden {args.hidden}) on {num_series} series of "
        f"{args.length} steps x {NUM_CHANNELS} channels, batch {args.batch}, with "
        f"partime.scan(method=partime.{type(method).__name__}()) on "
        f"{jax.devices()[0].device_kind}."
    )
    losses, accuracies = [], []
    bar = tqdm(range(args.train_steps), desc="training (1st step compiles)")
    for step in bar:
        batch_key, key = jr.split(batch_key)
        index = jr.choice(key, num_series, (args.batch,), replace=False)
        model, opt_state, loss, accuracy = train_step(
            model, opt_state, xs[index], labels[index]
        )
        losses.append(float(loss))
        accuracies.append(float(accuracy))
        if step == 0:
            bar.set_description("training")
        bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accuracies[-1]:.2f}")
    bar.close()

    logits, iterations, fell_back = make_evaluate(method)(model, test_xs)
    test_accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == test_labels))
    batch_xs, batch_labels = xs[: args.batch], labels[: args.batch]
    sequential_step = make_train_step(jax.lax.scan, optimiser)
    repeats = 3 if args.quick else 5
    first, median = time_steps(
        {"parallel": train_step, "sequential": sequential_step},
        (model, opt_state, batch_xs, batch_labels),
        repeats,
    )
    parallel_s, sequential_s = median["parallel"], median["sequential"]
    parallel_loss = float(train_step(model, opt_state, batch_xs, batch_labels)[2])
    sequential_loss = float(
        sequential_step(model, opt_state, batch_xs, batch_labels)[2]
    )

    print(
        f"\nTime per training step (batch {args.batch}, {args.length} steps, "
        f"hidden {args.hidden}):"
    )
    print(f"  partime.scan ({type(method).__name__:11}): {1e3 * parallel_s:9.1f} ms")
    print(f"  jax.lax.scan              : {1e3 * sequential_s:9.1f} ms")
    ratio = sequential_s / parallel_s
    verdict = "faster" if ratio >= 1 else "slower"
    print(
        f"  parallel is {max(ratio, 1 / ratio):.2f}x {verdict} on this device "
        f"(first call, with compilation: {first['sequential']:.1f} s for "
        "lax.scan)."
    )
    print(
        f"  {type(method).__name__} iterations per held-out series: "
        f"{int(jnp.min(iterations))}-{int(jnp.max(iterations))} "
        f"(of {args.length} steps); sequential fallback: "
        f"{int(jnp.sum(fell_back))} of {len(test_labels)} series."
    )
    print(f"  loss, parallel / sequential: {parallel_loss:.6g} / {sequential_loss:.6g}")
    print(f"Accuracy on {len(test_labels)} held-out series: {test_accuracy:.2f}")

    plot(args.out, xs, labels, losses, accuracies)
    print(f"Figure saved to {args.out}")

    failures = []
    start, end = statistics.mean(losses[:3]), statistics.mean(losses[-3:])
    if not end <= 0.5 * start:
        failures.append(f"the loss did not halve: {start:.4g} -> {end:.4g}")
    if not (all(map(math.isfinite, losses + accuracies)) and jnp.all(jnp.isfinite(xs))):
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
