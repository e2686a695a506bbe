"""`partime.WindowController`: `dt0` and the wrapped controller set the inner step, the
windows follow; checked on set-ups from diffrax's documentation with only the solver
and the controller swapped (a method-of-lines heat equation, a neural CDE)."""

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
import pytest

import partime


def _window_ends(sol):
    """The accepted windows' end times, from `SaveAt(steps=True)`."""
    ts = np.asarray(sol.ts)
    return ts[np.isfinite(ts)]


def _inner_grid(t0, ends, num_steps):
    """Every window split into `num_steps` equal steps, built independently of
    partime: the grid a sequential solve must take to reproduce the windows."""
    starts = np.concatenate([[t0], ends[:-1]])
    pieces = [np.linspace(a, b, num_steps + 1)[:-1] for a, b in zip(starts, ends)]
    return np.concatenate(pieces + [ends[-1:]])


def _sequential_on(term, grid, y0, args=None):
    return diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        grid[0],
        grid[-1],
        None,
        y0,
        args=args,
        stepsize_controller=diffrax.StepTo(ts=jnp.asarray(grid)),
        max_steps=len(grid),
    ).ys[-1]


# A constant inner step: `ceil((t1 - t0) / (K dt0))` equal windows.


def _decay(t, y, args):
    return -args * y + jnp.sin(3 * t) * jnp.tanh(y[::-1])


_Y0 = jnp.array([1.0, -0.5, 0.3])
_ARGS = jnp.array([1.0, 0.7, 1.5])


@eqx.filter_jit
def _constant_solve(t0, t1, dt0, num_steps: int, max_steps: int):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_decay),
        partime.ParallelSolver(diffrax.Tsit5(), num_steps=num_steps),
        t0,
        t1,
        dt0,
        _Y0,
        args=_ARGS,
        stepsize_controller=partime.WindowController(),
        saveat=diffrax.SaveAt(steps=True),
        max_steps=max_steps,
    )


@pytest.mark.parametrize(
    "t0, t1, dt0, num_steps",
    [
        (0.5, 2.5, 0.01, 50),  # 200 inner steps: exactly 4 windows
        (0.5, 2.5, 0.013, 50),  # 154 inner steps: 4 windows of inner step 0.01
        (0.5, 2.5, 0.04, 50),  # 50 inner steps: one window
        (2.5, 0.5, -0.013, 50),  # backwards in time
    ],
)
def test_constant_windows(t0, t1, dt0, num_steps):
    horizon = abs(t1 - t0)
    windows = math.ceil(math.ceil(horizon / abs(dt0) - 1e-9) / num_steps)
    # Traced times: `jit` with `t0`, `t1`, `dt0` as arrays.
    sol = _constant_solve(
        jnp.asarray(t0), jnp.asarray(t1), jnp.asarray(dt0), num_steps, max_steps=8
    )
    assert int(sol.stats["num_accepted_steps"]) == windows
    assert int(sol.stats["num_rejected_steps"]) == 0
    ends = _window_ends(sol)
    assert len(ends) == windows
    assert ends[-1] == t1  # exactly
    expected_ends = t0 + (t1 - t0) * np.arange(1, windows + 1) / windows
    np.testing.assert_allclose(ends, expected_ends, rtol=1e-12, atol=1e-12)
    inner = np.abs(np.diff(_inner_grid(t0, ends, num_steps)))
    assert np.all(inner <= abs(dt0) * (1 + 1e-12))
    reference = _sequential_on(
        diffrax.ODETerm(_decay), _inner_grid(t0, ends, num_steps), _Y0, _ARGS
    )
    ys = sol.ys[windows - 1]
    np.testing.assert_allclose(ys, reference, rtol=1e-10, atol=1e-12)


def _solver_and_controller(parallel: bool, num_steps: int):
    """Tsit5 in windows of `num_steps`, or sequential Tsit5 on the same constant
    grid: the two sides of the gradient tests."""
    if parallel:
        solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=num_steps)
        return solver, partime.WindowController()
    return diffrax.Tsit5(), diffrax.ConstantStepSize()


