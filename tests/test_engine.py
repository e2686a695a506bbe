"""The one engine on every layout of time (whole sequence, blocks, sliding window) and
with every method, on the problem registry of `tests/helpers.py`: finite, exact against
`jax.lax.scan`, never a wrong success, the same result code in every layout. (The
sharded layout: `tests/_sharding_checks.py`.)"""

import jax
import jax.numpy as jnp
import pytest

import partime

from .helpers import (
    _lorenz,
    _rk4,
    every_method,
    expanding_rnn,
    layouts,
    max_rel_error,
    problems,
)


# Every problem with Newton and ELK; every method on the two RNNs (the other
# combinations add compiles, not coverage of the engine).
CASES = [(p, m) for p in problems for m in (partime.Newton(), partime.ELK())] + [
    (p, m)
    for p in ("rnn", "rnn-unstable")
    for m in every_method
    if not isinstance(m, (partime.Newton, partime.ELK))
]


def _usable(method, layout):
    # A damped method on the sliding window is refused at trace time (below).
    damped = isinstance(method, partime.AbstractDampedMethod)
    return not (damped and layout == "sliding")


def _is_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "problem, method", CASES, ids=[f"{p}-{type(m).__name__}" for p, m in CASES]
)
def test_every_layout(problem, method):
    f, init, xs = problems[problem]
    names = [name for name in layouts if _usable(method, name)]
    strict = type(method)(max_iters=3, fallback=False)

    @jax.jit
    def solve(init, xs):
        exact = {
            name: partime.scan(
                f, init, xs, method=method, return_stats=True, **layouts[name]
            )
            for name in names
        }
        capped = {
            name: partime.scan(
                f,
                init,
                xs,
                method=strict,
                return_stats=True,
                throw=False,
                **layouts[name],
            )
            for name in names
        }
        return jax.lax.scan(f, init, xs), exact, capped

    expected, exact, capped = solve(init, xs)
    for name in names:
        *out, stats = exact[name]
        assert _is_finite(out), name
        assert stats.result == partime.RESULTS.successful, name
        assert max_rel_error(out, expected) < 1e-8, name
        # Without the fallback: a success is exact, and the iterate stays finite.
        *out, stats = capped[name]
        assert _is_finite(out), name
        if stats.result == partime.RESULTS.successful:
            assert max_rel_error(out, expected) < 1e-6, name


@pytest.mark.parametrize("layout", list(layouts))
def test_nonfinite_init_in_every_layout(layout):
    """A NaN in one leaf of the carry: the other leaves exactly as `lax.scan` has
    them, `RESULTS.nonfinite_input` in every layout, an error with `throw=True`."""
    f, init, xs = problems["pytree"]
    bad = dict(init, a=init["a"].at[0].set(jnp.nan))
    *out, stats = partime.scan(
        f, bad, xs, return_stats=True, throw=False, **layouts[layout]
    )
    expected = jax.lax.scan(f, bad, xs)
    assert stats.result == partime.RESULTS.nonfinite_input
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
        assert bool(jnp.array_equal(jnp.isnan(a), jnp.isnan(b)))
        assert bool(jnp.allclose(a, b, rtol=1e-10, atol=1e-12, equal_nan=True))
    # The component that the NaN never reaches is finite (and exact, above).
    assert _is_finite(out[0]["bc"][1])
    with pytest.raises(Exception, match="initial state"):
        partime.scan(f, bad, xs, **layouts[layout])


def test_gradient_through_overflow_is_nonfinite_not_an_error():
    """A solve that overflows (exactly, as `lax.scan`): its gradient is non-finite,
    as `lax.scan`'s, rather than a crash in the derivative's linear solve."""

    def f(h, x):
        h = h * x
        return h, h

    xs = jnp.full((12, 1), 1e60)

    def loss(scan, init):
        final, _ = scan(f, init, xs)
        return jnp.sum(final)

    init = jnp.ones(1)
    expected = jax.grad(lambda i: loss(jax.lax.scan, i))(init)
    assert not _is_finite(expected)
    for kwargs in layouts.values():
        scan = lambda *a, kw=kwargs: partime.scan(*a, throw=False, **kw)
        grad = jax.grad(lambda i, scan=scan: loss(scan, i))(init)
        assert not _is_finite(grad)


def test_damped_on_sliding_window_is_refused():
    f, init, xs = problems["rnn"]
    for method in (partime.ELK(), partime.QuasiELK()):
        with pytest.raises(ValueError, match="schedule='blocks'"):
            partime.scan(f, init, xs, method=method, window=8)


