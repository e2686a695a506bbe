"""The one driver loop of the fixed-point solve.

Solves `r_t = s_t - f(s_{t-1}, x_t) = 0`, `t = 1..T`, for `s_1..s_T` given `s_0`:
evaluate → the method's update → its trust region or damping → converged? → hopeless?
→ the prefix exact to rounding → the exact sequential fallback → statistics. The
method owns its policy (`propose`, `cut`, `judge`); the layout owns where time lives
(the reductions over time, the fallback). Neither edits this loop.
"""

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._lds import AbstractTransition
from ._method.base import AbstractMethod
from ._stats import count, RESULTS, Stats


# Hopeless-case detection: progress is measured over the last tenth of the cap (at
# least 2 iterations), and undamped updates may be rejected a fortieth of the cap
# times in a row (at least 2), so that a larger `max_iters` also means more patience.
_PATIENCE = 0.1


def within(x: Array, tol: Array) -> Bool[Array, " T"]:
    """Per step: every component of `|x_t| <= tol_t`. NaN compares False: not within."""
    return jnp.all(jnp.abs(x) <= tol, axis=-1)


class _Carry(eqx.Module):
    iteration: Int[Array, ""]
    states: Float[Array, "T d"]
    transition: AbstractTransition
    residual: Float[Array, "T d"]
    merit: Float[Array, ""]
    prefix: Int[Array, ""]
    # Whether the update that produced `states` was within tolerance.
    small_update: Bool[Array, ""]
    # The method's policy: Newton's trust horizon, ELK's λ.
    policy: PyTree
    # (prefix, merit) after each of the last few iterations, oldest first, for the
    # hopeless-case test.
    past_prefix: Int[Array, " w"]
    past_merit: Float[Array, " w"]
    # Updates rejected in a row.
    rejections: Int[Array, ""]
    hopeless: Bool[Array, ""]


