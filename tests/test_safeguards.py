"""Safeguards of the fixed-point loop, for every method: never NaN, never a wrong
answer reported as a success; convergence (with an iteration bound) where the method
gets there, the exact sequential fallback where it does not, and an early stop when
the iteration is hopeless."""

import math

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import partime
from partime._window_interpolation import inner_grid as _inner_grid

from .helpers import max_rel_error


METHODS = {
    "Newton": partime.Newton(),
    "QuasiNewton": partime.QuasiNewton(),
    "Picard": partime.Picard(),
    "Jacobi": partime.Jacobi(),
    "ELK": partime.ELK(),
    "QuasiELK": partime.QuasiELK(),
}


def _rk4(vector_field, h):
    def step(y, t):
        k1 = vector_field(y)
        k2 = vector_field(y + h / 2 * k1)
        k3 = vector_field(y + h / 2 * k2)
        k4 = vector_field(y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y, y[0]

    return step


def _van_der_pol(mu):
    def vector_field(y):
        x, v = y
        return jnp.stack([v, mu * (1 - x**2) * v - x])

    return vector_field


def _lorenz(y):
    x, yy, z = y
    return jnp.stack([10 * (yy - x), x * (28 - z) - yy, x * yy - 8 / 3 * z])


def _rnn(gain, size=8, length=1000, input_scale=1.0):
    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    weights = jr.normal(k1, (size, size)) / size**0.5
    weights = gain * weights / jnp.max(jnp.abs(jnp.linalg.eigvals(weights)))
    inputs = jr.normal(k2, (size, 2))

    def cell(h, x):
        h = jnp.tanh(weights @ h + inputs @ x)
        return h, h[0]

    return cell, jnp.zeros(size), input_scale * jr.normal(k3, (length, 2))


LENGTH = 2000
H = 0.01  # 20 time units: about three van der Pol periods, Lorenz well into chaos.
PROBLEMS = {
    "vdp-1": (
        _rk4(_van_der_pol(1.0), H),
        jnp.array([2.0, 0.0]),
        jnp.arange(LENGTH, dtype=float) * H,
    ),
    "vdp-10": (
        _rk4(_van_der_pol(10.0), H),
        jnp.array([2.0, 0.0]),
        jnp.arange(LENGTH, dtype=float) * H,
    ),
    "lorenz": (
        _rk4(_lorenz, H),
        jnp.array([1.0, 1.0, 1.0]),
        jnp.arange(LENGTH, dtype=float) * H,
    ),
    # Spectral radius 1.5 at the constant guess h = 0: contracting along the
    # trajectory, but undamped Newton's first update grows like 1.5^t and overflows.
    "rnn": _rnn(1.5),
}

# Where a method converges without the fallback, at most this many iterations
# (the defaults as shipped; `None`: it may fall back). The study in
# `benchmarks/convergence.py` has the full picture.
CONVERGES = {
    # Two or three updates rejected, then the trust horizon doubles every other
    # iteration before the prefix moves: the hopeless-case test counts the
    # advance of the trusted frontier as progress (20 iterations).
    ("rnn", "Newton"): 25,
    ("vdp-1", "QuasiNewton"): 100,
    ("rnn", "QuasiNewton"): 110,
    ("rnn", "Jacobi"): 110,
}


@pytest.fixture(scope="module")
def references():
    return {
        name: jax.jit(lambda i, x, f=f: jax.lax.scan(f, i, x))(init, xs)
        for name, (f, init, xs) in PROBLEMS.items()
    }


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_exact_and_finite(references, problem, method):
    cell, init, xs = PROBLEMS[problem]
    solve = jax.jit(
        lambda i, x: partime.scan(cell, i, x, method=METHODS[method], return_stats=True)
    )
    *out, stats = solve(init, xs)
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))
    assert stats.result == partime.RESULTS.successful
    # Lorenz over 20 time units amplifies rounding by ~e^18: the fallback restarts
    # from steps exact to rounding, so that even there the answers agree.
    assert max_rel_error(out, references[problem]) < 1e-8
    bound = CONVERGES.get((problem, method))
    if bound is not None:
        assert not stats.fell_back
        assert int(stats.num_iterations) <= bound
    if problem == "lorenz":
        # Chaotic: hopeless for every method. The test stops the iteration after
        # the first tenth of its cap (at least 2 iterations) of accepted updates
        # without progress, besides the rejected ones (each shrinks the trust
        # horizon 4x: at most log_4 T in a row).
        cap = METHODS[method].iteration_cap(LENGTH)
        rejected = math.ceil(math.log(LENGTH, 4))
        assert stats.fell_back
        assert int(stats.num_iterations) <= max(2, math.ceil(0.1 * cap)) + rejected


