"""Sample a diffusion model in parallel over time: a sliding window of Picard
iterations (ParaDiGMS) for the reverse-time SDE, and `partime.ParallelSolver` for the
probability-flow ODE.

A small score model (an MLP that predicts the noise) is trained by denoising score
matching on a 2-D toy distribution made here: a ring of eight Gaussians. Samples are
then drawn from the variance-preserving diffusion `dx = -½β(t)x dt + √β(t) dW` by
running it backwards from `t = 1` to `t = 1e-3`, two ways, each in parallel and
sequentially from the same starting points:

- **Reverse-time SDE**, Euler–Maruyama. The noise is drawn beforehand and passed as
    the inputs `xs`, so each step is a deterministic map and the chain is a
    `partime.scan`: a sliding window of `W` steps with Picard iterations (no
    Jacobians: each iteration is one batched evaluation of the score model on `W`
    steps plus a cumulative sum). As in ParaDiGMS, the tolerance of step `t` is scaled
    by that step's noise standard deviation `√(β h)` (`tolerance_scale`): an error far
    below the noise the step adds anyway does not change the distribution of the
    samples. Sequential baseline: `jax.lax.scan` over the same steps and noise.
- **Probability-flow ODE** `dx/dt = -½β(t)(x + score)`, Heun's method, through
    `diffrax.diffeqsolve` with `partime.ParallelSolver(diffrax.Heun(), num_steps=N)`:
    all `N` steps in one parallel window, Newton iterations per sample (`jax.vmap`).
    Sequential baseline: `diffrax.Heun()` on the same grid.

It reports parallel iterations (the depth of the computation, against `N` sequential
steps), wall time on this device, and the energy distance of each set of samples to
fresh data (with the distance between two independent data sets of the same size as
the noise floor), and saves a figure of the samples.

On a CPU the parallel samplers are slower in wall time: each iteration evaluates the
model on a whole window, so they do several times the sequential work on a couple of
cores. Their depth — iterations against sequential steps — is what turns into speed
on a parallel device.

    python examples/diffusion_sampling.py            # a few minutes on a CPU
    python examples/diffusion_sampling.py --quick    # CI: short, checks itself
    python examples/diffusion_sampling.py --steps 1000 --window 200 --samples 4000
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

import partime  # noqa: E402


BETA_MIN, BETA_MAX = 0.1, 20.0
T_START, T_END = 1.0, 1e-3


def beta(t):
    return BETA_MIN + t * (BETA_MAX - BETA_MIN)


def marginal(t):
    """`(α_t, σ_t)`: `x_t | x_0 ~ N(α_t x_0, σ_t² I)` for the VP diffusion."""
    log_alpha = -0.5 * (BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2)
    return jnp.exp(log_alpha), jnp.sqrt(-jnp.expm1(2 * log_alpha))


def ring(key, num, modes=8, radius=2.0, std=0.1):
    """Samples of a ring of `modes` Gaussians."""
    k_mode, k_noise = jr.split(key)
    angle = 2 * jnp.pi * jr.randint(k_mode, (num,), 0, modes) / modes
    centres = radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    return centres + std * jr.normal(k_noise, (num, 2))


class ScoreModel(eqx.Module):
    """Predicts the noise `ε` in `x_t = α_t x_0 + σ_t ε`; the score is `-ε̂ / σ_t`."""

    mlp: eqx.nn.MLP
    frequencies: jax.Array

    def __init__(self, key, width=64, depth=3, num_frequencies=8):
        self.frequencies = jnp.pi * 2.0 ** jnp.arange(num_frequencies) / 2
        self.mlp = eqx.nn.MLP(
            2 + 2 * num_frequencies, 2, width, depth, jax.nn.silu, key=key
        )

    def noise(self, t, x):
        features = jnp.concatenate(
            [x, jnp.sin(self.frequencies * t), jnp.cos(self.frequencies * t)]
        )
        return self.mlp(features)

    def score(self, t, x):
        """For a batch `x` of shape `(n, 2)` at one time `t`."""
        _, sigma = marginal(t)
        return -jax.vmap(lambda y: self.noise(t, y))(x) / sigma


def train(model, steps, batch, lr, *, key):
    optimiser = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
    opt_state = optimiser.init(eqx.filter(model, eqx.is_array))

    def loss_fn(model, key):
        k_data, k_t, k_noise = jr.split(key, 3)
        x0 = ring(k_data, batch)
        t = jr.uniform(k_t, (batch,), minval=T_END, maxval=T_START)
        noise = jr.normal(k_noise, (batch, 2))
        alpha, sigma = marginal(t)
        xt = alpha[:, None] * x0 + sigma[:, None] * noise
        predicted = jax.vmap(model.noise)(t, xt)
        return jnp.mean((predicted - noise) ** 2)

    @eqx.filter_jit
    def train_step(model, opt_state, key):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, key)
        updates, opt_state = optimiser.update(grads, opt_state, model)
        return eqx.apply_updates(model, updates), opt_state, loss

    losses = []
    for key in jr.split(key, steps):
        model, opt_state, loss = train_step(model, opt_state, key)
        losses.append(float(loss))
    return model, losses


def time_grid(num_steps):
    """`num_steps + 1` times from `T_START` down to `T_END`, evenly spaced; the same
    formula as `ParallelSolver`'s inner grid, so that both ODE solvers step on
    identical times."""
    fraction = jnp.arange(num_steps + 1) / num_steps
    return (T_START + (T_END - T_START) * fraction).at[-1].set(T_END)


# Reverse-time SDE: Euler–Maruyama with pre-drawn noise ------------------------------


def sde_inputs(num_steps, num_samples, *, key):
    ts = time_grid(num_steps)
    h = ts[:-1] - ts[1:]
    noise = jr.normal(key, (num_steps, num_samples, 2))
    return ts[:-1], h, noise


def em_step(model):
    """One Euler–Maruyama step of the reverse-time SDE, backwards from `t` by `h`."""

    def step(x, inputs):
        t, h, z = inputs
        b = beta(t)
        drift = 0.5 * b * x + b * model.score(t, x)
        return x + h * drift + jnp.sqrt(b * h) * z, None

    return step


def sde_sequential(model, x1, inputs):
    return jax.lax.scan(em_step(model), x1, inputs)[0]


def sde_parallel(model, x1, inputs, window, tolerance):
    t, h, _ = inputs
    # ParaDiGMS: step t's error is measured in units of the noise it adds, √(β h).
    noise_std = jnp.sqrt(beta(t) * h)
    final, _, stats = partime.scan(
        em_step(model),
        x1,
        inputs,
        method=partime.Picard(rtol=0.0, atol=tolerance),
        window=window,
        tolerance_scale=noise_std,
        return_stats=True,
    )
    return final, (stats.num_iterations, stats.num_sequential_steps)


# Probability-flow ODE through diffrax ------------------------------------------------


def ode_term(model):
    def vector_field(t, x, args):
        return -0.5 * beta(t) * (x + model.score(t, x[None])[0])

    return diffrax.ODETerm(vector_field)


def ode_sequential(model, x1, num_steps):
    def solve(x):
        sol = diffrax.diffeqsolve(
            ode_term(model),
            diffrax.Heun(),
            t0=T_START,
            t1=T_END,
            dt0=None,
            y0=x,
            stepsize_controller=diffrax.StepTo(ts=time_grid(num_steps)),
            max_steps=num_steps,
        )
        return sol.ys[-1]

    return jax.vmap(solve)(x1)


def ode_parallel(model, x1, num_steps):
    solver = partime.ParallelSolver(diffrax.Heun(), num_steps=num_steps)

    def solve(x):
        sol = diffrax.diffeqsolve(
            ode_term(model),
            solver,
            t0=T_START,
            t1=T_END,
            dt0=T_END - T_START,  # one window: all `num_steps` Heun steps at once
            y0=x,
            saveat=diffrax.SaveAt(t1=True, solver_state=True),
            max_steps=1,
        )
        return sol.ys[-1], sol.solver_state

    samples, state = jax.vmap(solve)(x1)
    return samples, (state.num_iterations, state.num_fallbacks)


def heun_step(model):
    """One step of Heun's method for the probability-flow ODE, from `t0` to `t1`:
    the same arithmetic as `diffrax.Heun`."""

    def vector_field(t, x):
        return -0.5 * beta(t) * (x + model.score(t, x))

    def step(x, times):
        t0, t1 = times
        h = t1 - t0
        k1 = vector_field(t0, x)
        k2 = vector_field(t1, x + h * k1)
        return x + 0.5 * h * (k1 + k2), None

    return step


def ode_sliding(model, x1, num_steps, window):
    ts = time_grid(num_steps)
    final, _, stats = partime.scan(
        heun_step(model),
        x1,
        (ts[:-1], ts[1:]),
        method=partime.Picard(),
        window=window,
        return_stats=True,
    )
    return final, (stats.num_iterations, stats.num_sequential_steps)


# Measurement ------------------------------------------------------------------------


def energy_distance(x, y):
    """`2 E|X - Y| - E|X - X'| - E|Y - Y'|`: zero iff the distributions agree."""

    def mean_distance(a, b):
        diff = a[:, None, :] - b[None, :, :]
        return jnp.mean(jnp.sqrt(jnp.sum(diff**2, axis=-1) + 1e-12))

    return float(2 * mean_distance(x, y) - mean_distance(x, x) - mean_distance(y, y))


def timed(fn, *args, repeats):
    """Compiles, then the median of `repeats` blocking calls: `(output, seconds)`."""
    compiled = eqx.filter_jit(fn)
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def plot(path, data, panels):
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 4.2))
    for ax, (title, points) in zip(axes, [("data", data)] + panels):
        ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
        ax.set(title=title, xlim=(-3, 3), ylim=(-3, 3))
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short CI run")
    parser.add_argument("--train-steps", type=int, help="optimiser steps")
    parser.add_argument("--steps", type=int, help="sampler steps N")
    parser.add_argument("--window", type=int, help="sliding window W (SDE)")
    parser.add_argument("--samples", type=int, help="samples drawn")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="SDE: accepted error per step, in units of that step's noise std",
    )
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path(__file__).with_suffix(".png"),
        help="where to save the figure",
    )
    args = parser.parse_args(argv)
    train_steps = args.train_steps or (400 if args.quick else 3000)
    num_steps = args.steps or (100 if args.quick else 500)
    window = args.window or (25 if args.quick else 100)
    num_samples = args.samples or (500 if args.quick else 1000)
    repeats = 1 if args.quick else 3

    k_model, k_train, k_prior, k_noise, k_data, k_floor = jr.split(jr.key(args.seed), 6)
    start = time.perf_counter()
    model, losses = train(
        ScoreModel(k_model), train_steps, batch=512, lr=args.lr, key=k_train
    )
    print(
        f"Trained the score model: {train_steps} steps in "
        f"{time.perf_counter() - start:.1f} s, loss {losses[0]:.3f} -> "
        f"{statistics.mean(losses[-50:]):.3f}."
    )

    x1 = jr.normal(k_prior, (num_samples, 2))
    inputs = sde_inputs(num_steps, num_samples, key=k_noise)
    sde_seq, sde_seq_s = timed(sde_sequential, model, x1, inputs, repeats=repeats)
    (sde_par, (sde_iters, sde_fallback)), sde_par_s = timed(
        lambda *a: sde_parallel(*a, window, args.tolerance),
        model,
        x1,
        inputs,
        repeats=repeats,
    )
    ode_seq, ode_seq_s = timed(
        lambda m, x: ode_sequential(m, x, num_steps), model, x1, repeats=repeats
    )
    (ode_par, (ode_iters, ode_fallbacks)), ode_par_s = timed(
        lambda m, x: ode_parallel(m, x, num_steps), model, x1, repeats=repeats
    )
    (ode_win, (ode_win_iters, ode_win_fallback)), ode_win_s = timed(
        lambda m, x: ode_sliding(m, x, num_steps, window), model, x1, repeats=repeats
    )

    data = ring(k_data, num_samples)
    floor = energy_distance(ring(k_floor, num_samples), data)
    prior = energy_distance(x1, data)
    rows = [
        ("SDE, sequential (lax.scan)", sde_seq, num_steps, sde_seq_s),
        (f"SDE, sliding window W={window}", sde_par, int(sde_iters), sde_par_s),
        ("ODE, sequential (diffrax Heun)", ode_seq, num_steps, ode_seq_s),
        ("ODE, ParallelSolver(Heun)", ode_par, int(jnp.max(ode_iters)), ode_par_s),
        (f"ODE, sliding window W={window}", ode_win, int(ode_win_iters), ode_win_s),
    ]
    print(
        f"\n{num_samples} samples, N = {num_steps} steps, on "
        f"{jax.devices()[0].device_kind}. Energy distance to the data: "
        f"{floor:.4f} between two data sets (noise floor), {prior:.4f} for the "
        "prior N(0, I)."
    )
    print(f"{'sampler':34s} {'depth':>7s} {'time ms':>9s} {'energy dist.':>13s}")
    distances = {}
    for name, samples, depth, seconds in rows:
        distances[name] = energy_distance(samples, data)
        print(f"{name:34s} {depth:7d} {1e3 * seconds:9.1f} {distances[name]:13.4f}")
    print(
        "depth: sequential steps, or parallel iterations (Picard sweeps of the "
        "sliding window; Newton iterations of the ODE window, the most over the "
        "samples)."
    )
    sde_diff = float(jnp.max(jnp.abs(sde_par - sde_seq)))
    ode_diff = float(jnp.max(jnp.abs(ode_par - ode_seq)))
    ode_win_diff = float(jnp.max(jnp.abs(ode_win - ode_seq)))
    print(
        f"Largest difference, parallel vs sequential: SDE {sde_diff:.2e} "
        f"(tolerance {args.tolerance:g} x noise std per step; {int(sde_fallback)} "
        f"steps fell back); ODE, ParallelSolver {ode_diff:.2e} "
        f"({int(jnp.sum(ode_fallbacks))} windows fell back); ODE, sliding window "
        f"{ode_win_diff:.2e} ({int(ode_win_fallback)} steps fell back)."
    )

    plot(
        args.out,
        data,
        [
            (f"SDE, sliding window ({int(sde_iters)} iterations)", sde_par),
            (f"ODE, ParallelSolver ({int(jnp.max(ode_iters))} iterations)", ode_par),
            (f"ODE, sliding window ({int(ode_win_iters)} iterations)", ode_win),
        ],
    )
    print(f"Figure saved to {args.out}")

    failures = []
    for name, samples, *_ in rows:
        if not bool(jnp.all(jnp.isfinite(samples))):
            failures.append(f"{name}: samples not finite")
    # An error per step of `tolerance` noise standard deviations, carried along the
    # chain: a few tolerances at most in absolute terms (samples are O(1)).
    if not sde_diff <= 20 * args.tolerance:
        failures.append(f"SDE: parallel and sequential differ by {sde_diff:.2e}")
    # The ODE solves' default tolerance (about 1e-5 per step in float32), carried
    # along `num_steps` steps.
    for name, diff in (("ParallelSolver", ode_diff), ("sliding", ode_win_diff)):
        if not diff <= 1e-5 * num_steps:
            failures.append(f"ODE, {name}: differs from sequential by {diff:.2e}")
    for seq, par in ((rows[0], rows[1]), (rows[2], rows[3]), (rows[2], rows[4])):
        d_seq, d_par = distances[seq[0]], distances[par[0]]
        if not d_par <= d_seq + max(0.1 * d_seq, floor):
            failures.append(f"{par[0]}: energy distance {d_par:.4f} vs {d_seq:.4f}")
    if not distances[rows[0][0]] < 0.25 * prior:
        failures.append("the model did not learn the data (energy distance)")
    if not all(map(math.isfinite, losses)):
        failures.append("training loss not finite")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
