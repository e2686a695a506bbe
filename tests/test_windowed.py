"""Windowed solves (`partime.scan(..., window=W)`): fixed blocks and the sliding
window, against `jax.lax.scan` and the unwindowed `partime.scan`."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import partime

from .helpers import max_rel_error, tree_allclose


class Cell(eqx.Module):
    """A contracting GRU-like cell."""

    w: jax.Array
    u: jax.Array
    b: jax.Array

    def __init__(self, size, key):
        k1, k2, k3 = jr.split(key, 3)
        self.w = 0.6 * jr.normal(k1, (2, size, size)) / jnp.sqrt(size)
        self.u = jr.normal(k2, (2, size, size)) / jnp.sqrt(size)
        self.b = 0.1 * jr.normal(k3, (2, size))

    def __call__(self, h, x):
        z = jax.nn.sigmoid(self.w[0] @ h + self.u[0] @ x + self.b[0])
        n = jnp.tanh(self.w[1] @ h + self.u[1] @ x + self.b[1])
        h = (1 - z) * n + z * h
        return h, jnp.sum(h**2)


def _problem(size, length, seed=0):
    k1, k2, k3 = jr.split(jr.PRNGKey(seed), 3)
    return Cell(size, k1), 0.5 * jr.normal(k3, (size,)), jr.normal(k2, (length, size))


def _lax_scan(f, init, xs=None, **kwargs):
    return jax.lax.scan(lambda c, x: f(c, x), init, xs, **kwargs)


def _windowed(window, schedule, method=partime.Newton(), **kw):
    def scan(f, init, xs=None, **kwargs):
        return partime.scan(
            f, init, xs, method=method, window=window, schedule=schedule, **kw, **kwargs
        )

    return scan


def _loss(scan_fn, cell, init, xs):
    final, ys = scan_fn(cell, init, xs)
    return jnp.sum(ys) + jnp.sum(jnp.sin(final))


LENGTH = 203
# (schedule, window): 16 does not divide T; 1000 > T (for blocks, that is one
# `fixed_point_solve`). Compared with lax.scan and with the unwindowed solve.
CONFIGS = [("sliding", 16), ("blocks", 16), ("sliding", 1000)]


@pytest.fixture(scope="module")
def values_case():
    cell, init, xs = _problem(3, LENGTH)
    expected = _lax_scan(cell, init, xs)
    *unwindowed, whole = partime.scan(cell, init, xs, return_stats=True)
    assert max_rel_error(unwindowed, expected) < 1e-8
    results = {
        config: _windowed(*reversed(config), return_stats=True)(cell, init, xs)
        for config in CONFIGS
    }
    return (cell, init, xs), expected, (unwindowed, whole), results


@pytest.mark.parametrize("schedule, window", CONFIGS)
def test_values(values_case, schedule, window):
    _, expected, (unwindowed, whole), results = values_case
    *out, stats = results[schedule, window]
    assert max_rel_error(out, expected) < 1e-8
    assert max_rel_error(out, unwindowed) < 1e-8
    assert isinstance(stats, partime.Stats)
    assert stats.result == partime.RESULTS.successful
    assert 1 <= int(stats.num_advances) <= int(stats.num_iterations)
    assert not stats.fell_back
    assert int(stats.fallback_start) == LENGTH
    if window >= LENGTH:
        # One window: as many iterations as the unwindowed solve (give or take the
        # one that confirms convergence).
        assert abs(int(stats.num_iterations) - int(whole.num_iterations)) <= 1


def test_sliding_advances_past_converged_steps(values_case):
    """Jacobi converges from the front of a window backwards: the sliding window moves
    on as each step converges, fixed blocks wait for their far end. (Newton converges
    the whole window at once, and both schedules take about as many iterations.)"""
    (cell, init, xs), expected, _, results = values_case
    *_, newton = results["blocks", 16]
    assert int(newton.num_advances) == -(-LENGTH // 16)
    jacobi = partime.Jacobi()
    *out, sliding = _windowed(40, "sliding", jacobi, return_stats=True)(cell, init, xs)
    *_, blocks = _windowed(40, "blocks", jacobi, return_stats=True)(cell, init, xs)
    assert max_rel_error(out, expected) < 1e-8
    assert int(sliding.num_iterations) < int(blocks.num_iterations)
    assert 1 <= int(sliding.num_advances) <= int(sliding.num_iterations)


@pytest.mark.parametrize(
    "method", [partime.QuasiNewton(), partime.Picard()], ids=lambda m: type(m).__name__
)
def test_other_methods(values_case, method):
    (cell, init, xs), expected, *_ = values_case
    *out, stats = _windowed(40, "sliding", method, return_stats=True)(cell, init, xs)
    assert max_rel_error(out, expected) < 1e-8
    assert stats.result == partime.RESULTS.successful


@pytest.mark.parametrize("schedule", ["sliding", "blocks"])
def test_warm_start_guess(schedule):
    """Given the exact trajectory as the guess, every window is accepted at its first
    iteration (or without one): at most one iteration per window."""
    cell, init, xs = _problem(3, 90, seed=7)
    expected = _lax_scan(cell, init, xs)
    carries = _lax_scan(lambda h, x: (cell(h, x)[0],) * 2, init, xs)[1]
    scan_fn = _windowed(20, schedule, guess=carries, return_stats=True)
    *out, stats = scan_fn(cell, init, xs)
    assert max_rel_error(out, expected) < 1e-8
    assert int(stats.num_iterations) <= 5


# Gradients -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gradient_case():
    args = _problem(3, 100, seed=3)
    grad = jax.jit(jax.grad(lambda *a: _loss(_lax_scan, *a), argnums=(0, 1, 2)))
    return args, grad(*args)


@pytest.mark.parametrize("schedule", ["sliding", "blocks"])
def test_gradients(gradient_case, schedule):
    """With respect to `init`, `xs` and the parameters `f` closes over. W = 30 does
    not divide T = 100: three blocks and a padded tail."""
    args, expected = gradient_case
    scan_fn = _windowed(30, schedule)

    def loss(cell, init, xs):
        return _loss(scan_fn, lambda h, x: cell(h, x), init, xs)

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    assert max_rel_error(got, expected) < 1e-6
    assert all(jnp.max(jnp.abs(g)) > 1e-6 for g in jax.tree.leaves(got))


def test_forward_mode(gradient_case):
    (cell, init, xs), _ = gradient_case
    tangents = jax.tree.map(jnp.ones_like, (cell, init, xs))
    _, expected = jax.jvp(lambda *a: _loss(_lax_scan, *a), (cell, init, xs), tangents)
    scan_fn = _windowed(30, "sliding")
    _, got = jax.jvp(lambda *a: _loss(scan_fn, *a), (cell, init, xs), tangents)
    assert jnp.allclose(got, expected, rtol=1e-6)


def _pytree_step(carry, x):
    a, (b, c) = carry["a"], carry["bc"]
    a = jnp.tanh(0.5 * a + 0.3 * b + x["u"])
    b = 0.8 * b + 0.1 * jnp.sum(a)
    c = jnp.cos(c) * 0.5
    return {"a": a, "bc": (b, c)}, (a[0], c)


_PYTREE_INIT = {"a": jnp.ones(3), "bc": (jnp.array(0.5), jnp.zeros((2, 2)))}


@pytest.mark.parametrize("schedule", ["sliding", "blocks"])
def test_pytree_carry_reverse(schedule):
    """PyTree carry, `reverse=True`, and the gradient through it."""
    xs = {"u": jnp.broadcast_to(jnp.linspace(-1, 1, 60)[:, None], (60, 3))}
    scan_fn = _windowed(7, schedule)

    def loss(scan, init):
        final, (a0, c) = scan(_pytree_step, init, xs, reverse=True)
        return jnp.sum(a0) + final["bc"][0] + jnp.sum(c[-1])

    expected = jax.lax.scan(_pytree_step, _PYTREE_INIT, xs, reverse=True)
    assert tree_allclose(
        scan_fn(_pytree_step, _PYTREE_INIT, xs, reverse=True), expected
    )
    expected = jax.grad(lambda i: loss(jax.lax.scan, i))(_PYTREE_INIT)
    got = jax.jit(jax.grad(lambda i: loss(scan_fn, i)))(_PYTREE_INIT)
    assert max_rel_error(got, expected) < 1e-6


def test_no_xs():
    """No inputs, no outputs (`ys` is `None`), and a window that divides `T`."""

    def no_input(carry, _):
        return jax.tree.map(lambda c: 0.5 * jnp.sin(c), carry), None

    expected = jax.lax.scan(no_input, _PYTREE_INIT, length=50)
    got = _windowed(10, "sliding")(no_input, _PYTREE_INIT, length=50)
    assert tree_allclose(got, expected)


def test_vmap():
    cell, _, xs = _problem(3, 80, seed=6)
    inits = jr.normal(jr.PRNGKey(0), (4, 3))
    expected = jax.vmap(lambda i: _lax_scan(cell, i, xs))(inits)
    scan_fn = _windowed(20, "sliding")
    got = jax.jit(jax.vmap(lambda i: scan_fn(cell, i, xs)))(inits)
    assert max_rel_error(got, expected) < 1e-8


# The automatic window ---------------------------------------------------------------


def test_automatic_window_predictable(values_case):
    """On a contracting recurrence the whole sequence converges: the automatic
    window never narrows, and is the whole-sequence solve, iteration for iteration
    and bit for bit."""
    (cell, init, xs), expected, (unwindowed, whole), _ = values_case
    *out, stats = partime.scan(cell, init, xs, window="auto", return_stats=True)
    assert max_rel_error(out, expected) < 1e-8
    assert not stats.fell_back
    # Newton on a contracting recurrence: a handful of iterations.
    assert int(stats.num_iterations) == int(whole.num_iterations) <= 10
    assert int(stats.window) == xs.shape[0]
    assert tree_allclose(out, unwindowed, rtol=0, atol=0)


_VDP_STEP, _VDP_LENGTH = 0.05, 2000


def _van_der_pol(y, t):
    """One RK4 step of van der Pol (μ = 1); `t` unused."""
    del t

    def field(y):
        return jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])

    h = _VDP_STEP
    k1 = field(y)
    k2 = field(y + h / 2 * k1)
    k3 = field(y + h / 2 * k2)
    k4 = field(y + h * k3)
    y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y, y[0]


@pytest.fixture(scope="module")
def neutral_case():
    """Van der Pol over 100 time units (about 15 periods) from a flat guess."""
    init = jnp.array([2.0, 0.0])
    xs = jnp.arange(_VDP_LENGTH, dtype=init.dtype) * _VDP_STEP
    expected = _lax_scan(_van_der_pol, init, xs)
    return init, xs, expected


def test_automatic_window_neutral(neutral_case):
    """The whole sequence gives up and falls back; the automatic window narrows,
    converges without the fallback, exactly, and in parallel, in windows that take a
    few iterations each."""
    init, xs, expected = neutral_case
    *out, whole = partime.scan(_van_der_pol, init, xs, return_stats=True)
    assert whole.fell_back and max_rel_error(out, expected) < 1e-8
    assert int(whole.window) == _VDP_LENGTH
    *out, stats = partime.scan(_van_der_pol, init, xs, window="auto", return_stats=True)
    assert max_rel_error(out, expected) < 1e-8
    assert not stats.fell_back
    assert stats.result == partime.RESULTS.successful
    # It narrowed (the whole sequence gave up), at most to a 64th of it.
    assert _VDP_LENGTH // 64 <= int(stats.window) < _VDP_LENGTH
    # Parallel: on average more than 10 steps settle per iteration.
    assert 0 < int(stats.num_iterations) < _VDP_LENGTH // 10
    # Narrow enough that a window converges in a few iterations: at most 10 per
    # window of its width, `iterations / (T / width)` (narrowed only when hopeless,
    # 42.5: 170 iterations in windows of 500 steps).
    assert int(stats.num_iterations) * int(stats.window) <= 10 * _VDP_LENGTH


def test_automatic_window_gradient(neutral_case):
    """The derivative is the whole sequence's implicit one at the solution."""
    init, xs, _ = neutral_case

    def loss(scan_fn, init):
        final, ys = scan_fn(_van_der_pol, init, xs)
        return jnp.sum(ys**2) + jnp.sum(final)

    auto = functools.partial(partime.scan, window="auto")
    expected = jax.grad(functools.partial(loss, jax.lax.scan))(init)
    got = jax.grad(functools.partial(loss, auto))(init)
    assert max_rel_error(got, expected) < 1e-7


