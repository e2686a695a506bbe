"""The sharded solves on 8 virtual CPU devices.

Not collected by the main test run: `tests/test_sharding.py` runs this file with
pytest in a subprocess with `XLA_FLAGS=--xla_force_host_platform_device_count=8`,
which must be set before JAX initialises (the rest of the suite runs on one device).
Run it by hand the same way:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 pytest tests/_sharding_checks.py
"""

import functools
import inspect
import re

import jax
import jax.numpy as jnp
import jax.random as jr
import pytest
from jax.sharding import AxisType, PartitionSpec

import partime
from partime._sharding import sharded_solve
from tests.helpers import max_rel_error, problems


jax.config.update("jax_enable_x64", True)

NUM_DEVICES = 8
SIZE = 4
LENGTH = 64
TIGHT = dict(rtol=1e-12, atol=1e-12)

if jax.device_count() < NUM_DEVICES:
    pytest.skip(
        f"needs {NUM_DEVICES} devices: set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={NUM_DEVICES}",
        allow_module_level=True,
    )


def _mesh(count=NUM_DEVICES, name="time"):
    return jax.make_mesh(
        (count,),
        (name,),
        axis_types=(AxisType.Auto,),
        devices=jax.devices()[:count],
    )


MESH = _mesh()


def _problem(length=LENGTH, size=SIZE, seed=0):
    """A contracting tanh RNN: parameters `(w, u, b)`, `init`, inputs `xs`."""
    k1, k2, k3, k4, k5 = jr.split(jr.PRNGKey(seed), 5)
    w = 0.6 * jr.normal(k1, (size, size)) / jnp.sqrt(size)
    u = jr.normal(k2, (size, 2))
    b = 0.1 * jr.normal(k3, (size,))
    xs = jr.normal(k4, (length, 2))
    init = 0.5 * jr.normal(k5, (size,))
    return (w, u, b), init, xs


def _step(params):
    w, u, b = params
    return lambda s, x: jnp.tanh(w @ s + u @ x + b)


def _sharded(mesh=MESH, **kwargs):
    return lambda *args, **kw: partime.fixed_point_solve(
        *args, mesh=mesh, **kwargs, **kw
    )


def _value_and_grad(solve, method):
    """`(loss, (states, stats)), gradients` of a loss of the states, with respect to
    the closed-over parameters, `init` and `xs`."""

    def loss(params, init, xs):
        states, stats = solve(_step(params), init, xs, method)
        weights = jnp.arange(states.shape[0], dtype=states.dtype)[:, None]
        return jnp.sum(jnp.sin(states) * weights), (states, stats)

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)


def _both(fn):
    """`fn(partime.fixed_point_solve)` and `fn(sharded solve)`, compiled together."""
    unsharded, sharded = fn(partime.fixed_point_solve), fn(_sharded())
    return jax.jit(lambda *args: (unsharded(*args), sharded(*args)))


def _max_error(x, y):
    return max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    )


def _assert_same_stats(stats, reference):
    """The same outcome as on one device: the same loop, with every safeguard, runs
    on both layouts, so the same iterations, fallback and result."""
    assert stats.length == reference.length
    assert bool(stats.result == reference.result)
    assert int(stats.num_iterations) == int(reference.num_iterations)
    assert int(stats.fallback_start) == int(reference.fallback_start)


# The LDS engine.

_T, _D = 32, 3


def _transitions():
    k1, k2 = jr.split(jr.PRNGKey(1))
    return {
        "dense": partime.DenseTransition(0.5 * jr.normal(k1, (_T, _D, _D))),
        "diagonal": partime.DiagonalTransition(jr.normal(k2, (_T, _D))),
        "identity": partime.IdentityTransition(_T, _D, jnp.float64),
        "zero": partime.ZeroTransition(_T, _D, jnp.float64),
    }


@pytest.mark.parametrize("kind", ["dense", "diagonal", "identity", "zero"])
def test_lds_solve(kind):
    transition = _transitions()[kind]
    b = jr.normal(jr.PRNGKey(2), (_T, _D))

    @jax.jit
    def both(transition, b):
        return [
            sharded_solve(transition, b, mesh=MESH, reverse=reverse)
            for reverse in (False, True)
        ]

    for reverse, out in zip((False, True), both(transition, b)):
        expected = partime.sequential_solve(transition, b, reverse=reverse)
        assert _max_error(out, expected) < 1e-12
        assert out.sharding.spec == PartitionSpec("time")


# The fixed-point solve: same values, statistics and derivatives as on one device.


