"""`partime.ParallelSolver` against sequential diffrax on the same inner grid (float64).

Each comparison runs diffrax's own solver with `StepTo` on the grid that the parallel
solver steps on inside its windows, so that the two must agree to the fixed-point
iteration's tolerance, not to the discretisation error.
"""

import functools

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import partime


T0, T1 = 0.0, 2.0
NUM_INNER = 40  # inner steps over the whole horizon, in every test
RTOL_Y = 1e-8
RTOL_GRAD = 1e-6
MAX_STEPS = 16

EXPLICIT_SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}


def _vf(t, y, args):
    # Nonlinear, time-dependent, contracting, with `args`.
    a, b = args
    return -a * y + b * jnp.sin(2 * t) * jnp.tanh(y[::-1])


_TERM = diffrax.ODETerm(_vf)
_Y0 = np.array([1.0, -0.5, 0.3])
_ARGS = (np.array([1.0, 0.7, 1.5]), 0.8)
_TS_SAVE = np.linspace(T0, T1, 13)  # hits some inner grid points and misses others
_TS_DENSE = np.linspace(T0, T1, 29)[1:-1]


def _inner_grid(window_ends, num_steps):
    """The inner grid of `ParallelSolver`: `num_steps` equal steps per window."""
    grids = [
        np.linspace(a, b, num_steps + 1)[:-1]
        for a, b in zip(window_ends[:-1], window_ends[1:])
    ]
    return np.concatenate(grids + [np.asarray(window_ends[-1:])])


def _assert_close(x, y, rtol, atol=None):
    atol = rtol if atol is None else atol
    for a, b in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _assert_well_behaved(solver_state, num_windows, max_iters_per_window=8):
    assert int(solver_state.num_fallbacks) == 0
    # A window whose first guess already satisfies every step's equation to
    # tolerance (e.g. Dopri8's coarse prediction on a smooth problem) takes none.
    iters = int(solver_state.num_iterations)
    assert 0 <= iters <= max_iters_per_window * num_windows


#
# Forward solves: every explicit solver, one window and several, all SaveAt kinds.
#


_SAVEAT_PARALLEL = diffrax.SaveAt(
    subs=[
        diffrax.SubSaveAt(t0=True, t1=True, ts=_TS_SAVE),
        diffrax.SubSaveAt(steps=True),
    ],
    dense=True,
    solver_state=True,
)


@eqx.filter_jit
def _solve_parallel(solver, dt0, y0, args, ts_dense):
    sol = diffrax.diffeqsolve(
        _TERM,
        solver,
        T0,
        T1,
        dt0,
        y0,
        args=args,
        saveat=_SAVEAT_PARALLEL,
        max_steps=MAX_STEPS,
    )
    values = jax.vmap(sol.evaluate)(ts_dense)
    derivatives = jax.vmap(sol.derivative)(ts_dense)
    return sol.ys, sol.ts[1], values, derivatives, sol.solver_state, sol.result


@eqx.filter_jit
def _solve_sequential(solver, grid, y0, args, ts_dense, window_ends):
    saveat = diffrax.SaveAt(
        subs=[
            diffrax.SubSaveAt(t0=True, t1=True, ts=_TS_SAVE),
            diffrax.SubSaveAt(ts=window_ends),
        ],
        dense=True,
    )
    sol = diffrax.diffeqsolve(
        _TERM,
        solver,
        grid[0],
        grid[-1],
        None,
        y0,
        args=args,
        saveat=saveat,
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=len(grid),
    )
    values = jax.vmap(sol.evaluate)(ts_dense)
    derivatives = jax.vmap(sol.derivative)(ts_dense)
    return sol.ys, values, derivatives


@functools.cache
def _reference(name):
    window_ends = np.linspace(T0, T1, 5)
    grid = _inner_grid(np.array([T0, T1]), NUM_INNER)
    return _solve_sequential(
        EXPLICIT_SOLVERS[name](), grid, _Y0, _ARGS, _TS_DENSE, window_ends
    )