# Failure modes and the fallback ----------------------------------------------------


@pytest.mark.parametrize("schedule", ["sliding", "blocks"])
def test_window_that_does_not_converge_falls_back_exactly(values_case, schedule):
    """Two Newton iterations cannot converge a window of 40 steps: each window is
    finished sequentially from its converged prefix, exactly."""
    (cell, init, xs), expected, *_ = values_case
    scan_fn = _windowed(40, schedule, partime.Newton(max_iters=2), return_stats=True)
    *out, stats = scan_fn(cell, init, xs)
    assert stats.fell_back
    assert stats.result == partime.RESULTS.successful
    assert 0 < int(stats.num_sequential_steps) < LENGTH
    assert int(stats.fallback_start) < LENGTH
    assert max_rel_error(out, expected) < 1e-8


def test_no_fallback_reports_failure(values_case):
    (cell, init, xs), *_ = values_case
    method = partime.Newton(max_iters=2, fallback=False)
    scan_fn = _windowed(40, "blocks", method, throw=False, return_stats=True)
    *_, stats = scan_fn(cell, init, xs)
    assert stats.result == partime.RESULTS.nonlinear_max_steps_reached
    assert not stats.fell_back
    with pytest.raises(Exception, match="did not converge"):
        _windowed(40, "sliding", method)(cell, init, xs)


