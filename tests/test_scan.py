import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import partime

from .helpers import all_methods, max_rel_error, tree_allclose


class GRU(eqx.Module):
    """A GRU cell with weights scaled so the recurrence contracts."""

    w: jax.Array
    u: jax.Array
    b: jax.Array

    def __init__(self, size, key, scale=0.6):
        k1, k2, k3 = jr.split(key, 3)
        self.w = scale * jr.normal(k1, (3, size, size)) / jnp.sqrt(size)
        self.u = jr.normal(k2, (3, size, size)) / jnp.sqrt(size)
        self.b = 0.1 * jr.normal(k3, (3, size))

    def __call__(self, h, x):
        z = jax.nn.sigmoid(self.w[0] @ h + self.u[0] @ x + self.b[0])
        r = jax.nn.sigmoid(self.w[1] @ h + self.u[1] @ x + self.b[1])
        n = jnp.tanh(self.w[2] @ (r * h) + self.u[2] @ x + self.b[2])
        h = (1 - z) * n + z * h
        return h, jnp.sum(h**2)


def _gru_problem(size, length, seed=0):
    key = jr.PRNGKey(seed)
    k1, k2, k3 = jr.split(key, 3)
    cell = GRU(size, k1)
    xs = jr.normal(k2, (length, size))
    init = 0.5 * jr.normal(k3, (size,))
    return cell, init, xs


def _loss(scan_fn, cell, init, xs):
    final, ys = scan_fn(cell, init, xs)
    return jnp.sum(ys) + jnp.sum(jnp.sin(final))


def _lax_scan(f, init, xs, **kwargs):
    # `jax.lax.scan` hashes its function; a Module holding arrays is not hashable.
    return jax.lax.scan(lambda c, x: f(c, x), init, xs, **kwargs)


def _partime_scan(method=partime.Newton()):
    return lambda f, init, xs, **kw: partime.scan(f, init, xs, method=method, **kw)


# Values of GRUs of several sizes, one compile per size, shared across tests.
@pytest.fixture(scope="module", params=[(2, 10_000), (8, 1000), (32, 300)])
def gru_case(request):
    size, length = request.param
    cell, init, xs = _gru_problem(size, length)
    expected = _lax_scan(cell, init, xs)
    final, ys, stats = jax.jit(
        lambda cell, init, xs: partime.scan(cell, init, xs, return_stats=True)
    )(cell, init, xs)
    return size, length, expected, (final, ys), stats


def test_gru_newton_matches_lax_scan(gru_case):
    size, length, expected, out, stats = gru_case
    assert max_rel_error(out, expected) < 1e-8
    # Contracting: must converge without the sequential fallback, in few iterations.
    assert not stats.fell_back
    assert int(stats.fallback_start) == length
    assert 1 <= int(stats.num_iterations) <= 10
    assert stats.result == partime.RESULTS.successful


@pytest.mark.parametrize("method", all_methods, ids=lambda m: type(m).__name__)
def test_every_method_same_answer(method):
    cell, init, xs = _gru_problem(4, 200, seed=1)
    expected = _lax_scan(cell, init, xs)
    final, ys, stats = partime.scan(cell, init, xs, method=method, return_stats=True)
    assert max_rel_error((final, ys), expected) < 1e-8
    assert stats.result == partime.RESULTS.successful


@pytest.mark.parametrize(
    "method",
    [partime.Newton(), partime.QuasiNewton(), partime.Jacobi()],
    ids=lambda m: type(m).__name__,
)
def test_converges_without_fallback(method):
    """A strongly contracting recurrence: every method but Picard (whose identity
    linearisation does not fit `tanh`) converges long before the cap."""
    cell, init, xs = _gru_problem(4, 500, seed=2)
    *_, stats = partime.scan(cell, init, xs, method=method, return_stats=True)
    assert not stats.fell_back
    assert int(stats.num_iterations) < 100