@pytest.mark.parametrize("num_windows", [1, 4])
@pytest.mark.parametrize("name", list(EXPLICIT_SOLVERS))
def test_explicit_solvers(name, num_windows):
    solver = partime.ParallelSolver(
        EXPLICIT_SOLVERS[name](), num_steps=NUM_INNER // num_windows
    )
    dt0 = (T1 - T0) / num_windows
    ys, step_ts, values, derivatives, state, result = _solve_parallel(
        solver, dt0, _Y0, _ARGS, _TS_DENSE
    )
    assert result == diffrax.RESULTS.successful
    (ref_ys, ref_window_ys), ref_values, ref_derivatives = _reference(name)
    # SaveAt(t0, t1, ts): t0, the ts, then t1.
    _assert_close(ys[0], ref_ys, RTOL_Y)
    # SaveAt(steps=True): window ends only.
    window_ends = np.linspace(T0, T1, num_windows + 1)
    _assert_close(step_ts[:num_windows], window_ends[1:], 1e-12)
    assert np.all(np.isinf(np.asarray(step_ts[num_windows:])))
    stride = 4 // num_windows
    _assert_close(ys[1][:num_windows], ref_window_ys[stride::stride], RTOL_Y)
    # SaveAt(dense=True): the inner solver's own interpolation, between inner steps.
    _assert_close(values, ref_values, RTOL_Y)
    _assert_close(derivatives, ref_derivatives, RTOL_Y)
    _assert_well_behaved(state, num_windows)


def test_sliding_window():
    """`window=` iterates on a window of inner steps that slides through each diffrax
    step: the same answer and gradients as sequential diffrax."""
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=NUM_INNER, window=8)
    ys, _, values, _, state, result = _solve_parallel(
        solver, T1 - T0, _Y0, _ARGS, _TS_DENSE
    )
    assert result == diffrax.RESULTS.successful
    (ref_ys, _), ref_values, _ = _reference("tsit5")
    _assert_close(ys[0], ref_ys, RTOL_Y)
    _assert_close(values, ref_values, RTOL_Y)
    assert int(state.num_fallbacks) == 0

    inputs = (_Y0, _ARG, _FIELD, _CLOSED)
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=NUM_INNER // 2, window=8)
    loss = functools.partial(
        _loss, solver=solver, dt0=(T1 - T0) / 2, grid=None,
        adjoint=diffrax.RecursiveCheckpointAdjoint(),
    )  # fmt: skip
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(*inputs)
    kwargs = dict(solver_name="tsit5", adjoint_name="recursive_checkpoint")
    expected = _gradient(*inputs, parallel=False, **kwargs)
    _assert_close(grads, expected, RTOL_GRAD, atol=1e-9)


@pytest.mark.parametrize("window", [0, -2, 2.5, True])
def test_bad_window(window):
    with pytest.raises(ValueError, match="window"):
        partime.ParallelSolver(window=window)


def test_other_method():
    # The methods themselves are tested with the core; check that one other than
    # Newton plugs in.
    method = partime.QuasiNewton()
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=10, method=method)
    ys, _, values, _, state, result = _solve_parallel(
        solver, (T1 - T0) / 4, _Y0, _ARGS, _TS_DENSE
    )
    assert result == diffrax.RESULTS.successful
    (ref_ys, _), ref_values, _ = _reference("tsit5")
    _assert_close(ys[0], ref_ys, RTOL_Y)
    _assert_close(values, ref_values, RTOL_Y)


#
# Step size controllers, PyTrees, direction, transformations.
#


@eqx.filter_jit
def _solve(solver, t0, t1, dt0, y0, args=_ARGS, *, term=_TERM, **kwargs):
    kwargs.setdefault("saveat", diffrax.SaveAt(ts=_TS_SAVE, solver_state=True))
    return diffrax.diffeqsolve(term, solver, t0, t1, dt0, y0, args=args, **kwargs)


def _solve_on_grid(solver, grid, y0, args=_ARGS, term=_TERM, ts=_TS_SAVE):
    return _solve(
        solver,
        grid[0],
        grid[-1],
        None,
        y0,
        args,
        term=term,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=len(grid),
    )


_SAVEAT_TS_STEPS = diffrax.SaveAt(
    subs=[diffrax.SubSaveAt(ts=_TS_SAVE), diffrax.SubSaveAt(steps=True)],
    solver_state=True,
)