def test_constant_gradients():
    """Gradients, also with respect to `t1` (the windows move with it), equal the
    sequential solve's on the same grid."""
    t0, num_steps, windows = 0.3, 20, 3

    def loss(y0, t1, parallel):
        dt0 = (t1 - t0) / (windows * num_steps)
        solver, controller = _solver_and_controller(parallel, num_steps)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_decay),
            solver,
            t0,
            t1,
            dt0,
            y0,
            args=_ARGS,
            stepsize_controller=controller,
            max_steps=windows * num_steps,
        )
        return jnp.sum(sol.ys[-1] ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    t1 = jnp.asarray(1.7)
    (par_y0, par_t1), (seq_y0, seq_t1) = grad(_Y0, t1, True), grad(_Y0, t1, False)
    np.testing.assert_allclose(par_y0, seq_y0, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(par_t1, seq_t1, rtol=1e-8, atol=1e-10)
    assert float(jnp.abs(seq_t1)) > 1e-3  # a real dependence on t1


def test_infinite_t1_gradients():
    """`t1=inf` with an event to stop the solve (diffrax's `test_event_vmap_t0`):
    full windows, and gradients with respect to `t0` and `y0` finite and equal to
    the sequential solve's on the same grid (the end of a window once took
    `inf - inf` in its unused branch, and the gradient was NaN)."""
    event = diffrax.Event(
        lambda t, y, args, **kwargs: y[0] - 1.0,
        optx.Newton(1e-10, 1e-10, optx.rms_norm),
    )

    def event_time(t0, y0, parallel):
        solver, controller = _solver_and_controller(parallel, 10)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(_decay),
            solver,
            t0,
            jnp.inf,
            0.1,
            y0,
            args=_ARGS,
            stepsize_controller=controller,
            event=event,
        )
        return sol.ts[-1]

    grad = jax.jit(jax.value_and_grad(event_time, argnums=(0, 1)), static_argnums=2)
    t0, y0 = jnp.asarray(0.2), 4 * _Y0
    (par, par_grads), (seq, seq_grads) = grad(t0, y0, True), grad(t0, y0, False)
    assert 1.0 < float(seq) - 0.2 < 5.0  # the event is a few windows in
    np.testing.assert_allclose(par, seq, rtol=1e-8, atol=1e-10)
    for a, b in zip(par_grads, seq_grads):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_rejected_windows():
    """A first inner step far too large for the tolerance: the window is rejected and
    retried from the same start with the smaller step the controller proposes; only
    accepted windows make the grid, and the result is the sequential solve's on it."""
    num_steps = 8
    controller = diffrax.PIDController(rtol=1e-8, atol=1e-8)

    @jax.jit
    def solve():
        return diffrax.diffeqsolve(
            diffrax.ODETerm(_decay),
            partime.ParallelSolver(diffrax.Tsit5(), num_steps=num_steps),
            0.0,
            3.0,
            0.5,
            _Y0,
            args=_ARGS,
            stepsize_controller=partime.WindowController(controller),
            saveat=diffrax.SaveAt(steps=True),
            max_steps=64,
        )

    sol = solve()
    assert int(sol.stats["num_rejected_steps"]) >= 1
    ends = _window_ends(sol)
    assert len(ends) == int(sol.stats["num_accepted_steps"])
    assert ends[-1] == 3.0
    grid = _inner_grid(0.0, ends, num_steps)
    assert np.all(np.diff(grid) < 0.5)
    reference = _sequential_on(diffrax.ODETerm(_decay), grid, _Y0, _ARGS)
    ys = sol.ys[len(ends) - 1]
    np.testing.assert_allclose(ys, reference, rtol=1e-10, atol=1e-12)


# diffrax's "nonlinear heat PDE" example, small: y_t = (1 - y) y_xx on [-1, 1],
# y(0, x) = x², Dirichlet ends; Tsit5, dt0 = 1e-4 and
# `PIDController(pcoeff=0.3, icoeff=0.4, rtol=1e-10, atol=1e-10, dtmax=1e-3)`.

_HEAT_X = np.linspace(-1.0, 1.0, 50)
_HEAT_T1, _HEAT_DT0, _HEAT_DTMAX, _HEAT_K = 0.1, 1e-4, 1e-3, 20


def _heat(t, y, args):
    dx = _HEAT_X[1] - _HEAT_X[0]
    interior = (1 - y[1:-1]) * (y[2:] - 2 * y[1:-1] + y[:-2]) / dx**2
    zero = jnp.zeros(1, dtype=y.dtype)
    return jnp.concatenate([zero, interior, zero])


def _heat_controller():
    return diffrax.PIDController(
        pcoeff=0.3, icoeff=0.4, rtol=1e-10, atol=1e-10, dtmax=_HEAT_DTMAX
    )


@pytest.fixture(scope="module")
def heat():
    y0 = jnp.asarray(_HEAT_X**2)

    @jax.jit
    def solve(y0):
        kwargs = dict(y0=y0, saveat=diffrax.SaveAt(steps=True))
        parallel = diffrax.diffeqsolve(
            diffrax.ODETerm(_heat),
            partime.ParallelSolver(diffrax.Tsit5(), num_steps=_HEAT_K),
            0.0,
            _HEAT_T1,
            _HEAT_DT0,
            stepsize_controller=partime.WindowController(_heat_controller()),
            max_steps=64,
            **kwargs,
        )
        sequential = diffrax.diffeqsolve(
            diffrax.ODETerm(_heat),
            diffrax.Tsit5(),
            0.0,
            _HEAT_T1,
            _HEAT_DT0,
            stepsize_controller=_heat_controller(),
            max_steps=4096,
            **kwargs,
        )
        return parallel, sequential

    return y0, *solve(y0)


def test_heat_pde_windows(heat):
    _, parallel, sequential = heat
    # The first window takes K steps of dt0; the step then reaches dtmax (as in the
    # sequential solve, which is bounded by dtmax after its first steps), and the
    # rest of the horizon is split into windows of at most K steps of dtmax.
    first = _HEAT_K * _HEAT_DT0
    windows = 1 + math.ceil((_HEAT_T1 - first) / (_HEAT_K * _HEAT_DTMAX) - 1e-9)
    assert int(parallel.stats["num_accepted_steps"]) == windows
    assert int(parallel.stats["num_rejected_steps"]) == 0
    ends = _window_ends(parallel)
    assert ends[-1] == _HEAT_T1
    inner = np.diff(_inner_grid(0.0, ends, _HEAT_K))
    assert len(inner) == windows * _HEAT_K
    np.testing.assert_allclose(inner[0], _HEAT_DT0, rtol=1e-12)
    assert np.all(inner <= _HEAT_DTMAX * (1 + 1e-12))
    # The sequential solve with the same controller takes about as many steps.
    sequential_steps = int(sequential.stats["num_accepted_steps"])
    assert sequential_steps <= len(inner) <= sequential_steps + _HEAT_K


def test_heat_pde_values(heat):
    y0, parallel, sequential = heat
    windows = int(parallel.stats["num_accepted_steps"])
    ys = parallel.ys[windows - 1]
    grid = _inner_grid(0.0, _window_ends(parallel), _HEAT_K)
    reference = _sequential_on(diffrax.ODETerm(_heat), grid, y0)
    np.testing.assert_allclose(ys, reference, rtol=1e-10, atol=1e-12)
    # The sequential solve at the user's tolerance agrees to about that tolerance.
    sequential_ys = sequential.ys[int(sequential.stats["num_accepted_steps"]) - 1]
    np.testing.assert_allclose(ys, sequential_ys, rtol=1e-8, atol=1e-8)


# diffrax's "neural CDE" example, small: a cubic interpolation of a spiral drives
# `ControlTerm(mlp, control).to_ode()`; Tsit5, dt0=None,
# `PIDController(rtol=1e-3, atol=1e-6)`.


class _CDEField(eqx.Module):
    mlp: eqx.nn.MLP
    data_size: int = eqx.field(static=True)
    hidden_size: int = eqx.field(static=True)

    def __init__(self, data_size, hidden_size, key):
        self.data_size, self.hidden_size = data_size, hidden_size
        self.mlp = eqx.nn.MLP(
            hidden_size, hidden_size * data_size, 16, 1, jax.nn.softplus, key=key
        )

    def __call__(self, t, y, args):
        field = jnp.tanh(self.mlp(y))
        return field.reshape(self.hidden_size, self.data_size)


_CDE_K = 32


@pytest.fixture(scope="module")
def cde():
    k_field, k_init = jr.split(jr.PRNGKey(0))
    ts = jnp.linspace(0.0, 4 * jnp.pi, 50)
    data = jnp.stack([ts, jnp.cos(ts) * jnp.exp(-0.1 * ts), jnp.sin(ts)], axis=-1)
    coeffs = diffrax.backward_hermite_coefficients(ts, data)
    field = _CDEField(3, 4, k_field)
    y0 = 0.1 * jr.normal(k_init, (4,))

    def term(field, coeffs):
        control = diffrax.CubicInterpolation(ts, coeffs)
        return diffrax.ControlTerm(field, control).to_ode()

    @eqx.filter_jit
    def solve(field, coeffs, y0):
        kwargs = dict(dt0=None, y0=y0, saveat=diffrax.SaveAt(steps=True))
        controller = diffrax.PIDController(rtol=1e-3, atol=1e-6)
        parallel = diffrax.diffeqsolve(
            term(field, coeffs),
            partime.ParallelSolver(diffrax.Tsit5(), num_steps=_CDE_K),
            ts[0],
            ts[-1],
            stepsize_controller=partime.WindowController(controller),
            max_steps=32,
            **kwargs,
        )
        sequential = diffrax.diffeqsolve(
            term(field, coeffs),
            diffrax.Tsit5(),
            ts[0],
            ts[-1],
            stepsize_controller=controller,
            max_steps=4096,
            **kwargs,
        )
        tight = diffrax.diffeqsolve(
            term(field, coeffs),
            diffrax.Tsit5(),
            ts[0],
            ts[-1],
            stepsize_controller=diffrax.PIDController(rtol=1e-12, atol=1e-12),
            max_steps=16384,
            **kwargs,
        )
        return parallel, sequential, tight

    parallel, sequential, tight = solve(field, coeffs, y0)
    return term(field, coeffs), y0, parallel, sequential, tight


def _last(sol):
    return sol.ys[int(sol.stats["num_accepted_steps"]) - 1]


def test_neural_cde_values(cde):
    term, y0, parallel, _, _ = cde
    grid = _inner_grid(0.0, _window_ends(parallel), _CDE_K)
    reference = _sequential_on(term, grid, y0)
    np.testing.assert_allclose(_last(parallel), reference, rtol=1e-10, atol=1e-12)


def test_neural_cde_accuracy(cde):
    """The user's tolerances keep their meaning: the windowed solve is at least about
    as accurate as the sequential one at the same `rtol`, `atol`. Its windows: those
    the sequential step count needs, plus the ramp from the controller's small first
    step (0.01 here), which grows by at most `factormax = 10` per window."""
    _, _, parallel, sequential, tight = cde
    exact = _last(tight)
    parallel_error = float(jnp.max(jnp.abs(_last(parallel) - exact)))
    sequential_error = float(jnp.max(jnp.abs(_last(sequential) - exact)))
    assert parallel_error <= max(10 * sequential_error, 1e-6)
    windows = int(parallel.stats["num_accepted_steps"])
    sequential_steps = int(sequential.stats["num_accepted_steps"])
    assert windows <= math.ceil(sequential_steps / _CDE_K) + 3
    assert _window_ends(parallel)[-1] == 4 * np.pi


# Configuration errors, at trace time.


def test_adaptive_marker():
    pid = diffrax.PIDController(rtol=1e-4, atol=1e-6)
    adaptive = partime.WindowController(pid)
    assert isinstance(adaptive, diffrax.AbstractAdaptiveStepSizeController)
    assert (adaptive.rtol, adaptive.atol, adaptive.norm) == (1e-4, 1e-6, pid.norm)
    constant = partime.WindowController()
    assert isinstance(constant.controller, diffrax.ConstantStepSize)
    assert not isinstance(constant, diffrax.AbstractAdaptiveStepSizeController)


@pytest.mark.parametrize(
    "controller, error",
    [
        (diffrax.StepTo(ts=[0.0, 1.0]), TypeError),
        (
            diffrax.ClipStepSizeController(
                diffrax.PIDController(rtol=1e-3, atol=1e-6), step_ts=[0.5]
            ),
            ValueError,
        ),
        (partime.WindowController(), ValueError),
    ],
)
def test_refused_controllers(controller, error):
    with pytest.raises(error, match="WindowController"):
        partime.WindowController(controller)


def _solve(solver, dt0):
    return diffrax.diffeqsolve(
        diffrax.ODETerm(_decay),
        solver,
        0.0,
        1.0,
        dt0,
        _Y0,
        args=_ARGS,
        stepsize_controller=partime.WindowController(),
    )


def test_refused_calls():
    with pytest.raises(TypeError, match="ParallelSolver"):
        _solve(diffrax.Tsit5(), 0.1)
    with pytest.raises(ValueError, match="needs `dt0`"):
        _solve(partime.ParallelSolver(num_steps=10), None)
