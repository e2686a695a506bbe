import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import partime
from partime._lds import scan_kind


T, D = 64, 6


@pytest.fixture(params=["sequential", "associative"])
def kind(request):
    """Both kinds of scan, whatever the platform (the default picks by it)."""
    with scan_kind(request.param):
        yield request.param


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
def test_solve_matches_sequential(getkey, kind, structure, scale, reverse):
    transition = _transitions(getkey(), scale)[structure]
    b = jr.normal(getkey(), (T, D))
    parallel = transition.solve(b, reverse=reverse)
    sequential = partime.sequential_solve(transition, b, reverse=reverse)
    scale_ = jnp.max(jnp.abs(sequential))
    assert jnp.max(jnp.abs(parallel - sequential)) <= 1e-11 * scale_
    assert parallel.dtype == b.dtype


@pytest.mark.parametrize("structure", ["dense", "block", "diagonal", "identity"])
def test_reverse_is_transpose(getkey, kind, structure):
    """<L^{-1} b, c> == <b, L^{-T} c>: the reverse scan is the transpose."""
    transition = _transitions(getkey(), 0.9)[structure]
    b = jr.normal(getkey(), (T, D))
    c = jr.normal(getkey(), (T, D))
    lhs = jnp.vdot(transition.solve(b), c)
    rhs = jnp.vdot(b, transition.solve(c, reverse=True))
    assert jnp.allclose(lhs, rhs, rtol=1e-12)


def test_dense_recurrence_definition(getkey, kind):
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


def test_jit_and_vmap(getkey, kind):
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


@pytest.mark.parametrize(
    "structure", ["dense", "block", "diagonal", "identity", "zero"]
)
def test_log_growth(getkey, kind, structure):
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


def test_log_growth_does_not_overflow(kind):
    # 2·I over 5000 steps: the product's entries (2^5000) overflow float64.
    matrices = jnp.broadcast_to(2 * jnp.eye(3), (5000, 3, 3))
    growth = partime.DenseTransition(matrices).log_growth()
    assert jnp.allclose(growth, 5000 * jnp.log(2.0), rtol=1e-12)


def _by_hand(transition, b, reverse):
    """The recurrence (`reverse`: its transpose) as a Python loop."""
    length, dense = b.shape[0], transition.as_dense()
    states, state = [], jnp.zeros_like(b[0]) if length else None
    for t in reversed(range(length)) if reverse else range(length):
        if reverse:
            a = dense[t + 1].T if t + 1 < length else jnp.zeros_like(dense[0])
        else:
            a = dense[t]
        state = a @ state + b[t]
        states.append(state)
    return jnp.stack(states[::-1] if reverse else states) if length else b


@pytest.mark.parametrize("structure", ["dense", "block", "diagonal"])
@pytest.mark.parametrize("reverse", [False, True])
def test_kinds_agree_short_and_typed(getkey, structure, reverse):
    """The sequential and associative scans agree with the recurrence written out by
    hand, for `T = 0, 1, 37` and in float32, float64 and complex128."""
    cases = [(0, jnp.float64), (1, jnp.float64), (37, jnp.float32)]
    cases.append((37, jnp.complex128))
    for length, dtype in cases:
        full = _transitions(getkey(), 1.1)[structure]
        transition = jax.tree.map(lambda a: a[:length].astype(dtype), full)
        b = jr.normal(getkey(), (length, D))
        if dtype == jnp.complex128:
            b = jax.lax.complex(b, jr.normal(getkey(), (length, D)))
        b = b.astype(dtype)
        expected = _by_hand(transition, b, reverse)
        tol = 1e-5 if dtype == jnp.float32 else 1e-12
        for kind in ("sequential", "associative"):
            with scan_kind(kind):
                out = jax.jit(lambda tr, b: tr.solve(b, reverse=reverse))(transition, b)
            assert out.shape == b.shape and out.dtype == b.dtype
            assert jnp.allclose(out, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_kinds_same_derivatives(getkey, structure):
    """Forward and reverse mode through the solve (both directions) agree between
    the kinds, as does the second derivative of a scalar function of it."""
    transition = _transitions(getkey(), 0.9)[structure]
    b = jr.normal(getkey(), (T, D))
    tangents = jax.tree.map(lambda a: jr.normal(getkey(), a.shape), (transition, b))

    def loss(transition, b):
        x = transition.solve(b)
        y = transition.solve(jnp.sin(x), reverse=True)
        return jnp.sum(x * y)

    def derivatives(transition, b):
        grad = jax.grad(loss, argnums=(0, 1))(transition, b)
        _, jvp = jax.jvp(loss, (transition, b), tangents)
        hvp = jax.jvp(jax.grad(loss, argnums=1), (transition, b), tangents)[1]
        return grad, jvp, hvp

    results = {}
    for kind in ("sequential", "associative"):
        with scan_kind(kind):
            # A fresh `jit` for each kind: its cache does not see `scan_kind`.
            results[kind] = jax.jit(lambda *args: derivatives(*args))(transition, b)
    for x, y in zip(*map(jax.tree.leaves, results.values())):
        assert jnp.allclose(x, y, rtol=1e-10, atol=1e-10)


def test_kind_by_platform():
    """By default the solves are a sequential `lax.scan` on a CPU and an associative
    scan elsewhere; `scan_kind` overrides the platform's choice."""
    transition = partime.DenseTransition(jnp.zeros((8, 2, 2)))
    b = jnp.zeros((8, 2))
    primitives = lambda: {
        eqn.primitive.name for eqn in jax.make_jaxpr(transition.solve)(b).eqns
    }
    sequential = jax.default_backend() == "cpu"
    assert ("scan" in primitives()) == sequential
    for kind in ("sequential", "associative"):
        with scan_kind(kind):
            assert ("scan" in primitives()) == (kind == "sequential")