def test_warm_start_guess():
    """`guess=`: the previous trajectory as the first iterate of every window. The
    same answer; from an exact guess, no more than one iteration per window. A
    useless guess is ignored (the constant or coarse guess fits better)."""
    grid = _inner_grid(np.linspace(T0, T1, 3), 20)
    reference = _solve_on_grid(diffrax.Tsit5(), grid, _Y0, ts=grid)
    previous = diffrax.LinearInterpolation(ts=grid, ys=reference.ys)
    useless = lambda t: jnp.full(3, 1e3)
    for guess, bound in ((previous.evaluate, 2), (useless, 16)):
        solver = partime.ParallelSolver(
            diffrax.Tsit5(), num_steps=20, coarse_steps=0, guess=guess
        )
        sol = _solve(solver, T0, T1, (T1 - T0) / 2, _Y0)
        assert sol.result == diffrax.RESULTS.successful
        _assert_close(sol.ys, _solve_on_grid(diffrax.Tsit5(), grid, _Y0).ys, RTOL_Y)
        assert int(sol.solver_state.num_fallbacks) == 0
        assert int(sol.solver_state.num_iterations) <= bound
    with pytest.raises(TypeError, match="guess"):
        partime.ParallelSolver(guess=np.ones(3))


def test_constant_step_size_uneven():
    # dt0 does not divide the horizon: the last window is shorter.
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=8)
    sol = _solve(
        solver,
        T0,
        T1,
        0.7,
        _Y0,
        saveat=_SAVEAT_TS_STEPS,
        max_steps=MAX_STEPS,
    )
    # diffrax's own window ends: it evens out the last two steps.
    assert int(sol.stats["num_accepted_steps"]) == 3
    window_ends = np.concatenate([[T0], np.asarray(sol.ts[1][:3])])
    assert window_ends[1] == 0.7 and window_ends[-1] == T1
    ref = _solve_on_grid(diffrax.Tsit5(), _inner_grid(window_ends, 8), _Y0)
    _assert_close(sol.ys[0], ref.ys, RTOL_Y)
    _assert_well_behaved(sol.solver_state, 3)


def test_step_to():
    window_ends = np.array([T0, 0.3, 1.1, T1])
    # `coarse_steps=0`: the iteration starts from the constant guess.
    solver = partime.ParallelSolver(diffrax.Dopri5(), num_steps=12, coarse_steps=0)
    sol = _solve(
        solver,
        T0,
        T1,
        None,
        _Y0,
        stepsize_controller=diffrax.StepTo(ts=window_ends),
        max_steps=MAX_STEPS,
    )
    ref = _solve_on_grid(diffrax.Dopri5(), _inner_grid(window_ends, 12), _Y0)
    _assert_close(sol.ys, ref.ys, RTOL_Y)
    _assert_well_behaved(sol.solver_state, 3)


def test_adaptive_windows():
    # The window error estimate drives a PID controller; compare on the inner grid of
    # the windows it accepted.
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=10)
    sol = _solve(
        solver,
        T0,
        T1,
        0.5,
        _Y0,
        saveat=_SAVEAT_TS_STEPS,
        stepsize_controller=diffrax.PIDController(rtol=1e-7, atol=1e-7),
        max_steps=64,
    )
    num_windows = int(sol.stats["num_accepted_steps"])
    assert num_windows > 1
    window_ends = np.concatenate([[T0], np.asarray(sol.ts[1][:num_windows])])
    ref = _solve_on_grid(diffrax.Tsit5(), _inner_grid(window_ends, 10), _Y0)
    _assert_close(sol.ys[0], ref.ys, RTOL_Y)
    _assert_well_behaved(sol.solver_state, num_windows)


def test_unstable_coarse_guess():
    # Stiff enough that the coarse prediction (10 steps of 0.2) blows up while the
    # inner steps (0.02) are stable: the solver must notice and start from `y0`.
    term = diffrax.ODETerm(lambda t, y, args: -50.0 * (y - jnp.cos(t)))
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=100)
    sol = _solve(solver, T0, T1, T1 - T0, _Y0, term=term)
    grid = _inner_grid(np.array([T0, T1]), 100)
    ref = _solve_on_grid(diffrax.Tsit5(), grid, _Y0, term=term)
    _assert_close(sol.ys, ref.ys, RTOL_Y)
    _assert_well_behaved(sol.solver_state, 1, max_iters_per_window=4)


def _pytree_vf(t, y, args):
    x, (z,) = y["x"], y["z"]
    return {"x": -x + jnp.cos(t) * z, "z": (-args * z * x.sum(),)}