def test_chaotic_map_falls_back_exactly():
    """The logistic map (r = 3.9, Lyapunov exponent about 0.5 per step) over 1000
    steps: given up on after a few iterations, and the fallback reproduces
    `jax.lax.scan` although rounding errors grow e^500-fold: it restarts after the
    steps whose residual is exactly zero, since the trust horizon stayed short."""
    cell = lambda x, _: (3.9 * x * (1 - x),) * 2
    init = jnp.array([0.3])
    solve = jax.jit(
        lambda i: partime.scan(cell, i, None, length=1000, return_stats=True)
    )
    *out, stats = solve(init)
    expected = jax.lax.scan(cell, init, None, length=1000)
    assert stats.fell_back
    assert int(stats.num_iterations) <= 12
    assert max_rel_error(out, expected) < 1e-8


def test_hopeless_only_with_fallback():
    """Without a fallback the iteration runs to its cap (stopping early could only
    turn a late success into a failure) and says it failed."""
    cell, init, xs = PROBLEMS["lorenz"]
    method = partime.Newton(max_iters=12, fallback=False)
    *out, stats = partime.scan(
        cell, init, xs, method=method, return_stats=True, throw=False
    )
    assert int(stats.num_iterations) == 12
    assert stats.result == partime.RESULTS.nonlinear_max_steps_reached
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(out))


def test_overflowing_update_is_cut_not_nan():
    """Newton's first update from the constant guess overflows on the unstable RNN.
    The non-finite tail is cut off and continued as a constant, so the iterate stays
    finite and the converged prefix keeps growing."""
    cell, init, xs = _rnn(3.0, length=500, input_scale=0.3)
    for max_iters in (1, 4):
        method = partime.Newton(max_iters=max_iters, fallback=False)
        final, ys, stats = partime.scan(
            cell, init, xs, method=method, return_stats=True, throw=False
        )
        assert bool(jnp.all(jnp.isfinite(ys))) and bool(jnp.all(jnp.isfinite(final)))
        assert stats.result != partime.RESULTS.successful


def test_trust_region_in_time():
    """A damped pendulum started near the upright position. Around the constant
    guess the linearisation is unstable (e^{0.68 t}: overflow over 50 time units), so
    plain DEER wastes most of its iterations on garbage; trusting each update only
    over an adaptive horizon converges in a handful."""
    pendulum = lambda y: jnp.stack([y[1], -jnp.sin(y[0]) - 0.5 * y[1]])
    cell = _rk4(pendulum, H)
    init, xs = jnp.array([2.5, 0.0]), jnp.arange(5000, dtype=float) * H
    method = partime.Newton(max_iters=20, fallback=False)
    *out, stats = partime.scan(cell, init, xs, method=method, return_stats=True)
    assert int(stats.num_iterations) <= 12
    assert max_rel_error(out, jax.lax.scan(cell, init, xs)) < 1e-8


def test_damped_merit_never_increases():
    """ELK's steps are accepted only if they decrease the merit ½Σ‖r_t‖²."""
    cell, init, xs = _rnn(3.0, length=300, input_scale=0.3)

    def step(s, x):
        return cell(s, x)[0]

    @jax.jit
    def merit(states):
        prev = jnp.concatenate([init[None], states[:-1]])
        return 0.5 * jnp.sum((states - jax.vmap(step)(prev, xs)) ** 2)

    merits = [merit(jnp.broadcast_to(init, (300, init.shape[0])))]
    for max_iters in (1, 4):
        method = partime.ELK(max_iters=max_iters, fallback=False)
        solve = jax.jit(
            lambda i, x: partime.fixed_point_solve(step, i, x, method, throw=False)
        )
        merits.append(merit(solve(init, xs)[0]))
    assert all(bool(b <= a) for a, b in zip(merits, merits[1:]))
    assert bool(merits[-1] < merits[0])


