"""partime.scan in float32, with x64 switched off (with x64 on, jnp silently
promotes to float64)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import partime

from .helpers import max_rel_error


@pytest.fixture(scope="module", autouse=True)
def float32_only():
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", True)


def _problem(size=4, length=1000):
    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    w = 0.6 * jr.normal(k1, (size, size)) / jnp.sqrt(size)
    u = jr.normal(k2, (size, size)) / jnp.sqrt(size)
    xs = jr.normal(k3, (length, size))

    def cell(params, h, x):
        w, u = params
        h = jnp.tanh(w @ h + u @ x)
        return h, jnp.sum(h)

    return cell, (w, u), jnp.zeros(size), xs


@pytest.mark.parametrize(
    "method",
    [partime.Newton(), partime.QuasiNewton(), partime.Picard(), partime.Jacobi()],
    ids=lambda m: type(m).__name__,
)
def test_float32_values(method):
    cell, params, init, xs = _problem()
    assert xs.dtype == jnp.float32

    def f(h, x):
        return cell(params, h, x)

    expected = jax.lax.scan(f, init, xs)
    final, ys, stats = partime.scan(f, init, xs, method=method, return_stats=True)
    assert final.dtype == jnp.float32 and ys.dtype == jnp.float32
    assert max_rel_error((final, ys), expected) < 1e-4
    if not isinstance(method, partime.Picard):
        assert not stats.fell_back


def test_float32_gradients():
    cell, params, init, xs = _problem(length=300)

    def loss(scan_fn, params):
        final, ys = scan_fn(lambda h, x: cell(params, h, x), init, xs)
        return jnp.sum(ys) + jnp.sum(final)

    expected = jax.grad(lambda p: loss(jax.lax.scan, p))(params)
    got = jax.grad(lambda p: loss(partime.scan, p))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got))
    assert max_rel_error(got, expected) < 1e-4