def test_pytree_y0():
    term = diffrax.ODETerm(_pytree_vf)
    y0 = {"x": np.array([1.0, 2.0]), "z": (np.array(0.5),)}
    solver = partime.ParallelSolver(diffrax.Heun(), num_steps=10)
    sol = _solve(solver, T0, T1, (T1 - T0) / 4, y0, 0.3, term=term)
    grid = _inner_grid(np.linspace(T0, T1, 5), 10)
    ref = _solve_on_grid(diffrax.Heun(), grid, y0, 0.3, term=term)
    assert jax.tree_util.tree_structure(sol.ys) == jax.tree_util.tree_structure(ref.ys)
    _assert_close(sol.ys, ref.ys, RTOL_Y)
    _assert_well_behaved(sol.solver_state, 4)


def test_backwards():
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=10)
    ts = _TS_SAVE[::-1]
    sol = _solve(
        solver,
        T1,
        T0,
        -(T1 - T0) / 4,
        _Y0,
        saveat=diffrax.SaveAt(ts=ts, solver_state=True),
    )
    grid = _inner_grid(np.linspace(T1, T0, 5), 10)
    ref = _solve_on_grid(diffrax.Tsit5(), grid, _Y0, ts=ts)
    _assert_close(sol.ts, ts, 1e-12)
    _assert_close(sol.ys, ref.ys, RTOL_Y)
    _assert_well_behaved(sol.solver_state, 4)


def test_jit_vmap():
    # `jax.jit` (not only `eqx.filter_jit`) with traced times, around `jax.vmap`.
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=20)

    @jax.jit
    def run(t1, y0s):
        def solve(y0):
            sol = diffrax.diffeqsolve(
                _TERM,
                solver,
                T0,
                t1,
                t1 / 2,
                y0,
                args=_ARGS,
                saveat=diffrax.SaveAt(ts=_TS_SAVE, solver_state=True),
            )
            return sol.ys, sol.solver_state

        return jax.vmap(solve)(y0s)

    y0s = np.stack([_Y0, 2 * _Y0, -_Y0])
    ys, state = run(T1, y0s)
    grid = _inner_grid(np.linspace(T0, T1, 3), 20)
    ref = jax.vmap(lambda y0: _solve_on_grid(diffrax.Tsit5(), grid, y0))(y0s)
    _assert_close(ys, ref.ys, RTOL_Y)
    assert np.all(np.asarray(state.num_fallbacks) == 0)
    assert np.all(np.asarray(state.num_iterations) <= 16)


def test_jit_no_retrace():
    # The interpolation class has a stable identity, so repeated solves reuse the
    # compiled function (`DenseInterpolation` keeps the class as a static field).
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=10)
    assert solver.interpolation_cls is partime.ParallelSolver().interpolation_cls
    assert (
        partime.ParallelSolver(diffrax.Bosh3()).interpolation_cls
        is partime.ParallelSolver(diffrax.Bosh3()).interpolation_cls
    )


#
# Gradients.
#


class _Field(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, t, y, args):
        return jnp.tanh(self.weight @ y + self.bias) - args * y


_FIELD = _Field(
    weight=np.array([[0.3, -0.5, 0.1], [0.2, 0.1, -0.4], [-0.3, 0.4, 0.2]]),
    bias=np.array([0.1, -0.2, 0.05]),
)
_CLOSED = np.array([0.5, -0.3, 0.2])
_ARG = np.array([1.0, 0.6, 1.3])
_GRAD_TS = np.array([0.35, 1.0, 1.55, T1])  # interior points: through dense output

ADJOINTS = {
    "recursive_checkpoint": diffrax.RecursiveCheckpointAdjoint,
    "direct": diffrax.DirectAdjoint,
    "forward_mode": diffrax.ForwardMode,
}
GRAD_SOLVERS = {"tsit5": diffrax.Tsit5, "euler": diffrax.Euler}


def _loss(y0, args, field, closed, *, solver, adjoint, dt0, grid):
    # `closed` reaches the vector field only through a Python closure.
    term = diffrax.ODETerm(lambda t, y, a: field(t, y, a) + closed * jnp.cos(t))
    stepsize_controller = (
        diffrax.ConstantStepSize() if grid is None else diffrax.StepTo(ts=grid)
    )
    sol = diffrax.diffeqsolve(
        term,
        solver,
        T0,
        T1,
        dt0,
        y0,
        args=args,
        adjoint=adjoint,
        saveat=diffrax.SaveAt(ts=_GRAD_TS),
        stepsize_controller=stepsize_controller,
        max_steps=NUM_INNER + 1,
    )
    return jnp.sum(sol.ys**2 * jnp.arange(1.0, 4.0)[None]) + jnp.sum(jnp.sin(sol.ys))