def test_damped_oscillator_euler():
    """Euler-discretised damped oscillator. Linear: Newton is exact after one
    iteration (plus one to confirm). Picard's error after k iterations is about
    (‖M‖t)^k/k!, so it is given a shorter horizon; the state decays below the default
    `atol`, so Picard (which converges linearly) is given tight tolerances."""
    dt, omega, zeta = 0.01, 2.0, 0.1

    def step(state, _):
        x, v = state
        a = -(omega**2) * x - 2 * zeta * omega * v
        new = jnp.stack([x + dt * v, v + dt * a])
        return new, new[0]

    init = jnp.array([1.0, 0.0])
    for method, length, max_iterations in (
        (partime.Newton(), 5000, 2),
        (partime.Picard(rtol=1e-13, atol=1e-13), 500, 100),
    ):
        expected = jax.lax.scan(step, init, length=length)
        final, ys, stats = partime.scan(
            step, init, length=length, method=method, return_stats=True
        )
        assert max_rel_error((final, ys), expected) < 1e-8
        assert not stats.fell_back
        assert int(stats.num_iterations) <= max_iterations


def test_newton_linear_recurrence_iterations():
    def step(state, x):
        new = 0.9 * state + x
        return new, new

    xs = jnp.linspace(0, 1, 100)[:, None]
    *_, stats = partime.scan(step, jnp.zeros(1), xs, return_stats=True)
    assert int(stats.num_iterations) == 2


def test_pytree_carry_xs_none_and_reverse():
    def step(carry, x):
        a, (b, c) = carry["a"], carry["bc"]
        a = jnp.tanh(0.5 * a + 0.3 * b + x["u"])
        b = 0.8 * b + 0.1 * jnp.sum(a)
        c = jnp.cos(c) * 0.5
        return {"a": a, "bc": (b, c)}, (a[0], c)

    init = {"a": jnp.ones(3), "bc": (jnp.array(0.5), jnp.zeros((2, 2)))}
    xs = {"u": jnp.linspace(-1, 1, 300)[:, None] * jnp.ones((1, 3))}
    for reverse in (False, True):
        expected = jax.lax.scan(step, init, xs, reverse=reverse)
        out = partime.scan(step, init, xs, reverse=reverse)
        assert tree_allclose(out, expected)

    def no_input(carry, _):
        return jax.tree.map(lambda c: 0.5 * jnp.sin(c), carry), None

    expected = jax.lax.scan(no_input, init, length=50)
    out = partime.scan(no_input, init, length=50)
    assert tree_allclose(out, expected)


# Gradients -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gradient_case():
    cell, init, xs = _gru_problem(4, 300, seed=3)
    args = (cell, init, xs)
    grad = jax.jit(jax.grad(lambda *a: _loss(_lax_scan, *a), argnums=(0, 1, 2)))
    expected = grad(*args)
    return args, expected


def test_gradients_inputs(gradient_case):
    args, expected = gradient_case
    grad = jax.jit(jax.grad(lambda *a: _loss(_partime_scan(), *a), argnums=(0, 1, 2)))
    got = grad(*args)
    assert max_rel_error(got, expected) < 1e-6
    # Not zero: a gradient that silently vanished would also "match" a zero.
    assert all(jnp.max(jnp.abs(g)) > 1e-6 for g in jax.tree.leaves(got))


def test_gradients_closed_over(gradient_case):
    """Parameters closed over by `f`, not passed in, must get their gradient."""
    (cell, init, xs), expected = gradient_case

    def loss(cell):
        def f(h, x):
            return cell(h, x)

        return _loss(_partime_scan(), f, init, xs)

    got = jax.jit(jax.grad(loss))(cell)
    assert max_rel_error(got, expected[0]) < 1e-6
    assert all(jnp.max(jnp.abs(g)) > 1e-6 for g in jax.tree.leaves(got))


def test_gradients_closed_over_mixed_with_ys():
    """A closed-over array used only in the outputs `y_t`, and one used only in the
    carry: both get exact gradients."""
    cell, init, xs = _gru_problem(3, 100, seed=4)
    readout = jnp.arange(3.0)

    def loss(scan_fn, cell, readout):
        def f(h, x):
            h, _ = cell(h, x)
            return h, jnp.dot(readout, h)

        final, ys = scan_fn(f, init, xs)
        return jnp.sum(ys**2) + jnp.sum(final)

    expected = jax.grad(lambda *a: loss(_lax_scan, *a), argnums=(0, 1))(cell, readout)
    got = jax.grad(lambda *a: loss(_partime_scan(), *a), argnums=(0, 1))(cell, readout)
    assert max_rel_error(got, expected) < 1e-6


