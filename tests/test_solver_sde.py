"""`partime.ParallelSolver` on SDEs, against sequential diffrax on the same inner grid
and the same Brownian motion (float64)."""

import functools
import warnings

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import partime
from partime._window_interpolation import inner_grid as _inner_grid


T0, T1 = 0.0, 1.0
NUM_WINDOWS = 2
NUM_STEPS = 8  # inner steps per window
RTOL_Y = 1e-8
RTOL_GRAD = 1e-6
_Y0 = np.array([1.0, -0.5])
_ARGS = (np.array([1.3, 0.8]), np.array([0.4, 0.3]))
_TS_SAVE = np.linspace(T0, T1, 7)

SOLVERS = {
    # Itô.
    "euler": (diffrax.Euler, "multiplicative"),
    # Stratonovich.
    "heun": (diffrax.Heun, "multiplicative"),
    "euler_heun": (diffrax.EulerHeun, "multiplicative"),
    # Stochastic Runge--Kutta for additive noise: needs the space-time Lévy area.
    "sea": (diffrax.SEA, "additive"),
    # Steps over each half of its step too: those need their own increments.
    "half_euler": (lambda: diffrax.HalfSolver(diffrax.Euler()), "multiplicative"),
    # Its tableau skips some stages' vector fields (`ignore_stage_f`/`_g`).
    "slow_rk": (diffrax.SlowRK, "multiplicative"),
}


def _drift(t, y, args):
    a, _ = args
    return -a * y + jnp.sin(3 * t) * jnp.tanh(y[::-1])


def _multiplicative(t, y, args):
    _, b = args
    return jnp.diag(b * (1 + 0.5 * jnp.tanh(y)))


def _additive(t, y, args):
    _, b = args
    return jnp.diag(b * (1 + 0.5 * t))


_DIFFUSIONS = {"multiplicative": _multiplicative, "additive": _additive}


def _brownian(kind="tree"):
    key = jax.random.key(17)
    if kind == "tree":
        return diffrax.VirtualBrownianTree(
            T0, T1, tol=1e-5, shape=(2,), key=key, levy_area=diffrax.SpaceTimeLevyArea
        )
    return diffrax.UnsafeBrownianPath(shape=(2,), key=key)


def _grid():
    # Bit for bit the times the parallel solver steps to.
    ends = np.linspace(T0, T1, NUM_WINDOWS + 1)
    grids = [np.asarray(_inner_grid(a, b, NUM_STEPS)) for a, b in zip(ends, ends[1:])]
    return np.concatenate([g[:-1] for g in grids] + [grids[-1][-1:]])


_GRID = _grid()


_STATIC = ("name", "parallel", "brownian")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _solve(y0, args, *, name, parallel, brownian="tree"):
    solver_cls, noise = SOLVERS[name]
    terms = diffrax.MultiTerm(
        diffrax.ODETerm(_drift),
        diffrax.ControlTerm(_DIFFUSIONS[noise], _brownian(brownian)),
    )
    if parallel:
        solver = partime.ParallelSolver(solver_cls(), num_steps=NUM_STEPS)
        dt0, controller = (T1 - T0) / NUM_WINDOWS, diffrax.ConstantStepSize()
    else:
        solver = solver_cls()
        dt0, controller = None, diffrax.StepTo(ts=_GRID)
    sol = diffrax.diffeqsolve(
        terms,
        solver,
        T0,
        T1,
        dt0,
        y0,
        args=args,
        saveat=diffrax.SaveAt(ts=_TS_SAVE),
        stepsize_controller=controller,
        max_steps=NUM_WINDOWS * NUM_STEPS,
        # diffrax's default adjoint rejects `UnsafeBrownianPath`.
        adjoint=diffrax.DirectAdjoint()
        if brownian == "unsafe"
        else diffrax.RecursiveCheckpointAdjoint(),
    )
    return sol.ys


def _loss(y0, args, **kwargs):
    ys = _solve(y0, args, **kwargs)
    return jnp.sum(ys**2) + jnp.sum(jnp.sin(ys))


_grad = jax.jit(jax.grad(_loss, argnums=(0, 1)), static_argnames=_STATIC)


def _assert_close(x, y, rtol, atol=None):
    atol = rtol if atol is None else atol
    for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_sde_solvers(name):
    # The Itô/Stratonovich marker is carried: diffrax warns about neither.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = _solve(_Y0, _ARGS, name=name, parallel=True)
    ref = _solve(_Y0, _ARGS, name=name, parallel=False)
    assert np.all(np.isfinite(np.asarray(ys)))
    _assert_close(ys, ref, RTOL_Y)


# Heun and Euler go through the same code paths as for ODEs (gradients tested there);
# SRK solvers have their own.
@pytest.mark.parametrize("name", ["sea"])
def test_sde_gradients(name):
    # Drift (`args[0]`) and diffusion (`args[1]`) parameters, and `y0`.
    grads = _grad(_Y0, _ARGS, name=name, parallel=True)
    ref = _grad(_Y0, _ARGS, name=name, parallel=False)
    _assert_close(grads, ref, RTOL_GRAD, atol=1e-9)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.asarray(g) != 0)


def test_sde_vmap():
    # diffrax's stage-skipping test (`nonbatchable`) raised "Unexpected batch tracer"
    # under `jax.vmap` (diffrax's `test_sde_strong_order_new` with `SlowRK`).
    y0s = np.stack([_Y0, 2 * _Y0])
    solve = lambda parallel: jax.vmap(
        lambda y0: _solve(y0, _ARGS, name="slow_rk", parallel=parallel)
    )(y0s)
    _assert_close(solve(True), solve(False), RTOL_Y)


def test_unsafe_brownian_path():
    # `UnsafeBrownianPath` draws each increment from a key folded with the raw bits of
    # `(t0, t1)`: it reproduces the sequential draws when the inner step times are bit
    # for bit the sequential grid's, as here.
    ys = _solve(_Y0, _ARGS, name="euler", parallel=True, brownian="unsafe")
    ref = _solve(_Y0, _ARGS, name="euler", parallel=False, brownian="unsafe")
    _assert_close(ys, ref, RTOL_Y)


def test_markers():
    for name, marker in [
        ("euler", diffrax.AbstractItoSolver),
        ("heun", diffrax.AbstractStratonovichSolver),
        ("euler_heun", diffrax.AbstractStratonovichSolver),
        ("sea", diffrax.AbstractStratonovichSolver),
    ]:
        solver = partime.ParallelSolver(SOLVERS[name][0]())
        assert isinstance(solver, marker) == isinstance(SOLVERS[name][0](), marker)