@functools.partial(jax.jit, static_argnames=("solver_name", "adjoint_name", "parallel"))
def _gradient(y0, args, field, closed, *, solver_name, adjoint_name, parallel):
    inner = GRAD_SOLVERS[solver_name]()
    if parallel:
        solver = partime.ParallelSolver(inner, num_steps=NUM_INNER // 2)
        loss = functools.partial(
            _loss, solver=solver, dt0=(T1 - T0) / 2, grid=None,
            adjoint=ADJOINTS[adjoint_name](),
        )  # fmt: skip
    else:
        grid = _inner_grid(np.linspace(T0, T1, 3), NUM_INNER // 2)
        loss = functools.partial(
            _loss, solver=inner, dt0=None, grid=grid, adjoint=ADJOINTS[adjoint_name]()
        )
    if adjoint_name == "forward_mode":
        derivative = jax.jacfwd
    else:
        derivative = jax.grad
    return derivative(loss, argnums=(0, 1, 2, 3))(y0, args, field, closed)


@pytest.mark.parametrize(
    "solver_name, adjoint_name",
    [
        ("tsit5", "recursive_checkpoint"),
        ("tsit5", "direct"),
        ("tsit5", "forward_mode"),
        # Euler goes through diffrax's own `step` inside the iteration (see `_solver`).
        ("euler", "recursive_checkpoint"),
    ],
)
def test_gradients(solver_name, adjoint_name):
    inputs = (_Y0, _ARG, _FIELD, _CLOSED)
    kwargs = dict(solver_name=solver_name, adjoint_name=adjoint_name)
    grads = _gradient(*inputs, parallel=True, **kwargs)
    ref_grads = _gradient(*inputs, parallel=False, **kwargs)
    _assert_close(grads, ref_grads, RTOL_GRAD, atol=1e-9)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.asarray(g) != 0)


@functools.partial(jax.jit, static_argnames=("adjoint_name", "parallel", "save"))
def _one_window_gradient(y0, args, field, closed, *, adjoint_name, parallel, save):
    """The gradient over one window (`max_steps=1`: solved by `init`), against
    sequential diffrax on its inner grid; `save="ts"` reads the window's
    interpolation, `"t1"` its end only."""
    saveat = diffrax.SaveAt(ts=_GRAD_TS) if save == "ts" else diffrax.SaveAt(t1=True)
    if parallel:
        solver, dt0, grid, max_steps = (
            partime.ParallelSolver(diffrax.Tsit5(), num_steps=NUM_INNER), T1 - T0,
            None, 1,
        )  # fmt: skip
    else:
        solver, dt0 = diffrax.Tsit5(), None
        grid = _inner_grid(np.array([T0, T1]), NUM_INNER)
        max_steps = NUM_INNER

    def loss(y0, args, field, closed):
        term = diffrax.ODETerm(lambda t, y, a: field(t, y, a) + closed * jnp.cos(t))
        controller = (
            diffrax.ConstantStepSize() if grid is None else diffrax.StepTo(ts=grid)
        )
        sol = diffrax.diffeqsolve(
            term, solver, T0, T1, dt0, y0, args=args, adjoint=ADJOINTS[adjoint_name](),
            saveat=saveat, stepsize_controller=controller, max_steps=max_steps,
        )  # fmt: skip
        return jnp.sum(sol.ys**2 * jnp.arange(1.0, 4.0)[None]) + jnp.sum(
            jnp.sin(sol.ys)
        )

    derivative = jax.jacfwd if adjoint_name == "forward_mode" else jax.grad
    inputs = (y0, args, field, closed)
    return loss(*inputs), derivative(loss, argnums=(0, 1, 2, 3))(*inputs)


@pytest.mark.parametrize(
    "adjoint_name, save",
    [
        ("recursive_checkpoint", "ts"),
        ("recursive_checkpoint", "t1"),
        ("direct", "t1"),
        ("forward_mode", "ts"),
    ],
)
def test_one_window_gradients(adjoint_name, save):
    """With `max_steps=1` the window is solved by `init`, outside diffrax's loop:
    values and gradients still equal sequential diffrax's, whichever adjoint, through
    the window's end and through its interpolation."""
    inputs = (_Y0, _ARG, _FIELD, _CLOSED)
    kwargs = dict(adjoint_name=adjoint_name, save=save)
    value, grads = _one_window_gradient(*inputs, parallel=True, **kwargs)
    ref_value, ref_grads = _one_window_gradient(*inputs, parallel=False, **kwargs)
    _assert_close(value, ref_value, RTOL_Y)
    _assert_close(grads, ref_grads, RTOL_GRAD, atol=1e-9)
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.asarray(g) != 0)