def test_divergence_falls_back():
    """Newton on an explosive recurrence produces inf/NaN iterates: the window is
    finished sequentially, and the answer is exact."""

    def step(state, _):
        new = jnp.exp(state) - 1.5
        return new, new

    init = jnp.array([0.1])
    expected = jax.lax.scan(step, init, length=40)
    *out, stats = _windowed(16, "sliding", return_stats=True)(step, init, length=40)
    assert stats.result == partime.RESULTS.successful
    assert jnp.allclose(out[1], expected[1], rtol=1e-8)


def test_nan_init():
    cell, init, xs = _problem(2, 20)
    bad = init.at[0].set(jnp.nan)
    scan_fn = _windowed(8, "sliding", return_stats=True, throw=False)
    *_, stats = scan_fn(cell, bad, xs)
    assert stats.result == partime.RESULTS.nonfinite_input


def test_bad_arguments():
    f = lambda c, x: (c, x)
    init, xs = jnp.zeros(2), jnp.zeros((5, 1))
    with pytest.raises(ValueError, match="at least 1"):
        partime.scan(f, init, xs, window=0)
    with pytest.raises(TypeError, match="int"):
        partime.scan(f, init, xs, window=2.5)
    with pytest.raises(TypeError, match="'auto'"):
        partime.scan(f, init, xs, window="whole")
    with pytest.raises(ValueError, match="schedule"):
        partime.scan(f, init, xs, window=2, schedule="diagonal")
    with pytest.raises(ValueError, match="sliding"):
        partime.scan(f, init, xs, window=2, schedule="blocks", tolerance_scale=2.0)
    with pytest.raises(ValueError, match="shape"):
        partime.scan(f, init, xs, window=2, tolerance_scale=jnp.ones(4))