@functools.cache
def _newton_sharded():
    """The sharded Newton value and gradient, compiled; also used for the HLO."""
    params, init, xs = _problem()
    fn = jax.jit(_value_and_grad(_sharded(), partime.Newton(**TIGHT)))
    return fn.lower(params, init, xs).compile()


def _check(out, expected):
    """Results of `_value_and_grad`: values, statistics and gradients agree."""
    (_, (states, stats)), grads = out
    (_, (expected_states, expected_stats)), expected_grads = expected
    assert _max_error(states, expected_states) < 1e-10
    assert _max_error(grads, expected_grads) < 1e-10
    _assert_same_stats(stats, expected_stats)
    assert states.sharding.spec == PartitionSpec("time")


@functools.cache
def _newton_unsharded():
    params, init, xs = _problem()
    fn = jax.jit(_value_and_grad(partime.fixed_point_solve, partime.Newton(**TIGHT)))
    return fn(params, init, xs)


def test_newton():
    expected = _newton_unsharded()
    _check(_newton_sharded()(*_problem()), expected)
    assert int(expected[0][1][1].fallback_start) == LENGTH  # converged


def test_quasi_newton():
    method = partime.QuasiNewton(**TIGHT)
    expected, out = _both(lambda solve: _value_and_grad(solve, method))(*_problem())
    _check(out, expected)


@pytest.mark.parametrize("method", [partime.Picard(**TIGHT), partime.Jacobi(**TIGHT)])
def test_values(method):
    solve = lambda solve: lambda p, i, x: solve(_step(p), i, x, method)
    (expected, expected_stats), (states, stats) = _both(solve)(*_problem())
    assert _max_error(states, expected) < 1e-10
    _assert_same_stats(stats, expected_stats)


def test_forward_mode():
    params, init, xs = _problem()
    method = partime.Newton(**TIGHT)
    tangents = jax.tree.map(jnp.ones_like, (params, init, xs))

    def jvp(solve):
        fn = lambda params, init, xs: solve(_step(params), init, xs, method)[0]
        return lambda primals, tangents: jax.jvp(fn, primals, tangents)

    expected, out = _both(jvp)((params, init, xs), tangents)
    assert _max_error(out, expected) < 1e-10


