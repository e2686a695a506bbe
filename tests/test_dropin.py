"""partime as a drop-in for diffrax and `jax.lax.scan`, on the inputs their users take
for granted: complex, empty and low-precision states, integer counts of any kind,
`lax.scan`'s edge cases, and diffrax's own refusals. Everything runs under the
suite's strict dtype and rank promotion (conftest.py)."""

import math
import operator
import os
import subprocess
import sys
import textwrap

import diffrax
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import partime
from partime._window_interpolation import inner_grid


def _assert_tree_close(x, y, rtol=1e-10, atol=1e-10):
    assert jtu.tree_structure(x) == jtu.tree_structure(y)
    for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# `partime.scan` against `jax.lax.scan`.


def _cell(c, x):
    c = jnp.tanh(0.5 * c + x)
    return c, 2 * c


def test_scan_complex_carry():
    a = jnp.array([[0.3 + 0.4j, 0.1], [0.2j, 0.5 - 0.1j]])
    f = lambda c, x: (jnp.tanh(a @ c + x), jnp.real(c) * jnp.imag(c))
    c0 = jnp.array([1 + 1j, 0.5j])
    xs = jnp.linspace(0, 1, 12).astype(jnp.complex128)
    _assert_tree_close(partime.scan(f, c0, xs), jax.lax.scan(f, c0, xs))
    loss = lambda scan: lambda c: jnp.sum(scan(f, c, xs)[1])
    _assert_tree_close(
        jax.grad(loss(partime.scan))(c0), jax.grad(loss(jax.lax.scan))(c0)
    )


def test_scan_empty_carry():
    xs = jnp.linspace(0, 1, 8)
    f = lambda c, x: (c, 2 * x)
    init = jnp.zeros((0, 3))
    _assert_tree_close(partime.scan(f, init, xs), jax.lax.scan(f, init, xs))
    # Mixed empty and non-empty leaves.
    g = lambda c, x: ({"e": c["e"], "b": jnp.tanh(0.5 * c["b"] + x)}, c["b"][0])
    init = {"e": jnp.zeros((2, 0)), "b": jnp.ones(2)}
    _assert_tree_close(partime.scan(g, init, xs), jax.lax.scan(g, init, xs))


@pytest.mark.parametrize("xs", [jnp.zeros(0), None])
def test_scan_length_zero(xs):
    length = 0 if xs is None else None
    f = lambda c, x: (jnp.tanh(c), 2 * c)
    init = jnp.array([0.1, 0.2])
    out = partime.scan(f, init, xs, length=length)
    _assert_tree_close(out, jax.lax.scan(f, init, xs, length=length))


def test_scan_carry_dtype_change_is_type_error():
    f = lambda c, x: (c.astype(jnp.float32), x)
    with pytest.raises(TypeError):
        jax.lax.scan(f, jnp.zeros(2), jnp.zeros(3))
    with pytest.raises(TypeError, match="dtypes"):
        partime.scan(f, jnp.zeros(2), jnp.zeros(3))


def test_scan_reverse_and_unroll():
    init, xs = jnp.array([0.1, -0.2]), jnp.linspace(0, 1, 10)
    out = partime.scan(_cell, init, xs, None, True, 2)
    _assert_tree_close(out, jax.lax.scan(_cell, init, xs, None, True, 2))


@pytest.mark.parametrize("length", [np.int64(6), np.int32(6), jnp.array(6)])
def test_scan_integer_length(length):
    f = lambda c, _: (jnp.tanh(c), c)
    out = partime.scan(f, jnp.ones(2), length=length)
    _assert_tree_close(out, jax.lax.scan(f, jnp.ones(2), length=6))


@pytest.fixture(scope="module")
def gru_low_precision():
    d, length = 16, 2000
    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    w = jr.normal(k1, (3, d, d)) / math.sqrt(d)
    u = jr.normal(k2, (3, d, d)) / math.sqrt(d)
    xs = jr.normal(k3, (length, d))

    def gru(dtype):
        wd, ud = w.astype(dtype), u.astype(dtype)

        def cell(h, x):
            z = jax.nn.sigmoid(wd[0] @ x + ud[0] @ h)
            r = jax.nn.sigmoid(wd[1] @ x + ud[1] @ h)
            n = jnp.tanh(wd[2] @ x + ud[2] @ (r * h))
            h = (1 - z) * n + z * h
            return h, h

        return cell

    exact = jax.lax.scan(gru(jnp.float64), jnp.zeros(d), xs)[1]
    return gru, xs, exact


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_scan_low_precision(gru_low_precision, dtype):
    # The iterations run in float32, the cell in `dtype`: as close to the exact
    # answer as `lax.scan`'s own low-precision result.
    gru, xs, exact = gru_low_precision
    cell, xs, h0 = gru(dtype), xs.astype(dtype), jnp.zeros(xs.shape[1], dtype)
    seq = jax.jit(lambda: jax.lax.scan(cell, h0, xs))()[1]
    par = jax.jit(lambda: partime.scan(cell, h0, xs))()[1]
    assert par.dtype == dtype
    error = lambda ys: float(jnp.max(jnp.abs(ys.astype(jnp.float64) - exact)))
    assert error(par) <= 2 * error(seq)