def test_one_window_solved_once():
    """With `max_steps=1` and diffrax's default adjoint, the backward pass does not
    solve the window again: the vector field runs as often as with `DirectAdjoint`
    (whose backward pass differentiates the forward's solve), where with
    `max_steps=2` the default adjoint re-solves the window from its checkpoint."""
    calls = []

    def field(t, y, args):
        jax.debug.callback(lambda: calls.append(None))
        return -args * y + jnp.sin(t)

    solver = partime.ParallelSolver(diffrax.Euler(), num_steps=8)

    def count(adjoint, max_steps):
        def loss(a):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(field), solver, 0.0, 1.0, 1.0, jnp.ones(2), args=a,
                adjoint=adjoint, max_steps=max_steps,
            )  # fmt: skip
            return jnp.sum(sol.ys)

        grad = jax.jit(jax.grad(loss))
        jax.block_until_ready(grad(0.5))
        calls.clear()
        jax.block_until_ready(grad(0.5))
        return len(calls)

    once = count(diffrax.RecursiveCheckpointAdjoint(), 1)
    assert once > 0
    assert once == count(diffrax.DirectAdjoint(), 1)
    assert count(diffrax.RecursiveCheckpointAdjoint(), 2) > once


def test_one_window_foreign_state():
    """With `max_steps=1` the step reads the window `init` solved: a solver state
    passed in from another solve (whose window was read) is refused, not read."""
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=10)
    solve = functools.partial(
        diffrax.diffeqsolve, _TERM, solver, T0, T1, T1 - T0, _Y0, args=_ARGS,
        max_steps=1, saveat=diffrax.SaveAt(t1=True, solver_state=True),
    )  # fmt: skip
    first = solve()
    assert first.solver_state.first_window is not None
    with pytest.raises(Exception, match="another solve"):
        solve(solver_state=first.solver_state)
    two = solve(max_steps=2)
    assert two.solver_state.first_window is None
    _assert_close(two.ys, first.ys, RTOL_Y)


def test_second_order():
    """Hessian-vector products (forward over reverse, with `DirectAdjoint`, which
    allows it on both sides) equal sequential diffrax's."""
    inputs = (_Y0, _ARG, _FIELD, _CLOSED)
    tangents = jax.tree.map(np.ones_like, inputs)

    def hvp(parallel):
        fn = lambda *a: _gradient(
            *a, solver_name="tsit5", adjoint_name="direct", parallel=parallel
        )
        return jax.jit(lambda x, t: jax.jvp(fn, x, t)[1])(inputs, tangents)

    got, expected = hvp(True), hvp(False)
    _assert_close(got, expected, RTOL_GRAD, atol=1e-9)
    assert all(np.any(np.asarray(g) != 0) for g in jax.tree_util.tree_leaves(got))


def test_backsolve_adjoint_rejected():
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=10)
    loss = functools.partial(
        _loss, solver=solver, adjoint=diffrax.BacksolveAdjoint(), dt0=T1, grid=None
    )
    with pytest.raises(ValueError, match="RecursiveCheckpointAdjoint"):
        # Tracing is enough: the backward solve is traced with the forward one.
        jax.eval_shape(jax.grad(loss), _Y0, _ARG, _FIELD, _CLOSED)


#
# Statistics and failures.
#


def test_fallback_is_counted():
    # From the constant guess, one iteration per window cannot converge: every window
    # falls back to sequential stepping, and the answer is still the exact one.
    method = partime.Newton(max_iters=1)
    solver = partime.ParallelSolver(
        diffrax.Tsit5(), num_steps=10, method=method, coarse_steps=0
    )
    sol = _solve(solver, T0, T1, (T1 - T0) / 4, _Y0)
    assert sol.result == diffrax.RESULTS.successful
    assert int(sol.solver_state.num_fallbacks) == 4
    # At least one step per window, at most all 40, by the fallback; whole windows.
    assert 4 <= int(sol.solver_state.num_sequential_steps) <= 40
    assert int(sol.solver_state.window) == 10
    grid = _inner_grid(np.linspace(T0, T1, 5), 10)
    _assert_close(sol.ys, _solve_on_grid(diffrax.Tsit5(), grid, _Y0).ys, RTOL_Y)


