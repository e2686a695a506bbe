"""The implicit derivative of `partime.scan` for every method: equal to `jax.lax.scan`'s
(reverse and forward mode, first and second order, float64 and float32), exact when
the matrix-free iteration hits its cap, and `O(T d)` in memory for the methods
without dense Jacobians (`partime._matrix_free`)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import pytest

import partime
from partime._lds import DenseTransition
from partime._matrix_free import PreconditionedScanSolver, StepOperator
from partime._operator import BidiagonalOperator

from .helpers import every_method, max_rel_error


matrix_free_methods = (
    partime.QuasiNewton(),
    partime.Picard(),
    partime.Jacobi(),
    partime.QuasiELK(),
)
_name = lambda m: type(m).__name__


def _problem(dtype, size=4, length=80, seed=0):
    """A contracting tanh RNN: `(params, init, xs)` in `dtype`."""
    k1, k2, k3, k4 = jr.split(jr.PRNGKey(seed), 4)
    w = (0.8 * jr.normal(k1, (size, size)) / jnp.sqrt(size)).astype(dtype)
    u = (jr.normal(k2, (size, size)) / jnp.sqrt(size)).astype(dtype)
    xs = jr.normal(k3, (length, size)).astype(dtype)
    init = (0.5 * jr.normal(k4, (size,))).astype(dtype)
    return (w, u), init, xs


def _cell(params, h, x):
    w, u = params
    h = jnp.tanh(w @ h + u @ x)
    return h, h**2


def _loss(scan_fn, params, init, xs):
    final, ys = scan_fn(lambda h, x: _cell(params, h, x), init, xs)
    return jnp.sum(ys) + jnp.sum(jnp.sin(final))


def _partime(method):
    return lambda f, init, xs: partime.scan(f, init, xs, method=method)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("method", every_method, ids=_name)
def test_reverse_mode(method, dtype):
    params, init, xs = _problem(dtype)
    grad = lambda fn: jax.grad(_loss, argnums=(1, 2, 3))(fn, params, init, xs)
    expected, got = grad(jax.lax.scan), grad(_partime(method))
    assert all(g.dtype == dtype for g in jax.tree.leaves(got))
    assert max_rel_error(got, expected) < (1e-8 if dtype == jnp.float64 else 1e-4)


@pytest.mark.parametrize("method", matrix_free_methods, ids=_name)
def test_forward_mode(method):
    params, init, xs = _problem(jnp.float64)
    primals = (params, init, xs)
    tangents = jax.tree.map(jnp.ones_like, primals)
    jvp = lambda fn: jax.jvp(lambda *a: _loss(fn, *a), primals, tangents)[1]
    assert max_rel_error(jvp(_partime(method)), jvp(jax.lax.scan)) < 1e-8


@pytest.mark.parametrize("method", (*matrix_free_methods[:3], partime.ELK()), ids=_name)
def test_second_order(method):
    """Forward over reverse and reverse over reverse: the matrix-free solve (the
    dense one for ELK) is differentiated again (through
    `jax.lax.custom_linear_solve`)."""
    params, init, xs = _problem(jnp.float64, length=40, seed=1)
    grad = lambda fn: jax.grad(lambda i, p: _loss(fn, p, i, xs), argnums=(0, 1))
    tangents = (jnp.ones_like(init), jax.tree.map(jnp.ones_like, params))
    hvp = lambda fn: jax.jvp(grad(fn), (init, params), tangents)[1]
    expected, got = hvp(jax.lax.scan), hvp(_partime(method))
    assert max_rel_error(got, expected) < 1e-7
    square = lambda fn: jax.grad(lambda i: jnp.sum(grad(fn)(i, params)[0] ** 2))(init)
    assert max_rel_error(square(_partime(method)), square(jax.lax.scan)) < 1e-7


def _operators(length=30, size=3):
    params, init, xs = _problem(jnp.float64, size=size, length=length, seed=2)
    step = lambda h, x: _cell(params, h, x)[0]
    prev = jr.normal(jr.PRNGKey(3), (length, size))
    dense = BidiagonalOperator(DenseTransition(jax.vmap(jax.jacfwd(step))(prev, xs)))
    return StepOperator(step, prev, xs), dense


@pytest.mark.parametrize("transposed", [False, True])
def test_step_operator(transposed):
    """`StepOperator` (JVPs/VJPs) is the dense bidiagonal operator, and the
    preconditioned solver solves it — exactly, by the sequential pass, when the
    iteration cap (here 2 Jacobi iterations for 30 steps) stops it early."""
    operator, dense = _operators()
    if transposed:
        operator, dense = operator.transpose(), dense.transpose()
    assert max_rel_error(operator.as_matrix(), dense.as_matrix()) < 1e-14
    b = jr.normal(jr.PRNGKey(4), operator.prev.shape)
    expected = jnp.linalg.solve(dense.as_matrix(), b.reshape(-1)).reshape(b.shape)
    for method in (partime.Jacobi(max_iters=2), partime.Jacobi(), partime.Picard()):
        got = lx.linear_solve(operator, b, PreconditionedScanSolver(method)).value
        # To `rtol` = 1e-10 in the residual (or exactly), amplified by `L⁻¹`.
        assert max_rel_error(got, expected) < 1e-8


def test_sequential_finish_gradient():
    """Gradients stay exact when the linear iteration is capped far below `T`."""
    params, init, xs = _problem(jnp.float64, length=60, seed=5)
    grad = lambda fn: jax.grad(_loss, argnums=(1, 2))(fn, params, init, xs)
    got = grad(_partime(partime.Jacobi(max_iters=3)))
    assert max_rel_error(got, grad(jax.lax.scan)) < 1e-12


def _gradient_temp_bytes(scan_fn, size, length):
    params, init, xs = _problem(jnp.float32, size=size, length=length)
    grad = jax.jit(jax.grad(lambda p: _loss(scan_fn, p, init, xs)))
    return grad.lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "method",
    [partime.QuasiNewton(jacobian_batch_size=4), partime.Picard(), partime.Jacobi()],
    ids=_name,
)
def test_gradient_memory(method):
    """The gradient's temporaries no longer hold `T` Jacobians of `d × d` (the dense
    rule needed several such stacks): at `d = 64`, under half of one stack. The
    QuasiNewton diagonal is probed 4 basis vectors at a time (its forward cost)."""
    size, length = 64, 256
    stack = length * size**2 * jnp.dtype(jnp.float32).itemsize
    temp = _gradient_temp_bytes(_partime(method), size, length)
    assert temp < 0.5 * stack
    assert _gradient_temp_bytes(_partime(partime.Newton()), size, length) > stack


def test_vmap():
    """A batch of gradients, some of whose linear solves converge and some of which
    finish sequentially (Jacobi capped at 3 iterations on the longer inputs)."""
    params, init, xs = _problem(jnp.float64, length=50, seed=6)
    batch = jnp.stack([0.1 * xs, xs, 3 * xs])
    grad = lambda fn: jax.vmap(
        lambda x: jax.grad(_loss, argnums=(1, 2))(fn, params, init, x)
    )(batch)
    for method in (partime.QuasiNewton(), partime.Jacobi(max_iters=3)):
        assert max_rel_error(grad(_partime(method)), grad(jax.lax.scan)) < 1e-8
