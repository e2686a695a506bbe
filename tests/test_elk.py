"""ELK and QuasiELK: the Levenberg–Marquardt step as a parallel Kalman smoother, and
the damped methods in `partime.scan`."""

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import partime
from partime._kalman import damped_solve

from .helpers import max_rel_error


T, D = 24, 3


def _transitions(key, scale):
    k1, k2 = jr.split(key)
    return {
        "dense": partime.DenseTransition(scale * jr.normal(k1, (T, D, D)) / D**0.5),
        "diagonal": partime.DiagonalTransition(
            scale * jr.uniform(k2, (T, D), minval=-1.0, maxval=1.0)
        ),
        "identity": partime.IdentityTransition(T, D, jnp.float64),
        "zero": partime.ZeroTransition(T, D, jnp.float64),
    }


def _dense_lm_step(transition, residual, damping):
    """`-(JᵀJ + λI)^{-1} Jᵀ r` with the (T d)×(T d) Jacobian materialised."""
    jac = partime.BidiagonalOperator(transition).as_matrix()
    lhs = jac.T @ jac + damping * jnp.eye(T * D)
    return -jnp.linalg.solve(lhs, jac.T @ residual.reshape(-1)).reshape(T, D)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "identity", "zero"])
@pytest.mark.parametrize("scale", [0.5, 1.5], ids=["stable", "unstable"])
@pytest.mark.parametrize("damping", [1e-3, 1.0, 100.0])
def test_kalman_step_is_the_levenberg_marquardt_step(getkey, structure, scale, damping):
    transition = _transitions(getkey(), scale)[structure]
    residual = jr.normal(getkey(), (T, D))
    expected = _dense_lm_step(transition, residual, damping)
    step = jax.jit(damped_solve)(transition, residual, damping)
    assert max_rel_error(step, expected) < 1e-10