def test_fallback():
    """Two iterations are not enough: the exact sequential fallback starts inside a
    chunk and runs through the remaining chunks, as on one device."""
    method = partime.Newton(max_iters=2, **TIGHT)
    expected, out = _both(lambda solve: _value_and_grad(solve, method))(*_problem())
    # The fallback starts inside a chunk before the last one.
    fallback_start = int(out[0][1][1].fallback_start)
    assert 0 < fallback_start < LENGTH - LENGTH // NUM_DEVICES
    assert fallback_start % (LENGTH // NUM_DEVICES) != 0
    _check(out, expected)


def test_failure_modes():
    params, init, xs = _problem()
    no_fallback = partime.Newton(max_iters=2, fallback=False, **TIGHT)

    def solves(solve):
        def fn(params, init, xs):
            step = _step(params)
            bad_init = init.at[0].set(jnp.nan)
            return (
                solve(step, init, xs, no_fallback, throw=False),
                solve(step, bad_init, xs, partime.Newton(**TIGHT), throw=False),
            )

        return fn

    expected, out = _both(solves)(params, init, xs)
    (states, stats), (bad_states, bad_stats) = out
    (expected_states, expected_stats), (expected_bad, expected_bad_stats) = expected
    assert bool(stats.result == partime.RESULTS.nonlinear_max_steps_reached)
    _assert_same_stats(stats, expected_stats)
    assert _max_error(states, expected_states) < 1e-10
    # A NaN in `init`: every step sequentially, the finite components exact.
    assert bool(bad_stats.result == partime.RESULTS.nonfinite_input)
    _assert_same_stats(bad_stats, expected_bad_stats)
    assert bool(jnp.array_equal(bad_states, expected_bad, equal_nan=True))


def test_vmap():
    params, init, xs = _problem()
    inits = init[None] + 0.1 * jnp.arange(2, dtype=init.dtype)[:, None]
    method = partime.Newton(**TIGHT)
    batched = lambda solve: jax.vmap(lambda i: solve(_step(params), i, xs, method)[0])
    expected, out = _both(batched)(inits)
    assert _max_error(out, expected) < 1e-10


def test_meshes():
    """Time on one axis of a 2-D mesh; explicit sharding is refused with a fix."""
    params, init, xs = _problem()
    method = partime.Newton(**TIGHT)
    grid = jax.make_mesh((2, 4), ("batch", "time"), axis_types=(AxisType.Auto,) * 2)
    solve = _sharded(grid, axis_name="time")
    states, _ = jax.jit(lambda *a: solve(_step(a[0]), *a[1:], method))(*_problem())
    expected_states = _newton_unsharded()[0][1][0]
    assert _max_error(states, expected_states) < 1e-10

    explicit = jax.make_mesh((NUM_DEVICES,), ("time",))
    assert explicit.axis_types == (AxisType.Explicit,)
    with pytest.raises(ValueError, match="AxisType.Auto"):
        partime.fixed_point_solve(_step(params), init, xs, method, mesh=explicit)
    with jax.set_mesh(explicit), pytest.raises(ValueError, match="AxisType.Auto"):
        partime.fixed_point_solve(_step(params), init, xs, method, mesh=MESH)


def test_errors():
    params, init, xs = _problem()
    step, method = _step(params), partime.Newton()
    with pytest.raises(ValueError, match="not a multiple"):
        partime.fixed_point_solve(step, init, xs[:60], method, mesh=MESH)
    grid = jax.make_mesh((2, 4), ("batch", "time"), axis_types=(AxisType.Auto,) * 2)
    with pytest.raises(ValueError, match="axis_name"):
        partime.fixed_point_solve(step, init, xs, method, mesh=grid)
    with pytest.raises(ValueError, match="not an axis"):
        partime.fixed_point_solve(step, init, xs, method, mesh=grid, axis_name="x")
    with pytest.raises(TypeError, match="Mesh"):
        partime.fixed_point_solve(step, init, xs, method, mesh=jax.devices())


# What the collectives move.

_COLLECTIVE = re.compile(
    r"= (\(.*?\)|\S+) (all-gather|all-reduce|collective-permute|all-to-all|"
    r"reduce-scatter|collective-broadcast)(?:-start)?\("
)


def collectives(compiled_text):
    """`(op, numbers moved)` for every collective in compiled HLO text."""
    out = []
    for shapes, op in _COLLECTIVE.findall(compiled_text):
        numbers = 0
        for dims in re.findall(r"[a-z]+\d*\[([\d,]*)\]", shapes):
            numbers += int(jnp.prod(jnp.array([int(n) for n in dims.split(",") if n])))
        out.append((op, numbers))
    return sorted(out)


def test_collective_sizes():
    """Forward and reverse: every collective moves at most `P·(d² + d)` numbers (the
    chunk summaries), except the one reduction of the parameters' cotangents (their
    size); and nothing changes with `T`."""
    bound = NUM_DEVICES * (SIZE**2 + SIZE)
    params, _, _ = _problem()
    num_params = sum(p.size for p in params)
    found = collectives(_newton_sharded().as_text())
    assert found, "no collectives found: has the HLO text format changed?"
    assert all(n <= bound for _, n in found if n != num_params), found
    # The Newton summaries are gathered: exactly P·d² and P·d numbers.
    assert ("all-gather", NUM_DEVICES * SIZE**2) in found
    assert ("all-gather", NUM_DEVICES * SIZE) in found

    longer = _problem(4 * LENGTH)
    fn = jax.jit(_value_and_grad(_sharded(), partime.Newton(**TIGHT)))
    assert collectives(fn.lower(*longer).compile().as_text()) == found


# `partime.scan(..., mesh=...)`, once `partime.scan` takes a mesh.


@pytest.mark.skipif(
    "mesh" not in inspect.signature(partime.scan).parameters,
    reason="partime.scan has no `mesh` argument",
)
@pytest.mark.parametrize("reverse", [False, True])
def test_scan(reverse):
    params, init, xs = _problem()

    def f(params):
        step = _step(params)
        return lambda c, x: (step(c, x), jnp.sum(c) * x)

    def loss(scan):
        def fn(params):
            final, ys = scan(f(params), init, xs, reverse=reverse)
            return jnp.sum(jnp.sin(final)) + jnp.sum(ys**2), (final, ys)

        return jax.jit(jax.value_and_grad(fn, has_aux=True))

    expected = loss(jax.lax.scan)(params)
    sharded = loss(
        lambda *a, **kw: partime.scan(
            *a, method=partime.Newton(**TIGHT), mesh=MESH, **kw
        )
    )
    assert _max_error(sharded(params), expected) < 1e-10
    bound = NUM_DEVICES * (SIZE**2 + SIZE)
    text = sharded.lower(params).compile().as_text()
    # Beyond the iteration's collectives: the final carry, and in reverse the flips
    # of `xs` and `ys` (one chunk per device, once).
    chunk = (LENGTH // NUM_DEVICES) * 2
    num_params = sum(p.size for p in params)
    assert all(n <= max(bound, chunk, num_params) for _, n in collectives(text))


# `partime.ParallelSolver(..., mesh=...)`, once it takes a mesh.


@pytest.mark.skipif(
    "mesh" not in inspect.signature(partime.ParallelSolver.__init__).parameters,
    reason="partime.ParallelSolver has no `mesh` argument",
)
def test_parallel_solver():
    """A neural ODE, one window of 64 Euler steps split over the devices: values at
    the saved times and gradients with respect to the vector field's parameters."""
    import diffrax
    import equinox as eqx

    mlp = eqx.nn.MLP(2, 2, 16, 2, key=jr.PRNGKey(0))
    y0 = jnp.array([1.0, -0.5])
    method = partime.Newton(**TIGHT)

    def loss(solver):
        def fn(mlp):
            term = diffrax.ODETerm(lambda t, y, mlp: -y + 0.3 * mlp(y))
            saveat = diffrax.SaveAt(ts=jnp.linspace(0, 2, 9))
            solution = diffrax.diffeqsolve(
                term, solver, 0.0, 2.0, 2.0, y0, mlp, saveat=saveat
            )
            return jnp.sum(solution.ys**2), solution.ys

        return eqx.filter_jit(eqx.filter_value_and_grad(fn, has_aux=True))

    inner = diffrax.Euler()
    expected = loss(partime.ParallelSolver(inner, num_steps=64, method=method))(mlp)
    solver = partime.ParallelSolver(inner, num_steps=64, method=method, mesh=MESH)
    out = loss(solver)(mlp)
    assert _max_error(eqx.filter(out, eqx.is_array), expected) < 1e-10


# The problem registry of `tests/helpers.py` on the sharded layout: the same loop as
# on one device, so the same answer, iterations, fallback and result.

_REGISTRY_CASES = [(p, partime.Newton()) for p in problems] + [
    (p, m)
    for p in ("rnn", "rnn-unstable")
    for m in (partime.QuasiNewton(), partime.Picard(), partime.Jacobi())
]


@pytest.mark.parametrize(
    "problem, method",
    _REGISTRY_CASES,
    ids=[f"{p}-{type(m).__name__}" for p, m in _REGISTRY_CASES],
)
def test_registry(problem, method):
    f, init, xs = problems[problem]
    capped = type(method)(max_iters=3, fallback=False)

    @jax.jit
    def solve(init, xs):
        def both(method, **kw):
            whole = partime.scan(f, init, xs, method=method, return_stats=True, **kw)
            sharded = partime.scan(
                f, init, xs, method=method, return_stats=True, mesh=MESH, **kw
            )
            return whole, sharded

        return (
            jax.lax.scan(f, init, xs),
            both(method),
            both(capped, throw=False),
        )

    expected, (whole, sharded), (capped_whole, capped_sharded) = solve(init, xs)
    *out, stats = sharded
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(out))
    assert bool(stats.result == partime.RESULTS.successful)
    assert max_rel_error(out, expected) < 1e-8
    _assert_same_stats(stats, whole[-1])
    *out, stats = capped_sharded
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(out))
    _assert_same_stats(stats, capped_whole[-1])
    assert _max_error(out, capped_whole[:-1]) < 1e-8


