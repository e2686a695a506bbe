"""The fixed-point solve of a whole sequence, and its implicit derivative.

Solves `r_t = s_t - f(s_{t-1}, x_t) = 0`, `t = 1..T`, for `s_1..s_T` given `s_0`,
by the iterations of an [`partime.AbstractMethod`][], with an exact sequential fallback
from the converged prefix. Derivatives never unroll the iterations: at the solution, the
implicit function theorem gives `L ṡ = ∂f/∂(s_0, x, θ) · (ṡ_0, ẋ, θ̇)` with the Newton
operator `L` (block lower-bidiagonal, `A_t = ∂f/∂s_{t-1}`), one parallel scan through
lineax. Reverse mode is JAX's transpose of that rule: one reverse scan.
"""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._fallback import sequential_completion
from ._kalman import damped_solve
from ._lds import AbstractTransition, DenseTransition
from ._method.base import AbstractDampedMethod, AbstractMethod
from ._operator import BidiagonalOperator, ScanSolver
from ._stats import RESULTS, Stats


def _index(xs: PyTree, t: Int[Array, ""] | int) -> PyTree:
    return jtu.tree_map(lambda a: a[t], xs)


def check_inputs(
    step: Callable, init: Any, xs: PyTree, length: int | None, guess: Any
) -> tuple[Float[Array, " d"], int, Float[Array, "T d"] | None]:
    """Validates the arguments that every fixed-point solve takes, at trace time,
    with messages that say what is wrong. Returns `init` as an array, the sequence
    length `T`, and `guess` cast to `init`'s dtype (`None` if not given)."""
    init = jnp.asarray(init)
    if init.ndim != 1 or not jnp.issubdtype(init.dtype, jnp.inexact):
        raise ValueError(
            "`init` must be a 1-D floating-point array, got "
            f"shape {init.shape} and dtype {init.dtype}."
        )
    if any(jnp.ndim(leaf) == 0 for leaf in jtu.tree_leaves(xs)):
        raise ValueError("Every leaf of `xs` needs a leading (time) axis.")
    lengths = {leaf.shape[0] for leaf in jtu.tree_leaves(xs)}
    if length is not None:
        lengths.add(length)
    if len(lengths) != 1:
        raise ValueError(
            "Cannot determine the sequence length: the leaves of `xs` have leading "
            f"axes {sorted(lengths)}"
            + ("" if lengths else " (and `length` was not given)")
            + "."
        )
    (length,) = lengths
    if length < 1:
        raise ValueError("The sequence must have at least one step.")
    if guess is not None:
        guess = jnp.asarray(guess)
        if guess.shape != (length, init.shape[0]):
            raise ValueError(
                f"`guess` must have shape {(length, init.shape[0])}, got {guess.shape}."
            )
        guess = guess.astype(init.dtype)
    out_struct = jax.eval_shape(step, init, _index(xs, 0))
    if not (
        isinstance(out_struct, jax.ShapeDtypeStruct) and out_struct.shape == init.shape
    ):
        raise ValueError(
            f"`step` must map a state of shape {init.shape} to one of the same shape, "
            f"got {out_struct}."
        )
    return init, length, guess


def _previous(init: Float[Array, " d"], states: Float[Array, "T d"]) -> Array:
    """`s_0, ..., s_{T-1}`."""
    return jnp.concatenate([init[None], states[:-1]])


def _within(x: Array, tol: Array) -> Bool[Array, " T"]:
    """Per step: every component of `|x_t| <= tol_t`. NaN compares False: not within."""
    return jnp.all(jnp.abs(x) <= tol, axis=-1)