# `ParallelSolver` against sequential diffrax on the same grid.

NUM_STEPS = 10


def _sequential_solve(term, y0, solver=None, t1=1.0, **kwargs):
    ts = np.asarray(inner_grid(0.0, t1, NUM_STEPS))
    return diffrax.diffeqsolve(
        term,
        diffrax.Tsit5() if solver is None else solver,
        0.0,
        t1,
        None,
        y0,
        stepsize_controller=diffrax.StepTo(ts=ts),
        **kwargs,
    ).ys


def _parallel_solve(term, y0, solver=None, t1=1.0, **kwargs):
    solver = partime.ParallelSolver(solver, num_steps=np.int64(NUM_STEPS))
    return diffrax.diffeqsolve(term, solver, 0.0, t1, t1, y0, **kwargs).ys


def test_solver_complex_and_empty_state():
    # A Schrödinger-type ODE, with an empty leaf beside the complex one.
    term = diffrax.ODETerm(lambda t, y, args: jtu.tree_map(lambda v: -1j * v, y))
    # (One dtype for both: diffrax itself promotes across leaves.)
    y0 = {"psi": jnp.array([1.0 + 0.5j, 0.2j]), "empty": jnp.zeros((0, 2), complex)}
    _assert_tree_close(_parallel_solve(term, y0), _sequential_solve(term, y0))

    def loss(solve):
        return lambda y: jnp.sum(jnp.abs(solve(term, y)["psi"]) ** 2)

    _assert_tree_close(
        jax.grad(loss(_parallel_solve))(y0), jax.grad(loss(_sequential_solve))(y0)
    )


def test_solver_only_empty_state():
    term = diffrax.ODETerm(lambda t, y, args: -y)
    y0 = jnp.zeros((3, 0))
    _assert_tree_close(_parallel_solve(term, y0), _sequential_solve(term, y0))


@pytest.mark.parametrize("solver", [diffrax.ImplicitEuler, diffrax.Kvaerno3])
def test_solver_only_empty_state_implicit(solver):
    # diffrax's `test_basic` draws empty leaves: the inner root finder's LU then
    # factorises a 0 x 0 matrix.
    solver = solver(root_finder=diffrax.VeryChord(rtol=1e-8, atol=1e-8))
    term = diffrax.ODETerm(lambda t, y, args: -y)
    y0 = jnp.zeros((2, 0))
    _assert_tree_close(
        _parallel_solve(term, y0, solver), _sequential_solve(term, y0, solver)
    )


def test_integer_counts():
    solver = partime.ParallelSolver(
        num_steps=np.int64(100), coarse_steps=np.int32(3), window=jnp.array(50)
    )
    assert (solver.num_steps, solver.coarse_steps, solver.window) == (100, 3, 50)
    assert type(solver.num_steps) is int
    with pytest.raises(ValueError, match="num_steps"):
        partime.ParallelSolver(num_steps=True)
    with pytest.raises(ValueError, match="num_steps"):
        partime.ParallelSolver(num_steps=10.0)


# Refusals at trace time, before any work.


def test_window_larger_than_num_steps_refused():
    with pytest.raises(ValueError, match="at most `num_steps`"):
        partime.ParallelSolver(num_steps=10, window=11)


def test_backsolve_refused_before_the_forward_pass():
    # Without any gradient: the refusal comes from the forward pass's trace, not
    # from the backward pass after a full solve.
    with pytest.raises(ValueError, match="BacksolveAdjoint"):
        diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -y),
            partime.ParallelSolver(num_steps=NUM_STEPS),
            0.0,
            1.0,
            1.0,
            jnp.ones(2),
            adjoint=diffrax.BacksolveAdjoint(),
        )


def test_implicit_tol_error():
    # As diffrax's own `test_implicit_tol_error`.
    msg = "the tolerances for the implicit solver have not been specified"
    with pytest.raises(ValueError, match=msg):
        diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -y),
            partime.ParallelSolver(diffrax.Kvaerno5()),
            0,
            1,
            0.01,
            1.0,
        )


@pytest.mark.parametrize("solver", [diffrax.ALIGN, diffrax.ShOULD, diffrax.QUICSORT])
def test_langevin_solvers_refused(solver):
    with pytest.raises(ValueError, match="Langevin"):
        partime.ParallelSolver(solver(0.1))


# diffrax's own tests, with `ParallelSolver` swapped in.


def _random_pytree(key, treedef, dtype):
    """As diffrax's test helper: leaves of random rank and size, some of them empty."""
    leaves = []
    for key in jr.split(key, treedef.num_leaves):
        dimkey, sizekey, valuekey = jr.split(key, 3)
        num_dims = jr.randint(dimkey, (), 0, 5)
        dim_sizes = jr.randint(sizekey, (num_dims,), 0, 5)
        leaves.append(jr.normal(valuekey, dim_sizes, dtype=dtype))
    return jtu.tree_unflatten(treedef, leaves)


