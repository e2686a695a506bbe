"""`partime.ParallelSolver` with events, progress meters and CDEs, against sequential
diffrax on the same inner grid (float64)."""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import partime
from partime._window_interpolation import inner_grid as _inner_grid


NUM_WINDOWS = 4
NUM_STEPS = 5  # inner steps per window


def _grid(t0, t1):
    # Bit for bit the times the parallel solver steps to; concrete even under `jit`.
    ends = np.linspace(t0, t1, NUM_WINDOWS + 1)
    with jax.ensure_compile_time_eval():
        grids = [
            np.asarray(_inner_grid(a, b, NUM_STEPS)) for a, b in zip(ends, ends[1:])
        ]
    return np.concatenate([g[:-1] for g in grids] + [grids[-1][-1:]])


def _solve(terms, y0, t1, *, parallel, **kwargs):
    if parallel:
        solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=NUM_STEPS)
        dt0, controller = t1 / NUM_WINDOWS, diffrax.ConstantStepSize()
    else:
        solver = diffrax.Tsit5()
        dt0, controller = None, diffrax.StepTo(ts=_grid(0.0, t1))
    return diffrax.diffeqsolve(
        terms,
        solver,
        0.0,
        t1,
        dt0,
        y0,
        stepsize_controller=controller,
        max_steps=NUM_WINDOWS * NUM_STEPS,
        **kwargs,
    )


def _assert_close(x, y, rtol):
    assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol)


def _damped_fall(t, y, args):
    height, velocity = y
    return jnp.stack([velocity, -9.81 - 0.3 * velocity * jnp.abs(velocity)])


@functools.partial(jax.jit, static_argnames="parallel")
def _fall(y0, *, parallel):
    event = diffrax.Event(
        cond_fn=lambda t, y, args, **kwargs: y[0],
        root_finder=optx.Newton(rtol=1e-12, atol=1e-12),
    )
    sol = _solve(diffrax.ODETerm(_damped_fall), y0, 2.0, parallel=parallel, event=event)
    return sol.ts, sol.ys, sol.event_mask


def test_event():
    # The crossing is detected at the window end after it, and located inside the
    # window by a root find on the inner solver's interpolation: the same time as a
    # sequential solve on the same grid.
    y0 = np.array([1.0, 0.0])
    ts, ys, mask = _fall(y0, parallel=True)
    ref_ts, ref_ys, ref_mask = _fall(y0, parallel=False)
    assert bool(mask) and bool(ref_mask)
    assert 0.4 < float(ts[-1]) < 0.6
    _assert_close(ts, ref_ts, 1e-8)
    _assert_close(ys, ref_ys, 1e-8)


@pytest.mark.parametrize(
    "meter", [diffrax.TextProgressMeter, diffrax.TqdmProgressMeter]
)
def test_progress_meter(meter, capsys):
    y0 = np.array([1.0, 0.0])
    sol = _solve(
        diffrax.ODETerm(_damped_fall),
        y0,
        0.3,
        parallel=True,
        progress_meter=meter(),
    )
    ref = _solve(diffrax.ODETerm(_damped_fall), y0, 0.3, parallel=False)
    _assert_close(sol.ys, ref.ys, 1e-8)
    captured = capsys.readouterr()
    assert "100" in captured.out + captured.err


_DATA_TS = np.linspace(0.0, 1.0, 11)
_DATA = np.stack([_DATA_TS, np.sin(4 * _DATA_TS), np.cos(3 * _DATA_TS) ** 2], axis=-1)


def _cde_vf(t, y, args):
    # (hidden = 3, channels = 3)
    return jnp.tanh(jnp.outer(y, jnp.array([1.0, -0.5, 0.3])) + args)


@functools.partial(jax.jit, static_argnames=("interpolation", "parallel"))
def _cde(y0, args, *, interpolation, parallel):
    if interpolation == "linear":
        control = diffrax.LinearInterpolation(ts=_DATA_TS, ys=_DATA)
    else:
        coeffs = diffrax.backward_hermite_coefficients(_DATA_TS, _DATA)
        control = diffrax.CubicInterpolation(_DATA_TS, coeffs)
    term = diffrax.ControlTerm(_cde_vf, control).to_ode()
    sol = _solve(
        term, y0, 1.0, parallel=parallel, args=args, saveat=diffrax.SaveAt(ts=_DATA_TS)
    )
    return sol.ys


@pytest.mark.parametrize("interpolation", ["linear", "cubic"])
def test_cde(interpolation):
    y0 = np.array([0.5, -0.2, 0.1])
    args = np.array([[0.1, 0.2, -0.1], [0.0, -0.3, 0.2], [0.4, 0.1, 0.0]])
    ys = _cde(y0, args, interpolation=interpolation, parallel=True)
    ref = _cde(y0, args, interpolation=interpolation, parallel=False)
    _assert_close(ys, ref, 1e-8)