def test_smoothed_not_filtered(getkey):
    """The LM step at `t` depends on the residuals after `t` (the smoothed mean; a
    filter would ignore them)."""
    transition = _transitions(getkey(), 0.9)["dense"]
    residual = jr.normal(getkey(), (T, D))
    later = residual.at[T // 2 :].add(1.0)
    solve = jax.jit(damped_solve)
    first = solve(transition, residual, 1.0)
    second = solve(transition, later, 1.0)
    assert jnp.max(jnp.abs(first[: T // 2] - second[: T // 2])) > 1e-3


def test_small_damping_is_newton(getkey):
    transition = _transitions(getkey(), 0.8)["dense"]
    residual = jr.normal(getkey(), (T, D))
    newton = transition.solve(-residual)
    step = jax.jit(damped_solve)(transition, residual, 1e-12)
    assert max_rel_error(step, newton) < 1e-9


def test_odd_lengths_and_one_step(getkey):
    """Odd lengths at some level of the cyclic reduction, and a single step."""
    for length in (1, 2, 7):
        a = partime.DenseTransition(0.7 * jr.normal(getkey(), (length, D, D)))
        r = jr.normal(getkey(), (length, D))
        jac = partime.BidiagonalOperator(a).as_matrix()
        lhs = jac.T @ jac + 0.5 * jnp.eye(length * D)
        expected = -jnp.linalg.solve(lhs, jac.T @ r.reshape(-1)).reshape(length, D)
        assert max_rel_error(damped_solve(a, r, 0.5), expected) < 1e-10


def _rnn(key, size, length, gain, input_scale=1.0):
    k1, k2, k3 = jr.split(key, 3)
    weights = jr.normal(k1, (size, size)) / size**0.5
    weights = gain * weights / jnp.max(jnp.abs(jnp.linalg.eigvals(weights)))
    inputs = jr.normal(k2, (size, 2))
    xs = input_scale * jr.normal(k3, (length, 2))

    def cell(h, x):
        h = jnp.tanh(weights @ h + inputs @ x)
        return h, h[0]

    return cell, jnp.zeros(size), xs


@pytest.fixture(scope="module")
def contracting_rnn():
    return _rnn(jr.PRNGKey(0), 6, 400, 0.8)


@pytest.mark.parametrize(
    "method", [partime.ELK(), partime.QuasiELK()], ids=["ELK", "QuasiELK"]
)
def test_converges_without_fallback(contracting_rnn, method):
    cell, init, xs = contracting_rnn
    expected = jax.lax.scan(cell, init, xs)
    *out, stats = partime.scan(cell, init, xs, method=method, return_stats=True)
    assert max_rel_error(out, expected) < 1e-8
    assert not stats.fell_back
    bound = 10 if isinstance(method, partime.ELK) else 45
    assert int(stats.num_iterations) <= bound


def test_unstable_jacobians_stay_finite():
    """Spectral radius 3 at the constant guess: undamped Newton's first update grows
    like 3^t. ELK's damped steps never increase the merit, so without a fallback the
    iterate stays finite; with it, the answer is exact."""
    cell, init, xs = _rnn(jr.PRNGKey(1), 6, 300, 3.0, input_scale=0.3)
    expected = jax.lax.scan(cell, init, xs)
    for method in (
        partime.ELK(max_iters=10, fallback=False),
        partime.QuasiELK(max_iters=10),
    ):
        *out, stats = partime.scan(
            cell, init, xs, method=method, return_stats=True, throw=False
        )
        assert all(bool(jnp.all(jnp.isfinite(o))) for o in out)
        if method.fallback:
            assert max_rel_error(out, expected) < 1e-8


def test_gradients(contracting_rnn):
    cell, init, xs = contracting_rnn

    def loss(scan, xs, **kwargs):
        _, ys = scan(cell, init, xs, **kwargs)
        return jnp.sum(ys**2)

    expected = jax.grad(lambda x: loss(jax.lax.scan, x))(xs)
    got = jax.grad(lambda x: loss(partime.scan, x, method=partime.ELK()))(xs)
    assert max_rel_error(got, expected) < 1e-7


def test_vmap(contracting_rnn):
    cell, init, xs = contracting_rnn
    inits = jnp.stack([init, init + 0.5, init - 0.5])
    expected = jax.vmap(lambda i: jax.lax.scan(cell, i, xs))(inits)
    got = jax.vmap(lambda i: partime.scan(cell, i, xs, method=partime.QuasiELK()))(
        inits
    )
    assert max_rel_error(got, expected) < 1e-8


def test_bad_damping():
    with pytest.raises(ValueError, match="damping"):
        partime.ELK(damping=0.0)
    with pytest.raises(ValueError, match="damping"):
        partime.QuasiELK(damping=-1.0)
    with pytest.raises(ValueError, match="max_iters"):
        partime.ELK(max_iters=-1)


def _counting_cell(key, size, gain):
    """A tanh RNN cell whose derivative counts its evaluations: the list grows by
    one at every (vectorised) linearisation of the steps."""
    k1, k2 = jr.split(key)
    weights = jr.normal(k1, (size, size)) / size**0.5
    weights = gain * weights / jnp.max(jnp.abs(jnp.linalg.eigvals(weights)))
    inputs = jr.normal(k2, (size, 2))
    calls = []

    @jax.custom_jvp
    def tanh(z):
        return jnp.tanh(z)

    @tanh.defjvp
    def _(primals, tangents):
        (z,), (dz,) = primals, tangents
        jax.debug.callback(lambda: calls.append(None))
        y = jnp.tanh(z)
        return y, (1 - y**2) * dz

    def cell(h, x):
        h = tanh(weights @ h + inputs @ x)
        return h, h[0]

    return cell, calls


def test_quasi_elk_refresh():
    """Whatever `refresh`, QuasiELK converges to `jax.lax.scan`'s answer (the
    default's gradient: `test_gradients.py`). `"auto"` recomputes the diagonal fewer
    times than `True` (every accepted iteration) and more than `False` (never), and
    here that pays: within 2 iterations of `True`, fewer than `False`. An RNN with
    unstable Jacobians at the constant guess (gain 1.5)."""
    cell, calls = _counting_cell(jr.PRNGKey(2), 4, 1.5)
    init, xs = jnp.zeros(4), jr.normal(jr.PRNGKey(3), (60, 2))
    expected = jax.lax.scan(cell, init, xs)
    linearisations, iterations = {}, {}
    for refresh in (True, "auto", False):
        method = partime.QuasiELK(refresh=refresh, fallback=False)
        calls.clear()
        *out, stats = jax.block_until_ready(
            partime.scan(cell, init, xs, method=method, return_stats=True)
        )
        linearisations[refresh] = len(calls)
        iterations[refresh] = int(stats.num_iterations)
        assert max_rel_error(out, expected) < 1e-8
    assert linearisations[False] == 1
    assert 1 < linearisations["auto"] < linearisations[True]
    assert iterations["auto"] <= iterations[True] + 2
    assert iterations["auto"] < iterations[False]