def test_damped_on_a_mesh_is_refused():
    f, init, xs = problems["rnn"]
    for method in (partime.ELK(), partime.QuasiELK()):
        with pytest.raises(ValueError, match="damped"):
            partime.scan(f, init, xs, method=method, mesh=MESH)


def test_structured_newton():
    """A declared block-diagonal Jacobian on a mesh (its blocks cross the devices as
    dense matrices): values and gradients equal `jax.lax.scan`'s."""
    blocks = 0.7 * jr.normal(jr.PRNGKey(3), (SIZE // 2, 2, 2))
    xs = jr.normal(jr.PRNGKey(4), (LENGTH, SIZE))
    init = 0.1 * jnp.ones(SIZE)

    def loss(scan):
        def fn(blocks, init):
            def f(h, x):
                pre = jnp.einsum("nij,nj->ni", blocks, h.reshape(SIZE // 2, 2))
                h = jnp.tanh(pre.reshape(SIZE) + x)
                return h, h

            return jnp.sum(scan(f, init, xs)[1] ** 2)

        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(blocks, init)

    method = partime.Newton(jacobian=partime.BlockDiagonal(2), **TIGHT)
    sharded = loss(lambda f, h, x: partime.scan(f, h, x, method=method, mesh=MESH))
    assert _max_error(sharded, loss(jax.lax.scan)) < 1e-10