# Scaled tolerances -----------------------------------------------------------------


def _langevin_problem(length, size=2):
    """Euler–Maruyama for overdamped Langevin dynamics in a quartic well, with the
    noise drawn beforehand (the set-up of a diffusion sampler)."""
    dt = 0.01
    noise = jnp.sqrt(2 * dt) * jr.normal(jr.PRNGKey(1), (length, size))

    def step(x, z):
        new = x - dt * (x**3 - x) + z
        return new, new

    return step, jnp.ones(size), noise


def test_tolerance_scale():
    step, init, noise = _langevin_problem(300)
    expected = jax.lax.scan(step, init, noise)

    @jax.jit
    def solve(scale):
        method = partime.Picard(rtol=1e-10, atol=1e-10)
        kw = dict(window=64, tolerance_scale=scale, return_stats=True)
        return partime.scan(step, init, noise, method=method, **kw)

    *exact, stats = solve(jnp.ones(300))
    assert max_rel_error(exact, expected) < 1e-8
    # Loose at every step, by a factor 1e6: fewer iterations, and the answer is
    # accurate only to about the scaled tolerance (1e-4), amplified along the way.
    *loose, loose_stats = solve(jnp.full(300, 1e6))
    assert int(loose_stats.num_iterations) < int(stats.num_iterations)
    assert 1e-8 < max_rel_error(loose, expected) < 1e-2
    # Loose over the first half only: the second half is again tight relative to
    # its predecessors, and no worse than the loose solve.
    *half, half_stats = solve(jnp.where(jnp.arange(300) < 150, 1e6, 1.0))
    assert int(loose_stats.num_iterations) <= int(half_stats.num_iterations)
    assert max_rel_error(half, expected) < 1e-2