def test_nan_y0():
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=10)
    y0 = np.array([1.0, np.nan, 0.3])
    sol = _solve(solver, T0, T1, (T1 - T0) / 4, y0, throw=False)
    # With `throw=True` (the default), diffrax raises this message.
    assert sol.result == diffrax.RESULTS.nonfinite
    assert "Nonfinite" in diffrax.RESULTS[diffrax.RESULTS.nonfinite]


@pytest.mark.parametrize("num_steps", [0, -3, 2.5, True, None])
def test_bad_num_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps"):
        partime.ParallelSolver(num_steps=num_steps)


@pytest.mark.parametrize("coarse_steps", [-1, 2.5, True])
def test_bad_coarse_steps(coarse_steps):
    with pytest.raises(ValueError, match="coarse_steps"):
        partime.ParallelSolver(coarse_steps=coarse_steps)


@pytest.mark.parametrize(
    "solver, match",
    [
        (diffrax.KenCarp4(), "IMEX"),
        (diffrax.ReversibleHeun(), "carries information"),
        (diffrax.LeapfrogMidpoint(), "carries information"),
        (partime.ParallelSolver(), "cannot wrap"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, str) else x,
)
def test_unsupported_solver(solver, match):
    with pytest.raises(ValueError, match=match):
        partime.ParallelSolver(solver)


def test_bad_types():
    with pytest.raises(TypeError, match="diffrax solver"):
        partime.ParallelSolver("tsit5")
    with pytest.raises(TypeError, match="partime method"):
        partime.ParallelSolver(method="newton")


def test_markers():
    # diffrax decides Itô vs Stratonovich by `isinstance`: carry the inner marker.
    euler = partime.ParallelSolver(diffrax.Euler())
    heun = partime.ParallelSolver(diffrax.Heun())
    tsit5 = partime.ParallelSolver()
    for solver in (euler, heun, tsit5):
        assert isinstance(solver, partime.ParallelSolver)
        assert isinstance(solver, diffrax.AbstractAdaptiveSolver)
        assert not isinstance(solver, diffrax.AbstractWrappedSolver)
    assert isinstance(euler, diffrax.AbstractItoSolver)
    assert not isinstance(euler, diffrax.AbstractStratonovichSolver)
    assert isinstance(heun, diffrax.AbstractStratonovichSolver)
    assert not isinstance(heun, diffrax.AbstractItoSolver)
    assert not isinstance(
        tsit5, (diffrax.AbstractItoSolver, diffrax.AbstractStratonovichSolver)
    )
    assert isinstance(tsit5.solver, diffrax.Tsit5)
    assert isinstance(tsit5.method, partime.Newton)
    assert tsit5.num_steps == 100
    # A rebuilt solver (e.g. `eqx.tree_at`) keeps its class and marker.
    rebuilt = eqx.tree_at(lambda s: s.method, euler, partime.Picard())
    assert type(rebuilt) is type(euler)


def _lorenz_vf(t, y, args):
    return jnp.stack(
        [10 * (y[1] - y[0]), y[0] * (28 - y[2]) - y[1], y[0] * y[1] - 8 / 3 * y[2]]
    )


def _damped_pendulum_vf(t, y, args):
    return jnp.stack([y[1], -jnp.sin(y[0]) - 0.5 * y[1]])


def _qr_lyapunov(vf, y0, t1, num_steps):
    """Independent: the largest Lyapunov exponent per unit time along sequential
    RK4 (`lax.scan`), from the QR re-orthonormalised product of its Jacobians."""
    h = t1 / num_steps

    def rk4(y):
        k1 = vf(0.0, y, None)
        k2 = vf(0.0, y + h / 2 * k1, None)
        k3 = vf(0.0, y + h / 2 * k2, None)
        k4 = vf(0.0, y + h * k3, None)
        return y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)

    def body(carry, _):
        y, q, total = carry
        q, r = jnp.linalg.qr(jax.jacfwd(rk4)(y) @ q)
        return (rk4(y), q, total + jnp.log(jnp.abs(jnp.diag(r)))), None

    size = len(y0)
    start = (jnp.asarray(y0), jnp.eye(size), jnp.zeros(size))
    (_, _, total), _ = jax.lax.scan(body, start, length=num_steps)
    return float(jnp.max(total)) / t1


