import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import partime


T, D = 64, 6


def _transitions(key, scale):
    """One of each structure, with spectral radius about `scale`."""
    k1, k2, k3 = jr.split(key, 3)
    dense = scale * jr.normal(k1, (T, D, D)) / jnp.sqrt(D)
    diagonal = scale * jr.uniform(k2, (T, D), minval=-1.0, maxval=1.0)
    blocks = scale * jr.normal(k3, (T, D // 3, 3, 3)) / jnp.sqrt(3)
    return {
        "dense": partime.DenseTransition(dense),
        "block": partime.BlockDiagonalTransition(blocks),
        "diagonal": partime.DiagonalTransition(diagonal),
        "identity": partime.IdentityTransition(T, D, jnp.float64),
        "zero": partime.ZeroTransition(T, D, jnp.float64),
    }


@pytest.mark.parametrize(
    "structure", ["dense", "block", "diagonal", "identity", "zero"]
)
@pytest.mark.parametrize("scale", [0.5, 1.2], ids=["stable", "unstable"])
@pytest.mark.parametrize("reverse", [False, True])
def test_solve_matches_sequential(getkey, structure, scale, reverse):
    transition = _transitions(getkey(), scale)[structure]
    b = jr.normal(getkey(), (T, D))
    parallel = transition.solve(b, reverse=reverse)
    sequential = partime.sequential_solve(transition, b, reverse=reverse)
    scale_ = jnp.max(jnp.abs(sequential))
    assert jnp.max(jnp.abs(parallel - sequential)) <= 1e-11 * scale_
    assert parallel.dtype == b.dtype


@pytest.mark.parametrize("structure", ["dense", "block", "diagonal", "identity"])
def test_reverse_is_transpose(getkey, structure):
    """<L^{-1} b, c> == <b, L^{-T} c>: the reverse scan is the transpose."""
    transition = _transitions(getkey(), 0.9)[structure]
    b = jr.normal(getkey(), (T, D))
    c = jr.normal(getkey(), (T, D))
    lhs = jnp.vdot(transition.solve(b), c)
    rhs = jnp.vdot(b, transition.solve(c, reverse=True))
    assert jnp.allclose(lhs, rhs, rtol=1e-12)


def test_dense_recurrence_definition(getkey):
    """Check the forward solve against the recurrence written out by hand."""
    transition = _transitions(getkey(), 0.8)["dense"]
    b = jr.normal(getkey(), (T, D))
    x = transition.solve(b)
    assert jnp.allclose(x[0], b[0])
    expected = jnp.einsum("tij,tj->ti", transition.matrices[1:], x[:-1]) + b[1:]
    assert jnp.allclose(x[1:], expected, rtol=1e-12, atol=1e-12)


def test_as_dense(getkey):
    transitions = _transitions(getkey(), 0.5)
    x = jr.normal(getkey(), (T, D))
    for transition in transitions.values():
        dense = transition.as_dense()
        assert dense.shape == (T, D, D)
        assert jnp.allclose(transition.apply(x), jnp.einsum("tij,tj->ti", dense, x))
        assert jnp.allclose(
            transition.apply_transpose(x), jnp.einsum("tji,tj->ti", dense, x)
        )


def test_jit_and_vmap(getkey):
    matrices = 0.5 * jr.normal(getkey(), (3, T, D, D)) / jnp.sqrt(D)
    b = jr.normal(getkey(), (3, T, D))

    @jax.jit
    @jax.vmap
    def solve(a, b):
        return partime.DenseTransition(a).solve(b)

    out = solve(matrices, b)
    for i in range(3):
        expected = partime.sequential_solve(partime.DenseTransition(matrices[i]), b[i])
        assert jnp.allclose(out[i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "identity", "zero"])
def test_log_growth(getkey, structure):
    """`log max|(A_T ⋯ A_1)_ij|`, against the product formed directly (`T = 64` and
    `T = 37`: the pairwise tree pads odd levels); `-inf` for a zero product."""
    transition = _transitions(getkey(), 1.1)[structure]
    for length in (T, 37):
        part = jax.tree.map(lambda a: a[:length], transition)
        if structure in ("identity", "zero"):
            part = type(transition)(length, D, jnp.float64)
        product = jnp.eye(D)
        for a in part.as_dense():
            product = a @ product
        expected = jnp.log(jnp.max(jnp.abs(product)))
        growth = jax.jit(lambda p: p.log_growth())(part)
        if structure == "zero":
            assert growth == -jnp.inf and expected == -jnp.inf
        else:
            assert jnp.allclose(growth, expected, rtol=1e-10, atol=1e-12)


def test_log_growth_does_not_overflow():
    # 2·I over 5000 steps: the product's entries (2^5000) overflow float64.
    matrices = jnp.broadcast_to(2 * jnp.eye(3), (5000, 3, 3))
    growth = partime.DenseTransition(matrices).log_growth()
    assert jnp.allclose(growth, 5000 * jnp.log(2.0), rtol=1e-12)
