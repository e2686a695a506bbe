import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import pytest

import partime


T, D = 12, 3


@pytest.fixture
def operators(getkey):
    matrices = 0.7 * jr.normal(getkey(), (T, D, D)) / jnp.sqrt(D)
    blocks = jnp.eye(D)[None] + 0.3 * jr.normal(getkey(), (T, D, D))
    transition = partime.DenseTransition(matrices)
    return {
        "unit": partime.BidiagonalOperator(transition),
        "blocks": partime.BidiagonalOperator(transition, blocks),
        "diagonal": partime.BidiagonalOperator(
            partime.DiagonalTransition(jr.normal(getkey(), (T, D)))
        ),
    }


@pytest.mark.parametrize("name", ["unit", "blocks", "diagonal"])
def test_matrix_structure(operators, name):
    operator = operators[name]
    matrix = operator.as_matrix()
    assert matrix.shape == (T * D, T * D)
    # Block lower-bidiagonal: nothing above the diagonal blocks, nothing below the
    # first sub-diagonal block.
    blocks = matrix.reshape(T, D, T, D)
    for i in range(T):
        for j in range(T):
            if j > i or j < i - 1:
                assert jnp.all(blocks[i, :, j, :] == 0)
    assert jnp.allclose(operator.T.as_matrix(), matrix.T)


@pytest.mark.parametrize("name", ["unit", "blocks", "diagonal"])
@pytest.mark.parametrize("transpose", [False, True])
def test_linear_solve(getkey, operators, name, transpose):
    operator = operators[name]
    if transpose:
        operator = operator.T
    b = jr.normal(getkey(), (T, D))
    x = lx.linear_solve(operator, b, partime.ScanSolver()).value
    expected = jnp.linalg.solve(operator.as_matrix(), b.reshape(-1)).reshape(T, D)
    assert jnp.allclose(x, expected, rtol=1e-10, atol=1e-10)
    assert jnp.allclose(operator.mv(x), b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["unit", "blocks"])
def test_linear_solve_gradients(getkey, operators, name):
    """Reverse mode through `lineax.linear_solve` uses the solver's transpose."""
    operator = operators[name]
    b = jr.normal(getkey(), (T, D))
    c = jr.normal(getkey(), (T, D))

    def scan_loss(b):
        return jnp.vdot(lx.linear_solve(operator, b, partime.ScanSolver()).value, c)

    def dense_loss(b):
        x = jnp.linalg.solve(operator.as_matrix(), b.reshape(-1))
        return jnp.vdot(x, c.reshape(-1))

    assert jnp.allclose(jax.grad(scan_loss)(b), jax.grad(dense_loss)(b), rtol=1e-10)
    _, t_scan = jax.jvp(scan_loss, (b,), (c,))
    _, t_dense = jax.jvp(dense_loss, (b,), (c,))
    assert jnp.allclose(t_scan, t_dense, rtol=1e-10)


def test_structure_queries(operators):
    unit = operators["unit"]
    assert lx.is_lower_triangular(unit) and not lx.is_upper_triangular(unit)
    assert lx.is_upper_triangular(unit.T)
    assert lx.has_unit_diagonal(unit)
    assert not lx.has_unit_diagonal(operators["blocks"])
    assert not lx.is_symmetric(unit)
    assert jnp.allclose(lx.diagonal(unit), 1.0)
    assert lx.materialise(unit) is unit


def test_wrong_operator():
    with pytest.raises(ValueError, match="BidiagonalOperator"):
        lx.linear_solve(
            lx.MatrixLinearOperator(jnp.eye(2)), jnp.ones(2), partime.ScanSolver()
        )