@pytest.mark.parametrize("problem", ["lorenz", "damped-pendulum"])
def test_lyapunov_and_chaos(problem):
    """`ParallelSolverState.lyapunov` has the sign of an independent QR estimate;
    the chaotic window (Lorenz-63 over 20 time units) goes to the sequential
    fallback with no iteration, and both equal sequential diffrax on the grid. With
    the automatic window (the default on accelerators): the chaos test keeps
    Lorenz out of it, and the predictable window runs as on the whole window."""
    vf, y0 = {
        "lorenz": (_lorenz_vf, np.array([1.0, 1.0, 1.0])),
        "damped-pendulum": (_damped_pendulum_vf, np.array([2.5, 0.0])),
    }[problem]
    t1, num_steps = 20.0, 2000
    term = diffrax.ODETerm(vf)
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=num_steps, window="auto")
    ts = np.linspace(0.0, t1, 41)
    sol = _solve(
        solver,
        0.0,
        t1,
        t1,
        y0,
        None,
        term=term,
        saveat=diffrax.SaveAt(ts=ts, solver_state=True),
    )
    grid = _inner_grid(np.array([0.0, t1]), num_steps)
    ref = _solve_on_grid(diffrax.Tsit5(), grid, y0, None, term=term, ts=ts)
    # Lorenz amplifies rounding differences by e^{λ·20} ≈ e^{18}.
    _assert_close(sol.ys, ref.ys, 1e-7 if problem == "lorenz" else RTOL_Y)
    state = sol.solver_state
    reference = _qr_lyapunov(vf, y0, t1, num_steps)
    assert np.sign(float(state.lyapunov)) == np.sign(reference)
    if problem == "lorenz":
        assert reference > 0.3
        assert int(state.num_iterations) == 0 and int(state.num_fallbacks) == 1
    else:
        assert reference < -0.1
        _assert_well_behaved(state, 1)


def _van_der_pol_vf(t, y, args):
    return jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


@pytest.fixture(scope="module")
def automatic_window_case():
    """Van der Pol (μ = 1) over 100 time units, about 15 periods, in 2000 Tsit5 steps:
    neutral. The automatic window, the default (on a CPU: the whole window) and the
    whole window (`window = num_steps`, which iterates on every step until it gives
    up), and sequential diffrax on the same grid."""
    t1, num_steps, y0 = 100.0, 2000, np.array([2.0, 0.0])
    term = diffrax.ODETerm(_van_der_pol_vf)
    ts = np.linspace(0.0, t1, 41)
    saveat = diffrax.SaveAt(ts=ts, solver_state=True)
    states = {}
    for window in ("auto", None, num_steps):
        solver = partime.ParallelSolver(num_steps=num_steps, window=window)
        states[window] = _solve(solver, 0.0, t1, t1, y0, None, term=term, saveat=saveat)
    grid = _inner_grid(np.array([0.0, t1]), num_steps)
    ref = _solve_on_grid(diffrax.Tsit5(), grid, y0, None, term=term, ts=ts)
    return num_steps, states, ref


def test_automatic_window_neutral(automatic_window_case):
    """The whole window gives up and falls back; the automatic window narrows
    instead, converges without the fallback, and equals sequential diffrax. (The
    chaotic and predictable cases: `test_lyapunov_and_chaos`.) The default is the
    automatic window off a CPU, the whole window on one."""
    num_steps, states, ref = automatic_window_case
    auto, whole = states["auto"], states[num_steps]
    default = states["auto" if jax.default_backend() != "cpu" else num_steps]
    assert int(whole.solver_state.num_fallbacks) == 1
    assert 0 < int(whole.solver_state.num_sequential_steps) <= num_steps
    assert int(whole.solver_state.window) == num_steps
    _assert_close(whole.ys, ref.ys, RTOL_Y)
    for name in ("num_iterations", "num_fallbacks"):
        assert int(getattr(states[None].solver_state, name)) == int(
            getattr(default.solver_state, name)
        )
    np.testing.assert_array_equal(states[None].ys, default.ys)
    _assert_close(auto.ys, ref.ys, RTOL_Y)
    assert int(auto.solver_state.num_fallbacks) == 0
    assert int(auto.solver_state.num_sequential_steps) == 0
    # It narrowed (the whole window gave up), at most to `num_steps / 64`, to windows
    # that converge in at most 10 iterations each: `iterations / (T / width)`.
    width = int(auto.solver_state.window)
    assert num_steps // 64 <= width < num_steps
    assert int(auto.solver_state.num_iterations) * width <= 10 * num_steps
    # Parallel: on average more than 10 steps settle per iteration.
    assert 0 < int(auto.solver_state.num_iterations) < num_steps // 10