# Safeguard constants. They are fixed rather than options: the convergence study
# (`benchmarks/convergence.py`) chose them, and they are explained here.
#
# Trust region in time (undamped methods). An undamped update is exact on the step
# after the converged prefix and degrades with distance from it: around a poor
# iterate the linearised dynamics can be unstable (a flat guess near an unstable
# equilibrium, an RNN whose Jacobians have spectral radius > 1) and the update grows
# exponentially along the sequence until it overflows. Each update is therefore
# trusted only `horizon` steps past the converged prefix; beyond, the new iterate
# continues the last trusted state as a constant (a fresh flat guess for the unknown
# part, which keeps the "at least one more step per iteration" guarantee). The
# horizon starts at `T` (plain DEER), shrinks to a quarter of what was used when the
# merit over the trusted window grew more than `_SHRINK`-fold, and doubles when it
# fell at least `1 / _GROW`-fold. An update that makes it grow more than
# `_DIVERGED`-fold (or non-finite) is rejected and retried over the shorter horizon.
_SHRINK = 1e4
_GROW = 0.5
_DIVERGED = 1e8
# Levenberg–Marquardt (damped methods): accept when the achieved decrease of the
# merit is at least this fraction of the predicted one (Nielsen's update of λ).
_ACCEPT = 1e-4
# Hopeless-case detection: progress is measured over the last tenth of the cap (at
# least 2 iterations), and undamped updates may be rejected a fortieth of the cap
# times in a row (at least 2), so that a larger `max_iters` also means more patience.
_PATIENCE = 0.1


def _merit(residual: Array, mask: Array | None = None) -> Float[Array, ""]:
    """`½ Σ_t ‖r_t‖²` (over `mask`, if given); `inf` if not finite."""
    squares = jnp.sum(residual**2, axis=-1)
    if mask is not None:
        squares = jnp.where(mask, squares, 0)
    merit = 0.5 * jnp.sum(squares)
    return jnp.where(jnp.isfinite(merit), merit, jnp.inf)