def test_forward_mode(gradient_case):
    (cell, init, xs), _ = gradient_case
    tangents = jax.tree.map(jnp.ones_like, (cell, init, xs))
    _, expected = jax.jvp(lambda *a: _loss(_lax_scan, *a), (cell, init, xs), tangents)
    _, got = jax.jvp(lambda *a: _loss(_partime_scan(), *a), (cell, init, xs), tangents)
    assert jnp.allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("window", [None, 16], ids=["one-window", "windowed"])
def test_second_order(window):
    """Hessian-vector products (forward over reverse) and second reverse-mode
    gradients equal those through `lax.scan`: the derivative rule is itself
    differentiated, so it must see how the solution and its Jacobians move."""
    cell, init, xs = _gru_problem(3, 50, seed=6)
    scan_fn = lambda f, i, x: partime.scan(f, i, x, window=window)
    grad = lambda fn: jax.grad(lambda i, c: _loss(fn, c, i, xs), argnums=(0, 1))
    tangents = (jnp.ones_like(init), jax.tree.map(jnp.ones_like, cell))
    hvp = lambda fn: jax.jvp(grad(fn), (init, cell), tangents)[1]
    expected, got = hvp(_lax_scan), hvp(scan_fn)
    assert max_rel_error(got, expected) < 1e-6
    assert all(jnp.max(jnp.abs(g)) > 1e-6 for g in jax.tree.leaves(got))
    # Reverse over reverse, of a scalar function of the gradient.
    square = lambda fn: jax.grad(lambda i: jnp.sum(grad(fn)(i, cell)[0] ** 2))(init)
    assert max_rel_error(square(scan_fn), square(_lax_scan)) < 1e-6


@pytest.mark.parametrize("method", all_methods[1:], ids=lambda m: type(m).__name__)
def test_gradients_other_methods(method):
    cell, init, xs = _gru_problem(3, 60, seed=5)
    expected = jax.grad(lambda c: _loss(_lax_scan, c, init, xs))(cell)
    got = jax.grad(lambda c: _loss(_partime_scan(method), c, init, xs))(cell)
    assert max_rel_error(got, expected) < 1e-6


def test_vmap_batch():
    cell, _, xs = _gru_problem(4, 200, seed=6)
    inits = jr.normal(jr.PRNGKey(0), (5, 4))
    batched_xs = jnp.stack([xs * (i + 1) / 5 for i in range(5)])

    def run(scan_fn, init, xs):
        return scan_fn(cell, init, xs)

    expected = jax.vmap(lambda i, x: run(_lax_scan, i, x))(inits, batched_xs)
    got = jax.jit(jax.vmap(lambda i, x: run(_partime_scan(), i, x)))(inits, batched_xs)
    assert max_rel_error(got, expected) < 1e-8
    grads = jax.vmap(jax.grad(lambda i: _loss(_partime_scan(), cell, i, xs)))(inits)
    expected_grads = jax.vmap(jax.grad(lambda i: _loss(_lax_scan, cell, i, xs)))(inits)
    assert max_rel_error(grads, expected_grads) < 1e-6


# Failure modes --------------------------------------------------------------------


def _expanding(state, x):
    """A chaotic map (the logistic map at r = 3.9, lifted to R^2): Newton from a flat
    guess needs ~T iterations."""
    new = 3.9 * state * (1 - state) + 0.0 * x
    return new, new


def test_expanding_map_falls_back_exactly():
    init = jnp.array([0.2, 0.3])
    xs = jnp.zeros((400, 1))
    expected = jax.lax.scan(_expanding, init, xs)
    final, ys, stats = partime.scan(
        _expanding, init, xs, method=partime.Newton(max_iters=10), return_stats=True
    )
    assert stats.fell_back
    assert stats.result == partime.RESULTS.successful
    assert jnp.all(jnp.isfinite(ys))
    # Chaotic: only the exact sequential completion reproduces lax.scan.
    assert jnp.allclose(ys, expected[1], rtol=1e-8, atol=1e-10)
    assert int(stats.fallback_start) < 400


def test_no_fallback_fails_loudly():
    init = jnp.array([0.2, 0.3])
    xs = jnp.zeros((400, 1))
    method = partime.Newton(max_iters=5, fallback=False)
    with pytest.raises(Exception, match="did not converge|diverged"):
        partime.scan(_expanding, init, xs, method=method)
    _, _, stats = partime.scan(
        _expanding, init, xs, method=method, throw=False, return_stats=True
    )
    assert stats.result != partime.RESULTS.successful