def test_nonfinite_init_never_success():
    cell, init, xs = PROBLEMS["vdp-1"]
    for method in (partime.Newton(), partime.QuasiELK(fallback=False)):
        *_, stats = partime.scan(
            cell,
            init.at[0].set(jnp.nan),
            xs,
            method=method,
            return_stats=True,
            throw=False,
        )
        assert stats.result == partime.RESULTS.nonfinite_input


def test_vmap_mixed_batch(references):
    """One contracting member (converges) and one chaotic member (falls back) in one
    batch: both exact."""
    cell, init, xs = PROBLEMS["lorenz"]
    inits = jnp.stack([init, jnp.zeros(3)])  # The origin is a fixed point.
    solve = jax.vmap(lambda i: partime.scan(cell, i, xs, return_stats=True))
    final, ys, stats = solve(inits)
    expected = jax.vmap(lambda i: jax.lax.scan(cell, i, xs))(inits)
    assert max_rel_error((final, ys), expected) < 1e-8
    assert bool(stats.fell_back[0]) and not bool(stats.fell_back[1])
    # Each member runs as it would alone: the batch's conds take each member's own
    # branch (iterations, fallback, estimate).
    for k in range(2):
        *_, alone = partime.scan(cell, inits[k], xs, return_stats=True)
        for name in ("num_iterations", "num_sequential_steps", "window"):
            assert int(getattr(stats, name)[k]) == int(getattr(alone, name)), name
        assert jnp.allclose(stats.lyapunov[k], alone.lyapunov, equal_nan=True)


# The same safeguards through `ParallelSolver`: one window of Tsit5 steps from a flat
# guess (`coarse_steps=0`), against sequential diffrax on the same grid.

SOLVER_PROBLEMS = {
    # (vector field, y0, t1, inner steps)
    "vdp-1": (_van_der_pol(1.0), [2.0, 0.0], 100.0, 10_000),
    "vdp-10": (_van_der_pol(10.0), [2.0, 0.0], 100.0, 10_000),
    "lorenz": (_lorenz, [1.0, 1.0, 1.0], 20.0, 20_000),
}


def _diffrax_solve(problem, solver):
    field, y0, t1, num_steps = SOLVER_PROBLEMS[problem]
    parallel = isinstance(solver, partime.ParallelSolver)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: field(y)),
        solver,
        0.0,
        t1,
        t1 if parallel else None,
        jnp.array(y0),
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, t1, 101), solver_state=parallel),
        stepsize_controller=diffrax.ConstantStepSize()
        if parallel
        # Bit for bit the inner grid of one window `[0, t1]`.
        else diffrax.StepTo(ts=_inner_grid(0.0, t1, num_steps)),
        max_steps=1 if parallel else num_steps,
    )
    return sol.ys, sol.solver_state if parallel else None


@pytest.fixture(scope="module")
def solver_references():
    return {
        name: jax.jit(_diffrax_solve, static_argnums=(0, 1))(name, diffrax.Tsit5())[0]
        for name in SOLVER_PROBLEMS
    }


@pytest.mark.parametrize(
    "problem, method",
    [(p, None) for p in SOLVER_PROBLEMS]
    + [("vdp-10", m) for m in METHODS if m != "Newton"],
)
def test_parallel_solver(solver_references, problem, method):
    """`ParallelSolver()` as shipped (Newton), and every other method on the
    relaxation oscillator: finite, exact (by convergence or the fallback), and when
    hopeless stopped early."""
    _, _, _, num_steps = SOLVER_PROBLEMS[problem]
    solver = partime.ParallelSolver(
        diffrax.Tsit5(),
        num_steps=num_steps,
        method=None if method is None else METHODS[method],
        coarse_steps=0,
    )
    ys, state = jax.jit(_diffrax_solve, static_argnums=(0, 1))(problem, solver)
    assert bool(jnp.all(jnp.isfinite(ys)))
    # Lorenz over 20 time units amplifies rounding by ~e^18.
    assert max_rel_error(ys, solver_references[problem]) < 1e-8
    # Over 100 time units (5-15 van der Pol periods) no method converges from a flat
    # guess within its cap either (`benchmarks/convergence.py`): each must give up
    # early, well before its cap, and finish sequentially.
    cap = (partime.Newton() if method is None else METHODS[method]).iteration_cap(
        num_steps
    )
    if int(state.num_fallbacks):
        assert int(state.num_iterations) <= 0.2 * cap
    else:
        assert int(state.num_iterations) <= cap
    if problem == "lorenz":
        assert int(state.num_fallbacks) == 1


