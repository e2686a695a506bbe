"""`partime.WindowController` in float32 (x64 switched off for this module only): the
one-window recipe `dt0 = (t1 - t0) / num_steps` takes exactly one window for every
`t0`, `t1`, including those where `t0 + (t1 - t0)` rounds below `t1`, vmapped over
the horizons as in a latent ODE."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import partime


RTOL = 1e-4
NUM_STEPS = 16


@pytest.fixture(scope="module", autouse=True)
def _float32():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", previous)


def _vf(t, y, args):
    return -y + jnp.sin(t) * jnp.tanh(y[::-1])


def _horizons():
    """Random float32 horizons, with a share where `t0 + (t1 - t0) < t1` in float32
    arithmetic (found here with NumPy, independently of JAX), and the issue's
    `t0 = 3.7, t1 = 12.9`."""
    rng = np.random.default_rng(0)
    t0 = rng.uniform(0.0, 10.0, 4096).astype(np.float32)
    t1 = (t0 + rng.uniform(0.1, 10.0, 4096)).astype(np.float32)
    short = t0 + (t1 - t0) < t1
    pick = np.concatenate([np.nonzero(short)[0][:32], np.nonzero(~short)[0][:31]])
    t0 = np.append(t0[pick], np.float32(3.7))
    t1 = np.append(t1[pick], np.float32(12.9))
    return t0, t1, t0 + (t1 - t0) < t1


def _solve(solver, controller, t0, t1, dt0, y0):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_vf),
        solver,
        t0,
        t1,
        dt0,
        y0,
        stepsize_controller=controller,
        max_steps=1,
        throw=False,
    )


@jax.jit
@jax.vmap
def _one_window(t0, t1, y0):
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=NUM_STEPS)
    controller = partime.WindowController()
    sol = _solve(solver, controller, t0, t1, (t1 - t0) / NUM_STEPS, y0)
    plain = _solve(solver, diffrax.ConstantStepSize(), t0, t1, t1 - t0, y0)
    sequential = diffrax.diffeqsolve(
        diffrax.ODETerm(_vf),
        diffrax.Tsit5(),
        t0,
        t1,
        (t1 - t0) / NUM_STEPS,
        y0,
        max_steps=NUM_STEPS + 1,
    )
    ok = lambda s: s.result == diffrax.RESULTS.successful
    return (
        ok(sol),
        sol.stats["num_steps"],
        sol.ts[-1],
        sol.ys[-1],
        ok(plain),
        (
            sequential.stats["num_steps"],
            sequential.ys[-1],
        ),
    )


def test_one_window_float32():
    t0, t1, short = _horizons()
    assert 16 <= short.sum() <= 40  # the failing case is really exercised
    y0 = np.stack([np.cos(t0), np.sin(t1)], axis=-1).astype(np.float32)
    ok, windows, t_end, ys, plain_ok, (seq_steps, seq_ys) = _one_window(
        jnp.asarray(t0), jnp.asarray(t1), jnp.asarray(y0)
    )
    assert ys.dtype == jnp.float32
    assert np.all(np.asarray(ok))
    assert np.all(np.asarray(windows) == 1)
    np.testing.assert_array_equal(np.asarray(t_end), t1)  # exactly t1
    # diffrax's own constant step takes `NUM_STEPS` steps ending at t1: the grid
    # of the one window.
    assert np.all(np.asarray(seq_steps) == NUM_STEPS)
    np.testing.assert_allclose(ys, seq_ys, rtol=RTOL, atol=RTOL)
    # The plain recipe (`dt0 = t1 - t0`, no `WindowController`) needs a second,
    # one-ulp window exactly where `t0 + (t1 - t0)` falls short.
    np.testing.assert_array_equal(np.asarray(plain_ok), ~short)
