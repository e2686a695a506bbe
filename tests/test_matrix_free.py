"""The matrix-free derivative solve in float32: as accurate as `lax.scan`'s own
gradient, measured against a float64 gradient on the same float32 parameters."""

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import partime

from .helpers import max_rel_error


_SIZE, _LENGTH = 32, 512


def _gru(params, h, x):
    wz, wr, wn = params
    z = jax.nn.sigmoid(wz[0] @ h + wz[1] @ x)
    r = jax.nn.sigmoid(wr[0] @ h + wr[1] @ x)
    n = jnp.tanh(wn[0] @ (r * h) + wn[1] @ x)
    h = (1 - z) * h + z * n
    return h, h


def _error(float32, float64):
    """Relative error of a float32 gradient against the float64 one."""
    widened = jax.tree.map(lambda a: a.astype(jnp.float64), float32)
    return max_rel_error(widened, float64)


def _loss(scan_fn, params, init, xs, weights):
    final, ys = scan_fn(lambda h, x: _gru(params, h, x), init, xs)
    return jnp.sum(ys * weights) + jnp.sum(final)


@pytest.fixture(scope="module")
def problem():
    """Float32 GRU data; the float64 gradient and `lax.scan`'s float32 error."""
    keys = jr.split(jr.PRNGKey(0), 5)
    scale = 1 / jnp.sqrt(jnp.float32(_SIZE))
    params = tuple(
        scale * jr.normal(k, (2, _SIZE, _SIZE), jnp.float32) for k in keys[:3]
    )
    xs = jr.normal(keys[3], (_LENGTH, _SIZE), jnp.float32)
    weights = jr.normal(keys[4], (_LENGTH, _SIZE), jnp.float32)
    data = (jnp.zeros(_SIZE, jnp.float32), xs, weights)
    to64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
    truth = jax.grad(lambda p: _loss(jax.lax.scan, p, *to64(data)))(to64(params))
    lax = jax.grad(lambda p: _loss(jax.lax.scan, p, *data))(params)
    return params, data, truth, _error(lax, truth)


@pytest.mark.parametrize(
    "method",
    [
        partime.QuasiNewton(),
        partime.Newton(jacobian=partime.BlockDiagonal(4)),
    ],
    ids=["QuasiNewton", "Newton-block4"],
)
def test_float32_gradient_as_accurate_as_lax_scan(problem, method):
    params, data, truth, lax_error = problem
    scan_fn = lambda f, init, xs: partime.scan(f, init, xs, method=method)
    got = jax.jit(jax.grad(lambda p: _loss(scan_fn, p, *data)))(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(got))
    assert 0 < lax_error < 1e-5
    # Converged at the forward's 100 ulps, the solve was ~6x further from the truth.
    assert _error(got, truth) < 2.5 * lax_error