def _pendulum_solve(friction, num_steps):
    """The (damped) pendulum over 100 time units from 2.5 rad, in one window of
    `num_steps` Tsit5 steps (the defaults, coarse pass included), and sequential
    diffrax on the same grid: `(ys, solver state, reference ys)`."""
    term = diffrax.ODETerm(
        lambda t, y, args: jnp.stack([y[1], -jnp.sin(y[0]) - friction * y[1]])
    )
    y0, t1 = jnp.array([2.5, 0.0]), 100.0
    saveat = diffrax.SaveAt(ts=jnp.linspace(0.0, t1, 11), solver_state=True)
    sol = diffrax.diffeqsolve(
        term,
        partime.ParallelSolver(diffrax.Tsit5(), num_steps=num_steps),
        0.0,
        t1,
        t1,
        y0,
        saveat=saveat,
        max_steps=1,
    )
    return sol.ys, sol.solver_state, _sequential(term, y0, t1, num_steps)


def _sequential(term, y0, t1, num_steps, args=None):
    """Sequential Tsit5 on one window's inner grid of `[0, t1]`, saved at 11 points."""
    return diffrax.diffeqsolve(
        term,
        diffrax.Tsit5(),
        0.0,
        t1,
        None,
        y0,
        args=args,
        saveat=diffrax.SaveAt(ts=jnp.linspace(0.0, t1, 11)),
        stepsize_controller=diffrax.StepTo(ts=_inner_grid(0.0, t1, num_steps)),
        max_steps=num_steps,
    ).ys


def test_chaos_test_needs_resolving_steps():
    """The pendulum is neutral, but 10, 20 and 40 coarse steps of 10 to 2.5 time
    units are unstable: a perturbation grows e^91 to e^124-fold, and the last two
    agree. They do not resolve the dynamics (e^5.7 or more in one step), so they
    are refined until a grid does (80 steps: e^0.2): not chaotic, iterated."""
    ys, state, reference = jax.jit(_pendulum_solve, static_argnums=(0, 1))(0.0, 100)
    assert float(state.lyapunov) * 100.0 < 8.0
    assert int(state.num_iterations) > 0
    assert max_rel_error(ys, reference) < 1e-8


def test_contracting_window_converges():
    """The damped pendulum over 100 time units in 1000 Tsit5 steps: the first
    updates from the coarse guess are rejected (the trust horizon shrinks) and the
    iteration converges in 9 instead of giving up after 2 (the hopeless-case test
    waits for accepted updates)."""
    ys, state, reference = jax.jit(_pendulum_solve, static_argnums=(0, 1))(0.5, 1000)
    assert int(state.num_fallbacks) == 0
    assert int(state.num_iterations) <= 15
    assert max_rel_error(ys, reference) < 1e-8


def test_contracting_window_accelerates():
    """The damped pendulum over 100 time units in 100 Tsit5 steps of 1: the trust
    horizon stays 1-12 steps for 17 iterations (the prefix grows a step or two per
    iteration, the merit jumps), then doubles to the end. The rates alone gave up
    at iteration 10; the Lyapunov estimate along the converged prefix is negative
    (contracting: about -0.1 per step), so the iteration goes on and converges."""
    ys, state, reference = jax.jit(_pendulum_solve, static_argnums=(0, 1))(0.5, 100)
    assert int(state.num_fallbacks) == 0
    assert int(state.num_iterations) <= 25
    assert float(state.lyapunov) < 0
    assert max_rel_error(ys, reference) < 1e-8