def iterate(
    step: Callable,
    init: Float[Array, " d"],
    xs: PyTree,
    guess: Float[Array, "T d"],
    method: AbstractMethod,
    layout,
) -> tuple[Float[Array, "T d"], Stats]:
    """The solve on a layout whose reductions the loop can use (the whole sequence,
    or one device's chunk inside `shard_map`). Returns the states of this layout's
    steps and the statistics (their arrays only)."""
    length = layout.length
    dtype = guess.dtype
    rtol, atol = method.tolerances(dtype)
    cap = method.iteration_cap(length)
    init_finite = jnp.all(jnp.isfinite(init))
    index = layout.index
    eps = float(jnp.finfo(dtype).eps)
    window_size = max(2, math.ceil(_PATIENCE * cap))
    max_rejections = max(2, math.ceil(_PATIENCE * cap / 4))

    def measure(states, f):
        residual = states - f
        ok = within(residual, atol + rtol * jnp.abs(states))
        return residual, layout.merit(residual), layout.first_false(ok)

    def converged(carry):
        return (carry.prefix == length) & carry.small_update

    def cond_fun(carry):
        return (
            (carry.iteration < cap) & ~converged(carry) & ~carry.hopeless & init_finite
        )

    def body_fun(carry):
        delta = method.propose(layout, carry.transition, carry.residual, carry.policy)
        candidate = carry.states + delta
        first_bad = layout.first_false(jnp.all(jnp.isfinite(candidate), axis=-1))
        cut = jnp.minimum(method.cut(layout, carry.prefix, carry.policy), first_bad)
        # Everything past the cut is unknown: continue it as a constant (a fresh flat
        # guess; an undamped update is exact at least one step past the prefix, so
        # progress is kept).
        anchor = layout.state_at(init, candidate, cut)
        candidate = jnp.where((index >= cut)[:, None], anchor, candidate)
        # The residual first; the transitions (Newton's Jacobians: the expensive
        # part) only below, once the iteration is known to go on from here.
        f = jax.vmap(step)(layout.previous(init, candidate), xs)
        residual, merit, prefix = measure(candidate, f)
        accept, policy = method.judge(
            layout,
            carry.policy,
            cut=cut,
            prefix=carry.prefix,
            transition=carry.transition,
            delta=delta,
            old_residual=carry.residual,
            old_merit=carry.merit,
            residual=residual,
            merit=merit,
        )

        def pick(new, old):
            return jnp.where(accept, new, old)

        tol = atol + rtol * jnp.abs(candidate)
        small_update = pick(
            layout.all(within(candidate - carry.states, tol)), carry.small_update
        )
        states = pick(candidate, carry.states)
        residual = pick(residual, carry.residual)
        merit = pick(merit, carry.merit)
        prefix = pick(prefix, carry.prefix)
        iteration = carry.iteration + 1

        # Hopeless case: at the rates at which the converged prefix and the merit
        # progressed over the last `window_size` iterations, the iteration would not
        # finish within the cap. (The merit must fall to at most `½ Σ tol²`, a
        # necessary condition for convergence.) Either rate suffices to go on.
        prefix_rate = (prefix - carry.past_prefix[0]).astype(dtype) / window_size
        prefix_needs = (length - prefix).astype(dtype) / jnp.maximum(prefix_rate, eps)
        target = layout.merit(atol + rtol * jnp.abs(states))
        merit_rate = jnp.log(carry.past_merit[0] / merit) / window_size
        merit_rate = jnp.where(jnp.isfinite(merit_rate), merit_rate, 0)
        merit_needs = jnp.log(jnp.maximum(merit, target) / target) / jnp.maximum(
            merit_rate, eps
        )
        needs = jnp.minimum(prefix_needs, merit_needs)
        left = (cap - iteration).astype(dtype)
        hopeless = (iteration >= window_size) & (needs > left)
        rejections = jnp.where(accept, 0, carry.rejections + 1)
        if method.rejections_are_hopeless:
            # Updates rejected again and again (two in a row at Newton's default
            # cap): even over a horizon a quarter as long, then a sixteenth, the
            # linearisation blew up.
            hopeless = hopeless | (rejections >= max_rejections)
        if not method.fallback:
            # Without a fallback, stopping early only turns a possible success into
            # a certain failure.
            hopeless = jnp.array(False)
        past_prefix = jnp.concatenate([carry.past_prefix[1:], prefix[None]])
        past_merit = jnp.concatenate([carry.past_merit[1:], merit[None]])
        # Linearise at the accepted iterate only if there will be a next iteration:
        # a rejected candidate, the last iterate and a hopeless one need none. (On
        # Lorenz-63 this skips two of the three Jacobian evaluations.)
        done = (prefix == length) & small_update
        goes_on = accept & (iteration < cap) & ~done & ~hopeless
        transition = jax.lax.cond(
            goes_on,
            lambda: method.linearise(step, layout.previous(init, states), xs)[1],
            lambda: carry.transition,
        )
        return _Carry(
            iteration=iteration,
            states=states,
            transition=transition,
            residual=residual,
            merit=merit,
            prefix=prefix,
            small_update=small_update,
            policy=policy,
            past_prefix=past_prefix,
            past_merit=past_merit,
            rejections=rejections,
            hopeless=hopeless,
        )

    f, transition = method.linearise(step, layout.previous(init, guess), xs)
    residual, merit, prefix = measure(guess, f)
    carry = _Carry(
        iteration=count(0),
        states=guess,
        transition=transition,
        residual=residual,
        merit=merit,
        prefix=prefix,
        # At least one iteration: convergence needs a small update too.
        small_update=jnp.array(False),
        policy=method.init_policy(length, dtype),
        past_prefix=jnp.broadcast_to(prefix, (window_size,)),
        past_merit=jnp.broadcast_to(merit, (window_size,)),
        rejections=count(0),
        hopeless=jnp.array(False),
    )
    carry = jax.lax.while_loop(cond_fun, body_fun, carry)
    states = carry.states
    # Where the fallback starts: after the leading steps that are exact to rounding,
    # not merely within tolerance. Residuals within tolerance near the front of the
    # prefix are errors that the remaining steps would amplify (by e^{λ·time} on a
    # chaotic system: 1e-10 becomes 1e-3 over 20 Lorenz time units), so that the
    # fallback would not reproduce the sequential answer. Newton-type iterations
    # reach rounding level one iteration after tolerance, so this costs few extra
    # sequential steps. The residuals of the last iterate are in the carry.
    exact = min(atol, 100 * eps) + min(rtol, 100 * eps) * jnp.abs(states)
    exact_prefix = jnp.minimum(
        layout.first_false(within(carry.residual, exact)), carry.prefix
    )
    prefix = jnp.where(converged(carry), length, exact_prefix)
    # A non-finite `init`: no iteration ran; every step is computed sequentially, as
    # `jax.lax.scan` would (the finite components of the state stay exact).
    prefix = jnp.where(init_finite, prefix, 0)

    if method.fallback:
        # Exact sequential completion from the converged prefix; zero trips if none.
        result = RESULTS.successful
        start = prefix
    else:
        diverged = ~jnp.isfinite(carry.merit)
        result = RESULTS.where(
            converged(carry),
            RESULTS.successful,
            RESULTS.where(
                diverged,
                RESULTS.nonlinear_divergence,
                RESULTS.nonlinear_max_steps_reached,
            ),
        )
        start = jnp.where(init_finite, length, 0)
    states = layout.complete(step, init, xs, states, start)
    result = RESULTS.where(init_finite, result, RESULTS.nonfinite_input)
    stats = Stats(
        num_iterations=carry.iteration,
        num_advances=count(1),
        num_sequential_steps=(length - start).astype(jnp.int32),
        fallback_start=start.astype(jnp.int32),
        length=length,
        result=result,
    )
    return states, stats