def _prefix(ok: Bool[Array, " T"]) -> Int[Array, ""]:
    """The number of leading `True`s."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))


class _Carry(eqx.Module):
    iteration: Int[Array, ""]
    states: Float[Array, "T d"]
    transition: AbstractTransition
    residual: Float[Array, "T d"]
    merit: Float[Array, ""]
    prefix: Int[Array, ""]
    # Whether the update that produced `states` was within tolerance.
    small_update: Bool[Array, ""]
    # Undamped methods: the trust horizon. Damped methods: λ and its growth factor.
    horizon: Int[Array, ""]
    damping: Float[Array, ""]
    growth: Float[Array, ""]
    # (prefix, merit) after each of the last few iterations, oldest first, for the
    # hopeless-case test.
    past_prefix: Int[Array, " w"]
    past_merit: Float[Array, " w"]
    # Undamped updates rejected in a row.
    rejections: Int[Array, ""]
    hopeless: Bool[Array, ""]


def _iterate(
    step: Callable, init: Array, xs: PyTree, guess: Array, method: AbstractMethod
) -> tuple[Array, Stats]:
    length, size = guess.shape
    dtype = guess.dtype
    rtol, atol = method.tolerances(dtype)
    cap = method.iteration_cap(length)
    damped = isinstance(method, AbstractDampedMethod)
    init_finite = jnp.all(jnp.isfinite(init))
    index = jnp.arange(length)
    eps = float(jnp.finfo(dtype).eps)
    window_size = max(2, math.ceil(_PATIENCE * cap))
    max_rejections = max(2, math.ceil(_PATIENCE * cap / 4))

    def measure(states, f):
        residual = states - f
        ok = _within(residual, atol + rtol * jnp.abs(states))
        return residual, _merit(residual), _prefix(ok)

    def evaluate(states):
        f, transition = method.linearise(step, _previous(init, states), xs)
        return transition, *measure(states, f)

    def continue_after(states, cut):
        """Replaces `states[cut:]` by a constant continuation of `states[cut - 1]`."""
        anchor = jnp.where(cut == 0, init, states[jnp.maximum(cut - 1, 0)])
        return jnp.where((index >= cut)[:, None], anchor, states)

    def converged(carry):
        return (carry.prefix == length) & carry.small_update

    def cond_fun(carry):
        return (
            (carry.iteration < cap) & ~converged(carry) & ~carry.hopeless & init_finite
        )

    def body_fun(carry):
        # Delta form: L Δ = -r. Avoids cancellation between s^{(i+1)} and s^{(i)}.
        if damped:
            delta = damped_solve(carry.transition, carry.residual, carry.damping)
        else:
            delta = carry.transition.solve(-carry.residual)
        candidate = carry.states + delta
        finite = jnp.all(jnp.isfinite(candidate), axis=-1)
        first_bad = jnp.where(jnp.all(finite), length, jnp.argmin(finite))
        if damped:
            cut = first_bad
        else:
            cut = jnp.minimum(carry.prefix + carry.horizon, first_bad)
        # Everything past the cut is unknown: continue it as a constant. (An undamped
        # update is exact at least one step past the prefix, so progress is kept.)
        candidate = continue_after(candidate, cut)
        # The residual first; the transitions (Newton's Jacobians: the expensive
        # part) only below, once the iteration is known to go on from here.
        f = jax.vmap(step)(_previous(init, candidate), xs)
        residual, merit, prefix = measure(candidate, f)

        if damped:
            # Gain ratio: achieved / predicted decrease of the merit, the prediction
            # being the Gauss–Newton model ½‖r + L Δ‖² (positive for an LM step).
            model = carry.residual + BidiagonalOperator(carry.transition).mv(delta)
            predicted = carry.merit - _merit(model)
            ratio = (carry.merit - merit) / predicted
            accept = (cut == length) & jnp.isfinite(merit) & (ratio > _ACCEPT)
            shrink = jnp.maximum(1 / 3, 1 - (2 * ratio - 1) ** 3)
            damping = jnp.where(
                accept, carry.damping * shrink, carry.damping * carry.growth
            )
            damping = jnp.clip(damping, eps, 1 / eps)
            growth = jnp.where(accept, 2.0, 2 * carry.growth)
            horizon = carry.horizon
        else:
            window = index < cut
            before = _merit(carry.residual, window)
            after = _merit(residual, window)
            accept = ~(after > _DIVERGED * before) & jnp.isfinite(after)
            used = jnp.maximum(cut - carry.prefix, 1)
            horizon = jnp.where(
                ~accept | (after > _SHRINK * before),
                jnp.maximum(used // 4, 1),
                jnp.where(after <= _GROW * before, jnp.minimum(2 * used, length), used),
            )
            damping, growth = carry.damping, carry.growth

        def pick(new, old):
            return jnp.where(accept, new, old)

        tol = atol + rtol * jnp.abs(candidate)
        small_update = pick(
            jnp.all(_within(candidate - carry.states, tol)), carry.small_update
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
        old_prefix = carry.past_prefix[0]
        old_merit = carry.past_merit[0]
        prefix_rate = (prefix - old_prefix) / window_size
        prefix_needs = (length - prefix) / jnp.maximum(prefix_rate, eps)
        target = _merit(atol + rtol * jnp.abs(states))
        merit_rate = jnp.log(old_merit / merit) / window_size
        merit_rate = jnp.where(jnp.isfinite(merit_rate), merit_rate, 0)
        merit_needs = jnp.log(jnp.maximum(merit, target) / target) / jnp.maximum(
            merit_rate, eps
        )
        needs = jnp.minimum(prefix_needs, merit_needs)
        hopeless = (iteration >= window_size) & (needs > cap - iteration)
        rejections = jnp.where(accept, 0, carry.rejections + 1)
        if not damped:
            # Undamped updates rejected again and again (two in a row at Newton's
            # default cap): even over a horizon a quarter as long, then a
            # sixteenth, the linearisation blew up. (Damped methods reject
            # routinely while their trust region adapts.)
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
        goes_on = (
            accept
            & (iteration < cap)
            & ~((prefix == length) & small_update)
            & ~hopeless
        )
        transition = jax.lax.cond(
            goes_on,
            lambda: method.linearise(step, _previous(init, states), xs)[1],
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
            horizon=horizon,
            damping=damping,
            growth=growth,
            past_prefix=past_prefix,
            past_merit=past_merit,
            rejections=rejections,
            hopeless=hopeless,
        )

    transition, residual, merit, prefix = evaluate(guess)
    initial_damping = method.damping if damped else 0.0
    carry = _Carry(
        iteration=jnp.array(0),
        states=guess,
        transition=transition,
        residual=residual,
        merit=merit,
        prefix=prefix,
        # At least one iteration: convergence needs a small update too.
        small_update=jnp.array(False),
        horizon=jnp.array(length),
        damping=jnp.asarray(initial_damping, dtype),
        growth=jnp.asarray(2.0, dtype),
        past_prefix=jnp.broadcast_to(prefix, (window_size,)),
        past_merit=jnp.broadcast_to(merit, (window_size,)),
        rejections=jnp.array(0),
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
    # sequential steps. The residuals of the last iterate are in the carry: no extra
    # evaluation. (A non-finite `init` leaves nothing to compute: no fallback.)
    exact = min(atol, 100 * eps) + min(rtol, 100 * eps) * jnp.abs(states)
    exact_prefix = jnp.minimum(_prefix(_within(carry.residual, exact)), carry.prefix)
    prefix = jnp.where(converged(carry), length, exact_prefix)
    prefix = jnp.where(init_finite, prefix, length)

    if method.fallback:
        # Exact sequential completion from the converged prefix; zero trips if none.
        states = sequential_completion(step, init, xs, states, prefix)
        result = RESULTS.where(init_finite, RESULTS.successful, RESULTS.nonfinite_input)
        fallback_start = prefix
    else:
        diverged = ~jnp.isfinite(carry.merit)
        result = RESULTS.where(
            converged(carry),
            RESULTS.successful,
            RESULTS.where(diverged, RESULTS.diverged, RESULTS.max_iters_reached),
        )
        result = RESULTS.where(init_finite, result, RESULTS.nonfinite_input)
        fallback_start = jnp.array(length)
    stats = Stats(
        num_iterations=carry.iteration,
        fallback_start=fallback_start,
        length=length,
        result=result,
    )
    return states, stats


@eqx.filter_custom_jvp
def _solve(step, init, xs, guess, *, method):
    # Custom-JVP outputs must be arrays: the statistics leave without their static part.
    states, stats = _iterate(step, init, xs, jax.lax.stop_gradient(guess), method)
    return states, eqx.filter(stats, eqx.is_array)


def _zeros_for_none(primal, tangent):
    if tangent is None and eqx.is_inexact_array(primal):
        return jnp.zeros_like(primal)
    return tangent


@_solve.def_jvp
def _solve_jvp(primals, tangents, *, method):
    step, init, xs, guess = primals
    t_step, t_init, t_xs, _ = tangents
    states, stats = _solve(step, init, xs, guess, method=method)
    # No `stop_gradient` on the solution or the Jacobians below: differentiating
    # this rule again (for second derivatives) must see how they move. At first
    # order they are known values, and the rule costs the same.

    # Right-hand side: how f_t moves with (s_0, x_t, θ) at the solution, with the
    # previous states held fixed (their motion is what L accounts for).
    def evaluate(step, init, xs):
        return jax.vmap(step)(_previous(init, states), xs)

    primals_in = (step, init, xs)
    tangents_in = jtu.tree_map(
        _zeros_for_none, primals_in, (t_step, t_init, t_xs), is_leaf=lambda x: x is None
    )
    _, rhs = eqx.filter_jvp(evaluate, primals_in, tangents_in)

    jacobians = jax.vmap(jax.jacfwd(step))(_previous(init, states), xs)
    operator = BidiagonalOperator(DenseTransition(jacobians))
    t_states = lx.linear_solve(operator, rhs, ScanSolver()).value
    t_stats = jtu.tree_map(lambda _: None, stats)
    return (states, stats), (t_states, t_stats)


def fixed_point_solve(
    step: Callable[[Float[Array, " d"], PyTree[Any]], Float[Array, " d"]],
    init: Float[Array, " d"],
    xs: PyTree[Any],
    method: AbstractMethod,
    *,
    length: int | None = None,
    guess: Float[Array, "T d"] | None = None,
) -> tuple[Float[Array, "T d"], Stats]:
    """Evaluates the recurrence `s_t = step(s_{t-1}, x_t)`, `t = 1..T`, in parallel.

    **Arguments:**

    - `step`: one step on flat states. It may close over JAX arrays (parameters):
        they are closure-converted and receive gradients.
    - `init`: `s_0`, a 1-D floating array.
    - `xs`: per-step inputs, every leaf with leading axis `T`; may be `None` if
        `length` is given.
    - `method`: an [`partime.AbstractMethod`][].
    - `length`: `T`, needed only when `xs` has no leaves.
    - `guess`: the first iterate for `s_1..s_T`; defaults to `s_0` at every step. A
        good guess saves iterations: the previous trajectory when parameters change
        little (between training steps), or a cheap coarse sequential pass (for an
        ODE, a few long steps interpolated; `partime.ParallelSolver` does this).

    **Returns:** `(states, stats)`: `s_1..s_T` with shape `(T, d)`, and a
    [`partime.Stats`][].

    Differentiable (forward and reverse mode) with respect to `init`, the floating
    leaves of `xs`, and arrays closed over by `step`, by implicit differentiation.

    **Safeguards.** Every iteration is checked, for every method:

    - *Non-finite values.* An update that overflows is cut at its first non-finite
        step and continued from the last finite state as a constant; the steps before
        it (including the next one after the converged prefix, which an undamped
        update always gets right) are kept. The iterate is never NaN.
    - *Divergence.* Undamped methods trust each update over a horizon past the
        converged prefix (initially all of `T`): it shrinks 4× when the update makes
        the merit `½ Σ ‖r_t‖²` over it grow 10⁴-fold, and doubles when the merit
        halves. An update that makes it grow 10⁸-fold (or non-finite) is rejected and
        retried over the shorter horizon. Damped methods ([`partime.ELK`][],
        [`partime.QuasiELK`][]) accept a step only if it decreases the merit, and
        adapt their damping from the achieved versus predicted decrease.
    - *Hopeless cases.* With `fallback=True`, the iteration stops when, at the rate
        at which the converged prefix and the merit have progressed over the last
        tenth of the cap (at least 2 iterations), it would not finish within the
        cap — or after a fortieth of the cap (at least 2) undamped updates in a
        row were rejected. A larger `max_iters` therefore also means more
        patience. Chaotic recurrences (positive largest Lyapunov exponent, e.g.
        Lorenz-63 over many Lyapunov times) are stopped after 2–5 iterations instead
        of running to the cap. The price: a predictable problem whose first updates
        go badly (from a poor guess) can be stopped too, and finished sequentially —
        exact, only not parallel; a better guess or a larger `max_iters` helps.
    - *Exact fallback.* If the iteration did not converge, the steps after the
        leading ones that are exact to rounding are recomputed sequentially (a
        `while_loop` of zero trips when it converged). Restarting after the steps
        that are merely within tolerance would let a chaotic recurrence amplify
        their errors (by `e^{λ t}`) far beyond it.
    """
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be a partime method (e.g. `partime.Newton()`), got "
            f"{method!r}."
        )
    init, length, guess = check_inputs(step, init, xs, length, guess)
    if guess is None:
        guess = jnp.broadcast_to(init, (length, init.shape[0]))
    x0 = _index(xs, 0)
    closed = eqx.filter_closure_convert(
        lambda s, x: step(s, x).astype(init.dtype), init, x0
    )
    states, dynamic_stats = _solve(closed, init, xs, guess, method=method)
    skeleton = Stats(
        num_iterations=jnp.array(0),
        fallback_start=jnp.array(0),
        length=length,
        result=RESULTS.successful,
    )
    return states, eqx.combine(dynamic_stats, skeleton)
