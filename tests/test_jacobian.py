"""Declared Jacobian structures (`partime.Dense`, `Diagonal`, `BlockDiagonal`): the
structured Jacobians themselves, and structured Newton / quasi-Newton against
`jax.lax.scan` and sequential diffrax (values, gradients, second order), with a
wrong declaration still exact."""

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import partime

from .helpers import max_rel_error


D, K, T = 8, 2, 200


def _params(dtype=jnp.float64):
    k1, k2, k3, k4 = jr.split(jr.PRNGKey(0), 4)
    return {
        # Block-diagonal recurrent weights: D/K blocks of K x K.
        "blocks": (0.7 * jr.normal(k1, (D // K, K, K)) / np.sqrt(K)).astype(dtype),
        "diag": jr.uniform(k2, (D,), minval=-0.9, maxval=0.9).astype(dtype),
        "dense": (0.6 * jr.normal(k3, (D, D)) / np.sqrt(D)).astype(dtype),
        "W": jr.normal(k4, (D, 3)).astype(dtype),
    }


def block_cell(params, h, x):
    """A blocked linear recurrence with an element-wise nonlinearity: its Jacobian
    is block-diagonal with K x K blocks."""
    blocked = jnp.einsum(
        "nij,nj->ni", params["blocks"], h.reshape(D // K, K), precision="highest"
    )
    h = jnp.tanh(blocked.reshape(D) + params["W"] @ x)
    return h, h


def diagonal_cell(params, h, x):
    h = jnp.tanh(params["diag"] * h + params["W"] @ x)
    return h, h


def dense_cell(params, h, x):
    h = jnp.tanh(params["dense"] @ h + params["W"] @ x)
    return h, h


CELLS = {"block": block_cell, "diagonal": diagonal_cell, "dense": dense_cell}


def _inputs(dtype=jnp.float64):
    xs = jr.normal(jr.PRNGKey(1), (T, 3)).astype(dtype)
    h0 = (0.1 * jr.normal(jr.PRNGKey(2), (D,))).astype(dtype)
    return xs, h0


def _loss(scan, cell, params, xs, h0):
    carry, ys = scan(lambda h, x: cell(params, h, x), h0, xs)
    return jnp.sum(ys**2) + jnp.sum(jnp.sin(carry))


def _lax(f, init, xs):
    return jax.lax.scan(f, init, xs)


def _partime(method):
    return lambda f, init, xs: partime.scan(f, init, xs, method=method)


@jax.jit
def _jacobians(params, xs, h0):
    """Every step's exact Jacobian on the trajectory, per cell, by `jacfwd`."""
    out = {}
    for name, cell in CELLS.items():
        _, ys = jax.lax.scan(lambda h, x: cell(params, h, x), h0, xs)
        prev = jnp.concatenate([h0[None], ys[:-1]])
        step = lambda h, x: cell(params, h, x)[0]
        out[name] = (prev, jax.vmap(jax.jacfwd(step))(prev, xs))
    return out


@pytest.fixture(scope="module")
def exact_jacobians():
    params = _params()
    xs, h0 = _inputs()
    return params, xs, _jacobians(params, xs, h0)


@pytest.mark.parametrize(
    "structure, cell",
    [
        (partime.Dense(), "dense"),
        (partime.Diagonal(), "diagonal"),
        (partime.BlockDiagonal(K), "block"),
        (partime.BlockDiagonal(1), "diagonal"),
        (partime.BlockDiagonal(D), "dense"),
    ],
)
def test_structured_jacobian_is_exact(exact_jacobians, structure, cell):
    """On a Jacobian that has the structure: the transition is the Jacobian, and
    the diagonal its diagonal."""
    params, xs, jacobians = exact_jacobians
    prev, expected = jacobians[cell]
    step = lambda h, x: CELLS[cell](params, h, x)[0]
    f, transition = jax.jit(structure.linearise, static_argnums=0)(step, prev, xs)
    np.testing.assert_allclose(f, jax.vmap(step)(prev, xs), rtol=1e-14)
    np.testing.assert_allclose(transition.as_dense(), expected, atol=1e-14)
    _, diagonal = structure.diagonal(step, prev, xs, None, None)
    np.testing.assert_allclose(
        diagonal, jnp.diagonal(expected, axis1=-2, axis2=-1), atol=1e-14
    )


def test_block_structure_shapes(exact_jacobians):
    params, xs, jacobians = exact_jacobians
    prev, _ = jacobians["block"]
    step = lambda h, x: block_cell(params, h, x)[0]
    _, transition = partime.BlockDiagonal(K).linearise(step, prev, xs)
    assert isinstance(transition, partime.BlockDiagonalTransition)
    assert transition.blocks.shape == (T, D // K, K, K)
    _, transition = partime.Diagonal().linearise(step, prev, xs)
    assert isinstance(transition, partime.DiagonalTransition)


#
# Structured Newton in `partime.scan`, against `jax.lax.scan`.
#


STRUCTURED = {
    "block": partime.Newton(jacobian=partime.BlockDiagonal(K)),
    "diagonal": partime.Newton(jacobian=partime.Diagonal()),
}


@pytest.fixture(scope="module")
def reference():
    params = _params()
    xs, h0 = _inputs()
    grad = jax.jit(jax.value_and_grad(_loss, argnums=(2, 3, 4)), static_argnums=(0, 1))
    return {cell: grad(_lax, CELLS[cell], params, xs, h0) for cell in STRUCTURED}


@pytest.mark.parametrize("cell", list(STRUCTURED))
def test_structured_newton_matches_lax_scan(reference, cell):
    params = _params()
    xs, h0 = _inputs()
    method = STRUCTURED[cell]
    grad = jax.jit(jax.value_and_grad(_loss, argnums=(2, 3, 4)), static_argnums=(0, 1))
    value, grads = grad(_partime(method), CELLS[cell], params, xs, h0)
    ref_value, ref_grads = reference[cell]
    assert max_rel_error(value, ref_value) < 1e-10
    assert max_rel_error(grads, ref_grads) < 1e-8
    # The structure's parameters get non-trivial gradients.
    assert jnp.all(grads[0]["blocks" if cell == "block" else "diag"] != 0)


@pytest.mark.parametrize("cell", list(STRUCTURED))
def test_structured_newton_iterations_equal_dense(cell):
    """A truly structured Jacobian: the structured Newton is Newton, iteration for
    iteration."""
    params = _params()
    xs, h0 = _inputs()

    @jax.jit
    def iterations(params, xs, h0):
        step = lambda h, x: CELLS[cell](params, h, x)
        out = []
        for method in (partime.Newton(), STRUCTURED[cell]):
            _, ys, stats = partime.scan(step, h0, xs, method=method, return_stats=True)
            out.append((ys, stats.num_iterations, stats.num_sequential_steps))
        return out

    (dense_ys, dense_iters, dense_seq), (ys, iters, seq) = iterations(params, xs, h0)
    assert int(iters) == int(dense_iters) > 1
    assert int(seq) == int(dense_seq) == 0
    assert max_rel_error(ys, dense_ys) < 1e-12


def test_structured_newton_second_order(reference):
    """Hessian-vector products (forward over reverse) equal `jax.lax.scan`'s."""
    params = _params()
    xs, h0 = _inputs()
    method = STRUCTURED["block"]

    def hvp(scan):
        grad = jax.grad(lambda p, h: _loss(scan, block_cell, p, xs, h), argnums=(0, 1))
        tangents = jax.tree.map(jnp.ones_like, (params, h0))
        return jax.jit(lambda p, h: jax.jvp(grad, (p, h), tangents)[1])(params, h0)

    got, expected = hvp(_partime(method)), hvp(_lax)
    assert max_rel_error(got, expected) < 1e-8


def test_structured_newton_float32():
    params = _params(jnp.float32)
    xs, h0 = _inputs(jnp.float32)
    grad = jax.jit(jax.value_and_grad(_loss, argnums=(2, 3, 4)), static_argnums=(0, 1))
    method = partime.Newton(jacobian=partime.BlockDiagonal(K))
    value, grads = grad(_partime(method), block_cell, params, xs, h0)
    ref_value, ref_grads = grad(_lax, block_cell, params, xs, h0)
    assert value.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    assert max_rel_error(value, ref_value) < 1e-5
    assert max_rel_error(grads, ref_grads) < 1e-3


def test_structured_newton_vmap():
    params = _params()
    xs, _ = _inputs()
    inits = 0.3 * jr.normal(jr.PRNGKey(3), (3, D))
    step = lambda h, x: block_cell(params, h, x)
    method = STRUCTURED["block"]
    run = lambda scan: jax.jit(jax.vmap(lambda h: scan(step, h, xs)[1]))(inits)
    assert max_rel_error(run(_partime(method)), run(_lax)) < 1e-10


@pytest.mark.parametrize(
    "method",
    [
        partime.Newton(jacobian=partime.BlockDiagonal(K)),
        partime.Newton(jacobian=partime.Diagonal()),
        partime.QuasiNewton(jacobian=partime.BlockDiagonal(K)),
        partime.QuasiNewton(diagonal_probes=2),
    ],
    ids=["newton-block", "newton-diagonal", "quasi-newton-block", "probed"],
)
def test_wrong_structure_still_exact(method):
    """Declared structured, truly dense: values and gradients are still exact (a
    quasi-Newton iteration, the convergence test, the fallback; the derivative's
    preconditioned solve checks its residual with the true operator)."""
    params = _params()
    xs, h0 = _inputs()
    grad = jax.jit(jax.value_and_grad(_loss, argnums=(2, 3, 4)), static_argnums=(0, 1))
    value, grads = grad(_partime(method), dense_cell, params, xs, h0)
    ref_value, ref_grads = grad(_lax, dense_cell, params, xs, h0)
    assert max_rel_error(value, ref_value) < 1e-10
    assert max_rel_error(grads, ref_grads) < 1e-8


def test_quasi_newton_cheap_exact_diagonals():
    """On a block-diagonal cell, QuasiNewton's diagonal from K products (declared, or
    K colours) is the exact one (from D products): the same iterations; and so is
    `diagonal_probes >= D`."""
    params = _params()
    xs, h0 = _inputs()
    step = lambda h, x: block_cell(params, h, x)

    @jax.jit
    def iterations():
        return [
            partime.scan(step, h0, xs, method=m, return_stats=True)[2].num_iterations
            for m in (
                partime.QuasiNewton(),
                partime.QuasiNewton(jacobian=partime.BlockDiagonal(K)),
                partime.QuasiNewton(diagonal_probes=K),
                partime.QuasiNewton(diagonal_probes=D),
            )
        ]

    exact, *cheap = iterations()
    assert int(exact) > 1
    assert all(int(c) == int(exact) for c in cheap)


def test_probed_diagonal(exact_jacobians):
    """`diagonal_probes=c` on a dense Jacobian: `J_ii` plus the entries `J_il`,
    `l ≡ i (mod c)`, `l ≠ i` (colouring), from `c` products."""
    params, xs, jacobians = exact_jacobians
    prev, expected = jacobians["dense"]
    step = lambda h, x: dense_cell(params, h, x)[0]
    _, diagonal = partime.Dense().diagonal(step, prev, xs, None, 3)
    same_colour = (np.arange(D) % 3)[:, None] == (np.arange(D) % 3)[None, :]
    np.testing.assert_allclose(
        diagonal, jnp.sum(jnp.where(same_colour, expected, 0), axis=-1), atol=1e-14
    )


def test_structured_gradient_memory():
    """The structured derivative holds no `T·d²` Jacobians: the compiled gradient's
    temporaries are below one such stack, and well below dense Newton's."""
    length, size = 1024, 64
    weights = 0.5 * jr.normal(jr.PRNGKey(4), (size // K, K, K))
    xs = jr.normal(jr.PRNGKey(5), (length, size))

    def cell(weights, h, x):
        blocked = jnp.einsum("nij,nj->ni", weights, h.reshape(size // K, K))
        h = jnp.tanh(blocked.reshape(size) + x)
        return h, h

    def temp_bytes(method):
        def loss(weights):
            step = lambda h, x: cell(weights, h, x)
            return jnp.sum(partime.scan(step, jnp.zeros(size), xs, method=method)[1])

        compiled = jax.jit(jax.grad(loss)).lower(weights).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    jacobian_stack = length * size * size * 8
    structured = temp_bytes(partime.Newton(jacobian=partime.BlockDiagonal(K)))
    dense = temp_bytes(partime.Newton())
    assert structured < jacobian_stack / 3
    assert structured < dense / 8
    assert structured < dense / 4


@pytest.mark.parametrize("probes", [0, True, 2.0])
def test_bad_diagonal_probes(probes):
    for method in (partime.QuasiNewton, partime.QuasiELK):
        with pytest.raises(ValueError, match="diagonal_probes"):
            method(diagonal_probes=probes)


@pytest.mark.parametrize("refresh", [1, "always", None])
def test_bad_refresh(refresh):
    for method in (partime.QuasiNewton, partime.QuasiELK):
        with pytest.raises(ValueError, match="refresh"):
            method(refresh=refresh)


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        partime.BlockDiagonal(0)
    with pytest.raises(ValueError, match="block_size"):
        partime.BlockDiagonal(True)
    params = _params()
    xs, h0 = _inputs()
    step = lambda h, x: block_cell(params, h, x)
    method = partime.Newton(jacobian=partime.BlockDiagonal(3))
    with pytest.raises(ValueError, match="not a multiple of the block size 3"):
        partime.scan(step, h0, xs, method=method)


#
# `partime.ParallelSolver` on an ODE with block-diagonal coupling, against diffrax.
#


T0, T1, NUM_STEPS = 0.0, 3.0, 60


def _pendulums(t, y, args):
    """Two independent damped, forced pendulums: the Jacobian of the vector field,
    and so of every Runge–Kutta step, is block-diagonal with 2 x 2 blocks."""
    omega, damping = args
    angle, velocity = y[0::2], y[1::2]
    accel = -(omega**2) * jnp.sin(angle) - damping * velocity + 0.3 * jnp.cos(t)
    return jnp.stack([velocity, accel], axis=-1).reshape(-1)


_Y0 = np.array([1.0, 0.0, -0.5, 0.8])
_ARGS = (np.array([1.0, 1.7]), np.array([0.3, 0.1]))
_TS = np.linspace(T0, T1, 7)


def _ode_loss(y0, args, *, parallel):
    if parallel:
        solver = partime.ParallelSolver(
            diffrax.Tsit5(),
            num_steps=NUM_STEPS,
            method=partime.Newton(jacobian=partime.BlockDiagonal(2)),
        )
        kwargs = dict(dt0=T1 - T0)
    else:
        grid = np.linspace(T0, T1, NUM_STEPS + 1)
        solver = diffrax.Tsit5()
        kwargs = dict(
            dt0=None, stepsize_controller=diffrax.StepTo(ts=grid), max_steps=NUM_STEPS
        )
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_pendulums),
        solver,
        T0,
        T1,
        y0=y0,
        args=args,
        saveat=diffrax.SaveAt(ts=_TS),
        **kwargs,
    )
    return jnp.sum(sol.ys**2), sol.ys


def test_parallel_solver_block_diagonal_ode():
    def run(parallel):
        fn = lambda y0, args: _ode_loss(y0, args, parallel=parallel)
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(_Y0, _ARGS)

    (loss, ys), grads = run(True)
    (ref_loss, ref_ys), ref_grads = run(False)
    np.testing.assert_allclose(ys, ref_ys, rtol=1e-8, atol=1e-10)
    assert max_rel_error(grads, ref_grads) < 1e-7
    assert all(jnp.all(g != 0) for g in jax.tree.leaves(grads))


#
# QuasiNewton's and QuasiELK's diagonal: kept from the first iterate or refreshed.
#


@pytest.mark.parametrize("method", [partime.QuasiNewton, partime.QuasiELK])
def test_quasi_newton_keeps_first_diagonal(exact_jacobians, method):
    """After the first iterate QuasiNewton and QuasiELK recompute their diagonal
    where `refresh` says so (always; never; `"auto"`: when the policy's flag is
    set), otherwise keep it; under `vmap`, member by member."""
    params, xs, jacobians = exact_jacobians
    prev, expected = jacobians["dense"]
    step = lambda h, x: dense_cell(params, h, x)[0]
    exact = jnp.diagonal(expected, axis1=-2, axis2=-1)
    stale = partime.DiagonalTransition(jnp.zeros((T, D)))

    def relinearise(refresh, flag):
        m = method(refresh=refresh)
        policy = (m.init_policy(T, jnp.float64)[0], flag)
        return m.relinearise(step, prev, xs, stale, policy).diagonals

    for refresh, flag, diagonal in [
        (True, False, exact),
        (False, True, stale.diagonals),
        ("auto", False, stale.diagonals),
        ("auto", True, exact),
    ]:
        got = jax.jit(relinearise, static_argnums=0)(refresh, jnp.asarray(flag))
        np.testing.assert_allclose(got, diagonal, atol=1e-14)
    got = jax.jit(jax.vmap(lambda flag: relinearise("auto", flag)))(
        jnp.array([True, False])
    )
    np.testing.assert_allclose(got[0], exact, atol=1e-14)
    np.testing.assert_allclose(got[1], stale.diagonals, atol=0)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_quasi_newton_refresh_exact(dtype):
    """Whatever `refresh`, the values equal `jax.lax.scan`'s; in float64 the
    default's also under `vmap`, and its gradient (the derivative does not depend
    on `refresh`). Keeping the diagonal costs at most a few iterations here (dense
    cell, T = 200)."""
    params = _params(dtype)
    xs, h0 = _inputs(dtype)
    inits = jnp.stack([h0, -h0])
    float64 = dtype == jnp.float64
    refreshes = (True, "auto", False)

    @jax.jit
    def run(params, xs, h0):
        step = lambda h, x: dense_cell(params, h, x)
        scans = [
            partime.scan(
                step, h0, xs, method=partime.QuasiNewton(refresh=r), return_stats=True
            )
            for r in refreshes
        ]
        out = [scans, jax.lax.scan(step, h0, xs)]
        if float64:
            for scan in (_partime(partime.QuasiNewton()), _lax):
                out.append(jax.vmap(lambda h: scan(step, h, xs)[1])(inits))
                grad = jax.grad(_loss, argnums=(2, 3, 4))
                out.append(grad(scan, dense_cell, params, xs, h0))
        return out

    scans, reference, *checks = run(params, xs, h0)
    for *out, stats in scans:
        assert max_rel_error(out, reference) < (1e-10 if float64 else 1e-5)
        assert int(stats.num_sequential_steps) == 0
    if float64:
        batched, grads, ref_batched, ref_grads = checks
        assert max_rel_error(batched, ref_batched) < 1e-10
        assert max_rel_error(grads, ref_grads) < 1e-8
    iterations = {
        refresh: int(stats.num_iterations)
        for refresh, (*_, stats) in zip(refreshes, scans)
    }
    assert 1 < iterations[True] <= iterations["auto"] <= iterations[True] + 2
    assert iterations[True] <= iterations[False] <= iterations[True] + 2