def test_divergence_is_not_success():
    """Newton on an explosive recurrence produces inf/NaN iterates: detected, and the
    fallback computes the exact (finite) answer."""

    def step(state, _):
        new = jnp.exp(state) - 1.5
        return new, new

    init = jnp.array([0.1])
    expected = jax.lax.scan(step, init, length=40)
    final, ys, stats = partime.scan(step, init, length=40, return_stats=True)
    assert stats.result == partime.RESULTS.successful
    assert jnp.allclose(ys, expected[1], rtol=1e-8)


def test_nan_init():
    cell, init, xs = _gru_problem(2, 20)
    bad = init.at[0].set(jnp.nan)
    with pytest.raises(Exception, match="initial state"):
        partime.scan(cell, bad, xs)
    *_, stats = partime.scan(cell, bad, xs, throw=False, return_stats=True)
    assert stats.result == partime.RESULTS.nonfinite_input


def test_bad_input():
    def counter(carry, x):
        return carry + 1, x

    with pytest.raises(TypeError, match="floating-point"):
        partime.scan(counter, jnp.array(0), jnp.zeros(3))
    with pytest.raises(TypeError, match="same structure"):
        partime.scan(lambda c, x: ((c, c), x), jnp.zeros(2), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="length"):
        partime.scan(lambda c, x: (c, x), jnp.zeros(2))
    with pytest.raises(TypeError, match="partime method"):
        partime.scan(lambda c, x: (c, x), jnp.zeros(2), jnp.zeros((3, 1)), method=1)
    with pytest.raises(ValueError, match="max_iters"):
        partime.Newton(max_iters=-1)


def test_warm_start_guess():
    cell, init, xs = _gru_problem(4, 500, seed=7)
    expected = _lax_scan(cell, init, xs)
    carries = _lax_scan(lambda h, x: (cell(h, x)[0],) * 2, init, xs)[1]
    *out, stats = partime.scan(cell, init, xs, guess=carries, return_stats=True)
    assert max_rel_error(out, expected) < 1e-8
    assert int(stats.num_iterations) == 1


def test_quasi_newton_memory_is_linear_in_d():
    """QuasiNewton never forms the T·d² Jacobians (5.2 GB here): its memory is a
    small multiple of Picard's, which forms no Jacobians at all."""
    length, size = 10_000, 256
    cell = GRU(size, jr.PRNGKey(0))
    init = jax.ShapeDtypeStruct((size,), jnp.float64)
    xs = jax.ShapeDtypeStruct((length, size), jnp.float64)

    def memory(method):
        fn = jax.jit(lambda i, x: partime.scan(cell, i, x, method=method))
        analysis = fn.lower(init, xs).compile().memory_analysis()
        if analysis is None:
            pytest.skip("memory_analysis() is not available on this backend")
        return analysis.temp_size_in_bytes + analysis.output_size_in_bytes

    quasi_newton = memory(partime.QuasiNewton())
    dense_jacobians = length * size * size * 8
    assert quasi_newton < 0.1 * dense_jacobians
    assert quasi_newton < 3 * memory(partime.Picard())


def test_fallback_under_vmap():
    """Batch members fall back from different prefixes (one not at all); the batched
    fallback (one counter from the earliest start, masked rows) is exact for each."""

    def step(state, x):
        new = x[0] * state * (1 - state)
        return new, new

    inits = jnp.array([[0.2], [0.3], [0.55]])
    rates = jnp.array([3.9, 3.7, 2.5])  # chaotic, chaotic, contracting
    xs = jnp.broadcast_to(rates[:, None, None], (3, 300, 1))
    expected = jax.vmap(lambda i, x: jax.lax.scan(step, i, x))(inits, xs)
    method = partime.Newton(max_iters=8)
    final, ys, stats = jax.vmap(
        lambda i, x: partime.scan(step, i, x, method=method, return_stats=True)
    )(inits, xs)
    assert tree_allclose((final, ys), expected)
    assert bool(stats.fell_back[0]) and bool(stats.fell_back[1])
    assert not bool(stats.fell_back[2])
