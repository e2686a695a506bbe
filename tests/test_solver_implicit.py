"""`partime.ParallelSolver` with implicit inner solvers, against sequential diffrax on
the same inner grid (float64).

Each inner step runs its own root finder (the inner solver as a black box), so both
sides are given the same tight root finder, and agree to its tolerance."""

import functools

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
import pytest

import partime
from partime._window_interpolation import inner_grid as _inner_grid


# Newton rather than diffrax's default `VeryChord`: at tolerances this tight, the
# chord iteration's divergence test trips on rounding error in stiff problems.
_ROOT_FINDER = optx.Newton(rtol=1e-10, atol=1e-10)
_A = np.array([[-1000.0, 1.0, 0.0], [0.5, -20.0, 0.1], [0.0, 2.0, -0.5]])


def _linear(t, y, args):
    return _A @ y + jnp.cos(t) * args


def _van_der_pol(t, y, mu):
    x, v = y
    return jnp.stack([v, mu * ((1 - x**2) * v - x)])


def _robertson(t, y, args):
    k1, k2, k3 = args
    y1, y2, y3 = y
    return jnp.stack(
        [
            -k1 * y1 + k3 * y2 * y3,
            k1 * y1 - k2 * y2**2 - k3 * y2 * y3,
            k2 * y2**2,
        ]
    )


PROBLEMS = {
    # (vector field, y0, args, t1)
    "linear": (_linear, np.array([1.0, -1.0, 2.0]), np.array([1.0, 0.0, 0.5]), 0.2),
    "van_der_pol": (_van_der_pol, np.array([2.0, 0.0]), 1000.0, 0.1),
    # Rates over nine orders of magnitude; the fastest time scale (~5e-4) < a step.
    "robertson": (
        _robertson,
        np.array([1.0, 0.0, 0.0]),
        np.array([0.04, 3e7, 1e4]),
        0.01,
    ),
}
SOLVERS = {
    "implicit_euler": diffrax.ImplicitEuler,
    "kvaerno3": diffrax.Kvaerno3,
    "kvaerno4": diffrax.Kvaerno4,
    "kvaerno5": diffrax.Kvaerno5,
}
NUM_STEPS = 10
# Bit for bit the times the parallel solver steps to.
_GRIDS = {
    name: np.asarray(_inner_grid(0.0, t1, NUM_STEPS))
    for name, (_, _, _, t1) in PROBLEMS.items()
}


@functools.partial(jax.jit, static_argnames=("problem", "name", "parallel"))
def _solve(y0, args, *, problem, name, parallel):
    vf, _, _, t1 = PROBLEMS[problem]
    inner = SOLVERS[name](root_finder=_ROOT_FINDER)
    if parallel:
        solver = partime.ParallelSolver(inner, num_steps=NUM_STEPS)
        dt0, controller = t1, diffrax.ConstantStepSize()
    else:
        solver = SOLVERS[name](root_finder=_ROOT_FINDER)
        dt0, controller = None, diffrax.StepTo(ts=_GRIDS[problem])
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        solver,
        0.0,
        t1,
        dt0,
        y0,
        args=args,
        saveat=diffrax.SaveAt(ts=np.linspace(0.0, t1, 6)),
        stepsize_controller=controller,
        max_steps=NUM_STEPS,
    )
    return sol.ys


def _assert_close(x, y, rtol):
    assert np.all(np.isfinite(np.asarray(x)))
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=rtol)


@pytest.mark.parametrize(
    "problem, name",
    [
        ("linear", "implicit_euler"),
        ("linear", "kvaerno3"),
        ("van_der_pol", "kvaerno5"),
        ("robertson", "kvaerno4"),
        ("robertson", "kvaerno5"),
    ],
)
def test_implicit_solvers(problem, name):
    _, y0, args, _ = PROBLEMS[problem]
    ys = _solve(y0, args, problem=problem, name=name, parallel=True)
    ref = _solve(y0, args, problem=problem, name=name, parallel=False)
    # To the root finder's tolerance.
    _assert_close(ys, ref, 1e-8)