def test_stats_print_values():
    f, init, xs = problems["rnn"]
    *_, stats = partime.scan(f, init, xs, return_stats=True)
    text = repr(stats)
    assert "weak" not in text and "i32[" not in text
    assert f"num_iterations={int(stats.num_iterations)}" in text
    assert "result=RESULTS.successful" in text
    assert f"window={len(xs)}" in text and int(stats.window) == len(xs)
    assert stats.num_iterations.dtype == jnp.int32


@pytest.mark.parametrize("layout", list(layouts))
def test_overflowing_iterates_without_fallback_stay_finite(layout):
    """Newton's iterates overflow on this recurrence (its sequential answer does
    not): without the fallback, every layout cuts them and stays finite, and a
    success is exact."""

    def f(s, _):
        new = jnp.exp(s) - 1.5
        return new, new

    init = jnp.array([0.1])
    method = partime.Newton(max_iters=4, fallback=False)
    *out, stats = partime.scan(
        f,
        init,
        None,
        length=48,
        method=method,
        return_stats=True,
        throw=False,
        **layouts[layout],
    )
    assert _is_finite(out)
    if stats.result == partime.RESULTS.successful:
        assert max_rel_error(out, jax.lax.scan(f, init, length=48)) < 1e-8


def test_sliding_window_runs_the_one_loop():
    """The sliding window is the one loop over the steps in flight: a window as long
    as the sequence is the whole-sequence solve, iteration for iteration; on a shorter
    one, chaotic Lorenz (20 time units) converges window by window within the cap
    (or falls back part of the way), exactly, and the trust region in time
    converges the unstable RNN (whose first undamped update overflows) exactly,
    finite, without the fallback."""
    lorenz = _rk4(_lorenz, 0.01)
    f, init, xs = problems["rnn-unstable"]
    cases = {
        "lorenz": (lorenz, jnp.ones(3), jnp.arange(2000, dtype=float) * 0.01, 500),
        "rnn-unstable": (f, init, jnp.tile(xs, (8, 1)), 128),
    }
    for name, (f, init, xs, window) in cases.items():
        length = xs.shape[0]

        @jax.jit
        def solve(init, xs, f=f, window=window, length=length):
            kw = dict(return_stats=True)
            return (
                jax.lax.scan(f, init, xs),
                partime.scan(f, init, xs, **kw),
                partime.scan(f, init, xs, window=length, **kw),
                partime.scan(f, init, xs, window=window, **kw),
            )

        expected, (*_, whole), (*long, one_window), (*out, sliding) = solve(init, xs)
        for field in ("num_iterations", "num_sequential_steps", "fallback_start"):
            assert int(getattr(one_window, field)) == int(getattr(whole, field))
        assert max_rel_error(long, expected) < 1e-8, name
        assert _is_finite(out), name
        assert sliding.result == partime.RESULTS.successful, name
        assert max_rel_error(out, expected) < 1e-8, name
        cap = -(-length // window) * partime.Newton().iteration_cap(window)
        if name == "lorenz":
            assert int(sliding.num_iterations) < cap
            # Windows of 5 time units (λ·5 ≈ 4.5: predictable) converge where the
            # whole sequence cannot (since the hopeless-case test waits for accepted
            # updates: all four of them, in 161 iterations; before, the fallback
            # took over part of the way).
            assert int(sliding.fallback_start) > window
        else:
            assert not sliding.fell_back
            assert int(sliding.num_iterations) < cap


def _henon(s, _):
    # The Hénon map (a = 1.4, b = 0.3): chaotic, λ ≈ 0.42 per step.
    new = jnp.stack([1 - 1.4 * s[0] ** 2 + s[1], 0.3 * s[0]])
    return new, new[0]


def _qr_lyapunov(f, init, xs):
    """An independent estimate of the largest Lyapunov exponent per step: the
    sequential trajectory of `jax.lax.scan`, and the QR re-orthonormalised product
    of its step Jacobians (Benettin et al.)."""

    def body(carry, x):
        s, q, total = carry
        jacobian = jax.jacfwd(lambda a: f(a, x)[0])(s)
        q, r = jnp.linalg.qr(jacobian @ q)
        return (f(s, x)[0], q, total + jnp.log(jnp.abs(jnp.diag(r)))), None

    size = init.shape[0]
    start = (init, jnp.eye(size), jnp.zeros(size))
    (_, _, total), _ = jax.lax.scan(body, start, xs)
    return float(jnp.max(total)) / jax.tree.leaves(xs)[0].shape[0]


@pytest.mark.parametrize("layout", list(layouts))
def test_lyapunov_estimate(layout):
    """`Stats.lyapunov` (Newton's Jacobians along the iterate) has the sign of an
    independent QR estimate along `lax.scan`'s trajectory, and is close to it, on a
    contracting RNN and on the chaotic Hénon map (solved to convergence)."""
    f, init, xs = problems["rnn"]
    # Newton needs about one iteration per step on this chaotic map: 20 steps.
    henon_xs = jnp.zeros((20, 0))
    henon_init = jnp.array([0.6, 0.1])
    method = partime.Newton(max_iters=20, fallback=False)

    @jax.jit
    def estimates():
        _, _, rnn = partime.scan(f, init, xs, return_stats=True, **layouts[layout])
        _, _, henon = partime.scan(
            _henon,
            henon_init,
            henon_xs,
            method=method,
            return_stats=True,
            **layouts[layout],
        )
        return rnn, henon

    rnn, henon = estimates()
    assert henon.result == partime.RESULTS.successful
    rnn_reference = _qr_lyapunov(f, init, xs)
    henon_reference = _qr_lyapunov(_henon, henon_init, henon_xs)
    assert rnn_reference < 0 and float(rnn.lyapunov) < 0
    assert henon_reference > 0.2 and float(henon.lyapunov) > 0.2
    # The norm of the product against its leading stretching, over one window
    # (sliding: the last 24 steps): the same to O(log(d) / n).
    if layout == "whole":
        assert abs(float(rnn.lyapunov) - rnn_reference) < 0.05
        assert abs(float(henon.lyapunov) - henon_reference) < 0.05


def test_lyapunov_estimate_after_fallback():
    """When the iteration falls back, `Stats.lyapunov` comes from the Jacobians over
    the converged prefix only, where the iterate is the exact trajectory: on an RNN
    with gain 1.5 that contracts along its trajectory, but whose Jacobians expand
    near rest (where the iterate is held past the prefix), it matches the QR
    estimate along `lax.scan`'s first 100 steps in every layout. Given up with fewer
    than 8 steps converged (one Newton iteration from rest), there is no estimate."""
    exact_steps = 100
    f, init, xs = expanding_rnn(200)
    _, exact = jax.lax.scan(f, init, xs)
    # Exact over the first 100 steps, at rest after them; one iteration, then the
    # fallback.
    guess = exact.at[exact_steps:].set(0)
    step = lambda h, x: f(h, x)[0]
    capped = partime.Newton(max_iters=1)

    @jax.jit
    def solve():
        stats = {
            name: partime.fixed_point_solve(
                step, init, xs, capped, guess=guess, **{**layouts[name], "window": 64}
            )[1]
            for name in ("blocks", "sliding")
        }
        stats["whole"] = partime.fixed_point_solve(step, init, xs, capped, guess=guess)[
            1
        ]
        stats["from rest"] = partime.fixed_point_solve(step, init, xs, capped)[1]
        return stats

    stats = solve()
    reference = _qr_lyapunov(f, init, xs[:exact_steps])
    assert reference < -0.1
    for name in ("whole", "blocks", "sliding"):
        assert bool(stats[name].fell_back), name
        assert abs(float(stats[name].lyapunov) - reference) < 0.05, name
    assert bool(stats["from rest"].fell_back)
    assert int(stats["from rest"].fallback_start) < 8
    assert jnp.isnan(stats["from rest"].lyapunov)


def test_lyapunov_needs_jacobians():
    f, init, xs = problems["rnn"]
    for method in (partime.QuasiNewton(), partime.Picard(), partime.Jacobi()):
        *_, stats = partime.scan(f, init, xs, method=method, return_stats=True)
        assert jnp.isnan(stats.lyapunov)


@pytest.mark.parametrize("layout", list(layouts))
def test_give_up(layout):
    """`give_up=True`: no iteration, every step by the exact fallback (equal to
    `lax.scan`), no estimate; traced, under `vmap` with mixed flags too. (Not given
    up, Newton converges on the contracting RNN, with an estimate.)"""
    f, init, xs = problems["rnn"]
    step = lambda s, x: f(s, x)[0]
    kwargs = dict(layouts[layout])

    @jax.jit
    @jax.vmap
    def solve(flag):
        return partime.fixed_point_solve(
            step, init, xs, partime.Newton(), give_up=flag, **kwargs
        )

    states, stats = solve(jnp.array([True, False]))
    _, reference = jax.lax.scan(lambda s, x: (step(s, x),) * 2, init, xs)
    assert max_rel_error(states, jnp.stack([reference, reference])) < 1e-10
    assert stats.num_iterations.tolist()[0] == 0 and stats.num_iterations[1] > 0
    assert stats.num_sequential_steps.tolist() == [len(xs), 0]
    assert jnp.isnan(stats.lyapunov[0]) and jnp.isfinite(stats.lyapunov[1])
    with pytest.raises(ValueError, match="boolean scalar"):
        partime.fixed_point_solve(step, init, xs, partime.Newton(), give_up=1.0)
