"""`partime.ParallelSolver` in float32: x64 switched off for this module only."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import partime


RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _float32():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


def _vf(t, y, args):
    return -args * y + jnp.sin(2 * t) * jnp.tanh(y[::-1])


def _problem():
    # Built inside the tests, where x64 is off.
    y0 = jnp.array([1.0, -0.5, 0.3])
    args = jnp.array([1.0, 0.7, 1.5])
    ts = jnp.linspace(0.0, 2.0, 9)
    grid = jnp.linspace(0.0, 2.0, 41)
    return y0, args, ts, grid


@jax.jit
def _solve_both(y0, args, ts, grid):
    term = diffrax.ODETerm(_vf)
    saveat = diffrax.SaveAt(ts=ts, solver_state=True)
    parallel = diffrax.diffeqsolve(
        term,
        partime.ParallelSolver(diffrax.Tsit5(), num_steps=20),
        0.0,
        2.0,
        1.0,
        y0,
        args=args,
        saveat=saveat,
    )
    sequential = diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        0.0,
        2.0,
        None,
        y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.StepTo(ts=grid),
    )
    return parallel.ys, parallel.solver_state, sequential.ys


@jax.jit
def _gradients(y0, args, grid):
    def loss(y0, args, solver, dt0, controller):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_vf),
            solver,
            0.0,
            2.0,
            dt0,
            y0,
            args=args,
            stepsize_controller=controller,
            max_steps=len(grid),
        )
        return jnp.sum(sol.ys**2)

    parallel = partime.ParallelSolver(diffrax.Tsit5(), num_steps=20)
    par_loss = lambda y0, args: loss(
        y0, args, parallel, 1.0, diffrax.ConstantStepSize()
    )
    seq_loss = lambda y0, args: loss(
        y0, args, diffrax.Tsit5(), None, diffrax.StepTo(ts=grid)
    )
    par = jax.grad(par_loss, argnums=(0, 1))(y0, args)
    seq = jax.grad(seq_loss, argnums=(0, 1))(y0, args)
    return par, seq


def test_float32_solution():
    y0, args, ts, grid = _problem()
    assert y0.dtype == jnp.float32
    ys, state, ref = _solve_both(y0, args, ts, grid)
    assert ys.dtype == jnp.float32
    np.testing.assert_allclose(ys, ref, rtol=RTOL, atol=RTOL)
    assert int(state.num_fallbacks) == 0
    assert int(state.num_iterations) <= 16


def test_float32_gradients():
    y0, args, _, grid = _problem()
    (par_y0, par_args), (seq_y0, seq_args) = _gradients(y0, args, grid)
    assert par_y0.dtype == jnp.float32 and par_args.dtype == jnp.float32
    np.testing.assert_allclose(par_y0, seq_y0, rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(par_args, seq_args, rtol=RTOL, atol=RTOL)


def _sde_terms(key):
    drift = lambda t, y, args: -args * y
    diffusion = lambda t, y, args: jnp.diag(0.5 + 0.2 * jnp.tanh(y))
    brownian = diffrax.VirtualBrownianTree(0.0, 10.0, tol=1e-3, shape=(2,), key=key)
    return diffrax.MultiTerm(
        diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, brownian)
    )


@jax.jit
def _sde_value_and_grad(keys, args, grid):
    # As in examples/neural_sde.py: one window over [0, 10] of 100 Euler steps, its
    # ends constants of the program. XLA then folds and reassociates the inner grid's
    # arithmetic, which must still be `grid` (computed outside `jit`) bit for bit:
    # it meets the Brownian tree's dyadic nodes (at 2.5, 5, 7.5), where a one-ulp
    # change moves the tree by about its tolerance.
    y0 = jnp.array([1.0, -0.5])
    ts = jnp.linspace(0.0, 10.0, 11)

    def loss(args, key, solver, dt0, controller, adjoint, max_steps):
        sol = diffrax.diffeqsolve(
            _sde_terms(key),
            solver,
            0.0,
            10.0,
            dt0,
            y0,
            args=args,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=controller,
            adjoint=adjoint,
            max_steps=max_steps,
        )
        return jnp.sum(sol.ys**2), sol.ys

    def both(key):
        parallel = partime.ParallelSolver(diffrax.Euler(), num_steps=len(grid) - 1)
        par = jax.value_and_grad(loss, has_aux=True)(
            args,
            key,
            parallel,
            10.0,
            diffrax.ConstantStepSize(),
            diffrax.DirectAdjoint(),
            1,
        )
        seq = jax.value_and_grad(loss, has_aux=True)(
            args,
            key,
            diffrax.Euler(),
            None,
            diffrax.StepTo(ts=grid),
            diffrax.RecursiveCheckpointAdjoint(),
            len(grid) - 1,
        )
        return par, seq

    # Batched, as in training.
    return jax.vmap(both)(keys)


def test_float32_sde_bit_identical_grid():
    grid = partime.inner_grid(0.0, 10.0, 100)
    keys = jax.random.split(jax.random.key(5), 2)
    args = jnp.array([0.3, 0.7])
    par, seq = _sde_value_and_grad(keys, args, grid)
    ((_, par_ys), par_grad), ((_, seq_ys), seq_grad) = par, seq
    assert par_ys.dtype == jnp.float32
    np.testing.assert_allclose(par_ys, seq_ys, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(par_grad, seq_grad, rtol=1e-5, atol=1e-5)