@pytest.mark.parametrize("name", SOLVERS)
def test_implicit_marker(name):
    # As the inner solver: `diffeqsolve` treats the wrapper as implicit.
    solver = partime.ParallelSolver(SOLVERS[name]())
    assert isinstance(solver, diffrax.AbstractImplicitSolver)
    assert solver.root_finder is solver.solver.root_finder
    assert not isinstance(
        partime.ParallelSolver(diffrax.Tsit5()), diffrax.AbstractImplicitSolver
    )


def test_default_root_finder_tolerances_refused_with_constant_steps():
    # diffrax's own error, as for `Kvaerno5()` with a constant step size.
    vf, y0, args, t1 = PROBLEMS["linear"]
    with pytest.raises(ValueError, match="tolerances for the implicit solver"):
        diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            partime.ParallelSolver(diffrax.Kvaerno5(), num_steps=NUM_STEPS),
            0.0,
            t1,
            t1,
            y0,
            args=args,
        )
    # Stepped outside `diffeqsolve`, nothing fills them: refused too.
    solver = partime.ParallelSolver(diffrax.Kvaerno5(), num_steps=NUM_STEPS)
    term = diffrax.ODETerm(vf)
    state = solver.init(term, 0.0, t1, jnp.asarray(y0), args)
    with pytest.raises(ValueError, match="tolerances for the implicit solver"):
        solver.step(term, 0.0, t1, jnp.asarray(y0), args, state, made_jump=False)


def test_root_finder_tolerances_from_adaptive_controller():
    # The stiff example of diffrax's documentation, with only the solver swapped:
    # `Kvaerno5()` takes its root finder's tolerances from the `PIDController`.
    # The same inner steps, sequentially, with those tolerances set explicitly
    # (`VeryChord`'s norm is the controller's, `rms_norm`), give the same answer.
    vf, y0, args, t1 = PROBLEMS["robertson"]
    rtol = atol = 1e-8
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        partime.ParallelSolver(diffrax.Kvaerno5(), num_steps=NUM_STEPS),
        0.0,
        t1,
        t1 / 4,
        y0,
        args=args,
        saveat=diffrax.SaveAt(steps=True),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=64,
    )
    num_windows = int(sol.stats["num_accepted_steps"])
    ends = np.asarray(sol.ts[:num_windows])
    starts = np.concatenate([[0.0], ends[:-1]])
    grid = np.concatenate(
        [[0.0]]
        + [np.asarray(_inner_grid(a, b, NUM_STEPS))[1:] for a, b in zip(starts, ends)]
    )
    root_finder = diffrax.VeryChord(rtol=rtol, atol=atol, norm=optx.rms_norm)
    ref = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        diffrax.Kvaerno5(root_finder=root_finder),
        0.0,
        t1,
        None,
        y0,
        args=args,
        saveat=diffrax.SaveAt(ts=ends),
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=len(grid),
    )
    _assert_close(sol.ys[:num_windows], ref.ys, 1e-9)


def _loss(y0, args, **kwargs):
    return jnp.sum(_solve(y0, args, **kwargs) ** 2)


_grad = jax.jit(
    jax.grad(_loss, argnums=(0, 1)),
    static_argnames=("problem", "name", "parallel"),
)


def test_implicit_gradients():
    # Through each inner step's root find by implicit differentiation.
    _, y0, args, _ = PROBLEMS["linear"]
    kwargs = dict(problem="linear", name="kvaerno3")
    grads = _grad(y0, args, parallel=True, **kwargs)
    ref = _grad(y0, args, parallel=False, **kwargs)
    for g, r in zip(grads, ref):
        _assert_close(g, r, 1e-6)
        assert np.all(np.asarray(g) != 0)