def test_tolerance_scale_reverse_is_aligned_with_xs():
    """The scale is given in the order of `xs`: with `reverse=True`, scaling up the
    tolerance of the steps processed last (the first entries of `xs`) leaves the
    steps processed first exact."""
    step, init, noise = _langevin_problem(200)
    method = partime.Picard(rtol=1e-10, atol=1e-10)
    scale = jnp.where(jnp.arange(200) < 100, 1e6, 1.0)
    expected = jax.lax.scan(step, init, noise, reverse=True)[1]
    ys = partime.scan(
        step, init, noise, reverse=True, method=method, window=32, tolerance_scale=scale
    )[1]
    assert max_rel_error(ys[100:], expected[100:]) < 1e-8
    assert max_rel_error(ys, expected) < 1e-2


# Memory ----------------------------------------------------------------------------


def test_memory_is_bounded_by_the_window():
    """Newton's unwindowed solve keeps T·d² Jacobian entries; a window of W keeps
    W·d² of them (plus O(T·d) for the trajectory), forward and reverse."""
    size, length, window = 128, 4096, 64
    cell = Cell(size, jr.PRNGKey(0))
    init = jax.ShapeDtypeStruct((size,), jnp.float64)
    xs = jax.ShapeDtypeStruct((length, size), jnp.float64)

    def memory(schedule, grad):
        loss = lambda i, x: _loss(_windowed(window, schedule), cell, i, x)
        fn = jax.jit(jax.grad(loss) if grad else loss)
        analysis = fn.lower(init, xs).compile().memory_analysis()
        if analysis is None:
            pytest.skip("memory_analysis() is not available on this backend")
        return analysis.temp_size_in_bytes + analysis.output_size_in_bytes

    jacobians = length * size * size * 8
    for schedule, grad in (("sliding", False), ("sliding", True), ("blocks", True)):
        assert memory(schedule, grad) < jacobians / 5, (schedule, grad)