def test_growing_horizon_goes_on():
    """The RNN of spectral radius 1.5 over 5000 steps: its first updates are
    rejected down to a horizon of 78 steps, which then doubles every other
    iteration while the prefix is a few steps long (too short for a Lyapunov
    estimate). At that factor the frontier reaches the end within the cap: the
    iteration goes on (it gave up at iteration 8) and converges in 26."""
    cell, init, xs = _rnn(1.5, length=5000)
    *out, stats = jax.jit(
        lambda i, x: partime.scan(cell, i, x, return_stats=True)
    )(init, xs)
    assert not stats.fell_back
    assert int(stats.num_iterations) <= 30
    assert max_rel_error(out, jax.lax.scan(cell, init, xs)) < 1e-8


def test_parallel_solver_vmap_mixed_chaos():
    """A batch of two Lorenz systems from the same start: `ρ = 28` (chaotic, given up
    on by the chaos test) and `ρ = 0.5` (contracting to the origin, iterated): each
    member exact against sequential diffrax on the same grid, with its own
    statistics, as alone. The batch's conds keep each member's branch (no guess, no
    iteration, for the chaotic one)."""
    t1, num_steps = 20.0, 2000

    def field(t, y, rho):
        x, yy, z = y
        return jnp.stack([10 * (yy - x), x * (rho - z) - yy, x * yy - 8 / 3 * z])

    term = diffrax.ODETerm(field)
    saveat = diffrax.SaveAt(ts=jnp.linspace(0.0, t1, 11), solver_state=True)
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=num_steps)

    def parallel(rho):
        sol = diffrax.diffeqsolve(
            term, solver, 0.0, t1, t1, y0, args=rho, saveat=saveat, max_steps=1
        )
        return sol.ys, sol.solver_state

    y0 = jnp.array([1.0, 1.0, 1.0])
    rhos = jnp.array([28.0, 0.5])
    ys, state = jax.jit(jax.vmap(parallel))(rhos)
    sequential = lambda rho: _sequential(term, y0, t1, num_steps, args=rho)
    assert max_rel_error(ys, jax.jit(jax.vmap(sequential))(rhos)) < 1e-8
    solve = jax.jit(parallel)
    for k in range(2):
        alone = solve(rhos[k])[1]
        for name in ("num_iterations", "num_fallbacks", "num_sequential_steps"):
            assert int(getattr(state, name)[k]) == int(getattr(alone, name)), name
    assert state.num_fallbacks.tolist() == [1, 0]
    assert int(state.num_iterations[0]) == 0 and int(state.num_iterations[1]) > 0


def test_fallback_steps_with_the_sequential_form():
    """The fallback steps with a step map's sequential form (`SequentialForm`): for an
    explicit Runge–Kutta step, its stages as straight-line code, where a loop over
    the stages in every step made Lorenz-63's fallback 4–5x sequential diffrax's
    time. A sequential form that differs shows in every fallback step (here all of
    them: no iteration); Tsit5's straight-line step is the stage loop's map, to
    rounding, with no loop in its program."""
    from partime._brownian_increments import store_increments
    from partime._fallback import SequentialForm
    from partime._flatten import Flattener
    from partime._inner_step import flat_step

    step = lambda s, x: 0.5 * jnp.sin(s) + x
    other = lambda s, x: 0.5 * jnp.sin(s) + 2 * x
    init, xs = jnp.array([0.3, -0.2]), jnp.linspace(0.0, 1.0, 20)[:, None]
    states, stats = partime.fixed_point_solve(
        SequentialForm(step, other), init, xs, partime.Newton(max_iters=0)
    )
    expected = jax.lax.scan(lambda s, x: (other(s, x),) * 2, init, xs)[1]
    assert int(stats.num_sequential_steps) == 20
    assert max_rel_error(states, expected) < 1e-14

    term = diffrax.ODETerm(lambda t, y, args: jnp.stack([y[1], -jnp.sin(y[0]) * t]))
    y0 = jnp.array([1.0, 0.5])
    solver = diffrax.Tsit5()
    ts = jnp.linspace(0.0, 1.0, 5)
    _, make_terms = store_increments(term, solver, ts)
    x0 = (ts[0], ts[1], ())
    steps = [
        flat_step(solver, make_terms, None, Flattener(y0), straight)
        for straight in (False, True)
    ]
    looped, straight = (step(y0, x0) for step in steps)
    assert max_rel_error(straight, looped) < 1e-14
    primitives = {eqn.primitive.name for eqn in jax.make_jaxpr(steps[1])(y0, x0).eqns}
    assert not primitives & {"scan", "while"}