@pytest.mark.parametrize(
    "solver, y_dtype",
    [
        (diffrax.Tsit5(), jnp.float32),
        (diffrax.Tsit5(), jnp.complex64),
        (diffrax.Euler(), jnp.complex64),
        (diffrax.Kvaerno3(root_finder=diffrax.VeryChord(rtol=1e-3, atol=1e-6)), None),
    ],
)
def test_diffrax_basic(solver, y_dtype, getkey):
    # diffrax's `test_basic` (float32 times, a dict state, constant steps).
    y_dtype = jnp.float32 if y_dtype is None else y_dtype
    if jnp.issubdtype(y_dtype, jnp.complexfloating):
        f = lambda t, y, args: jtu.tree_map(lambda v: operator.mul(-1j, v), y)
        exact = lambda y: y * jnp.exp(-1j)
    else:
        f = lambda t, y, args: jtu.tree_map(operator.neg, y)
        exact = lambda y: y * math.exp(-1)
    treedef = jtu.tree_structure({"a": [0, 0], "b": 0})
    y0 = _random_pytree(getkey(), treedef, y_dtype)
    t0, t1, dt0 = (jnp.array(x, dtype=jnp.float32) for x in (0, 1, 0.01))
    solver = partime.ParallelSolver(solver, num_steps=4)
    ys = diffrax.diffeqsolve(diffrax.ODETerm(f), solver, t0, t1, dt0, y0).ys
    expected = jtu.tree_map(lambda y, y1: exact(y)[None].astype(y1.dtype), y0, ys)
    _assert_tree_close(ys, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.xfail(
    strict=True,
    reason="diffrax locates the event with the user's root finder over the whole "
    "window, [t_prev, t_next]; a chord method's slope from the window's end is far "
    "off the slope at the crossing, and it diverges. Not fixed yet: partime sees "
    "neither the event nor the root find.",
)
def test_vmap_backprop_with_event_very_chord():
    # From diffrax's `test_vmap_backprop_with_event`: the event is located with a
    # chord-type root finder on the window's interpolation.
    def cond_fn(t, y, args, **kwargs):
        return y[0] - 0.5

    def solve(solver, y0):
        return diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: -y),
            solver,
            0.0,
            2.0,
            2.0 if isinstance(solver, partime.ParallelSolver) else None,
            y0,
            stepsize_controller=(
                diffrax.ConstantStepSize()
                if isinstance(solver, partime.ParallelSolver)
                else diffrax.StepTo(ts=np.asarray(inner_grid(0.0, 2.0, 20)))
            ),
            event=diffrax.Event(
                cond_fn, root_finder=diffrax.VeryChord(rtol=1e-10, atol=1e-10)
            ),
        ).ts[-1]

    y0s = jnp.array([[1.0, 2.0], [0.9, 1.0]])
    parallel = partime.ParallelSolver(diffrax.Tsit5(), num_steps=20)
    loss = lambda solver: lambda y0s: jnp.sum(jax.vmap(lambda y: solve(solver, y))(y0s))
    _assert_tree_close(
        loss(parallel)(y0s), loss(diffrax.Tsit5())(y0s), rtol=1e-8, atol=1e-8
    )
    _assert_tree_close(
        jax.grad(loss(parallel))(y0s),
        jax.grad(loss(diffrax.Tsit5()))(y0s),
        rtol=1e-6,
        atol=1e-6,
    )


# No hang, ever.

_HANG_SCRIPT = textwrap.dedent(
    """
    import diffrax, jax, jax.numpy as jnp, jax.random as jr
    import partime

    jax.config.update("jax_enable_x64", True)
    y0 = jr.normal(jr.PRNGKey(0), (48,), dtype=jnp.float32)
    root_finder = diffrax.VeryChord(rtol=1e-3, atol=1e-6)
    inner = diffrax.Kvaerno3(root_finder=root_finder)
    solver = partime.ParallelSolver(inner, num_steps=4)
    t0, t1, dt0 = (jnp.array(x, dtype=jnp.float32) for x in (0, 1, 0.01))
    term = diffrax.ODETerm(lambda t, y, args: -y)
    sol = diffrax.diffeqsolve(term, solver, t0, t1, dt0, y0)
    print(float(jnp.max(jnp.abs(sol.ys[-1] - y0 * jnp.exp(-1.0)))))
    """
)


def test_implicit_float32_does_not_hang():
    # Batched LAPACK LU in the vmapped inner root finders deadlocked XLA:CPU here;
    # `ParallelSolver` factorises with plain JAX operations instead (`_lu.py`). Run
    # in a subprocess so that a hang fails the test instead of the suite.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.run(
        [sys.executable, "-c", _HANG_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-5000:]
    assert float(process.stdout.strip().splitlines()[-1]) < 1e-2
