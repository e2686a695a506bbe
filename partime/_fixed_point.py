"""The fixed-point solve of a whole sequence, and its implicit derivative.

Solves `r_t = s_t - f(s_{t-1}, x_t) = 0`, `t = 1..T`, for `s_1..s_T` given `s_0`,
by the iterations of an [`partime.AbstractMethod`][], with an exact sequential fallback
from the converged prefix. Derivatives never unroll the iterations: at the solution, the
implicit function theorem gives `L ṡ = ∂f/∂(s_0, x, θ) · (ṡ_0, ẋ, θ̇)` with the Newton
operator `L` (block lower-bidiagonal, `A_t = ∂f/∂s_{t-1}`), one parallel scan through
lineax. Reverse mode is JAX's transpose of that rule: one reverse scan.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._fallback import sequential_completion
from ._lds import DenseTransition
from ._method.base import AbstractMethod
from ._operator import BidiagonalOperator, ScanSolver
from ._stats import RESULTS, Stats


def _index(xs: PyTree, t: Int[Array, ""] | int) -> PyTree:
    return jtu.tree_map(lambda a: a[t], xs)


def _previous(init: Float[Array, " d"], states: Float[Array, "T d"]) -> Array:
    """`s_0, ..., s_{T-1}`."""
    return jnp.concatenate([init[None], states[:-1]])


def _within(x: Array, tol: Array) -> Bool[Array, " T"]:
    """Per step: every component of `|x_t| <= tol_t`. NaN compares False: not within."""
    return jnp.all(jnp.abs(x) <= tol, axis=-1)


def _iterate(
    step: Callable, init: Array, xs: PyTree, guess: Array, method: AbstractMethod
) -> tuple[Array, Stats]:
    length, size = guess.shape
    rtol, atol = method.tolerances(init.dtype)
    cap = method.iteration_cap(length)
    init_finite = jnp.all(jnp.isfinite(init))

    def cond_fun(carry):
        it, _, converged, diverged = carry
        return (it < cap) & ~converged & ~diverged & init_finite

    def body_fun(carry):
        it, states, _, _ = carry
        f, transition = method.linearise(step, _previous(init, states), xs)
        residual = states - f
        # Delta form: L Δ = -r. Avoids cancellation between s^{(i+1)} and s^{(i)}.
        delta = lx.linear_solve(
            BidiagonalOperator(transition), -residual, ScanSolver(), throw=False
        ).value
        tol = atol + rtol * jnp.abs(states)
        converged = jnp.all(_within(delta, tol) & _within(residual, tol))
        new_states = states + delta
        finite = jnp.all(jnp.isfinite(new_states))
        # Keep the last finite iterate: the fallback continues from its prefix.
        states = jnp.where(finite, new_states, states)
        return it + 1, states, converged & finite, ~finite

    carry = (jnp.array(0), guess, jnp.array(False), jnp.array(False))
    num_iterations, states, converged, diverged = jax.lax.while_loop(
        cond_fun, body_fun, carry
    )

    # The converged prefix: leading steps whose residual is within tolerance. Computed
    # in a loop of zero trips when the iteration converged (a `cond` would become a
    # `select` under `vmap` and always pay for it).
    def prefix_body(carry):
        _, _ = carry
        f = jax.vmap(step)(_previous(init, states), xs)
        ok = _within(states - f, atol + rtol * jnp.abs(states))
        return jnp.sum(jnp.cumprod(ok.astype(jnp.int32))), jnp.array(True)

    no_prefix_needed = converged | ~init_finite
    prefix, _ = jax.lax.while_loop(
        lambda carry: ~carry[1],
        prefix_body,
        (jnp.array(length), no_prefix_needed),
    )

    if method.fallback:
        # Exact sequential completion from the converged prefix; zero trips if none.
        states = sequential_completion(step, init, xs, states, prefix)
        result = RESULTS.where(init_finite, RESULTS.successful, RESULTS.nonfinite_input)
        fallback_start = prefix
    else:
        result = RESULTS.where(
            converged,
            RESULTS.successful,
            RESULTS.where(diverged, RESULTS.diverged, RESULTS.max_iters_reached),
        )
        result = RESULTS.where(init_finite, result, RESULTS.nonfinite_input)
        fallback_start = jnp.array(length)
    stats = Stats(
        num_iterations=num_iterations,
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
    fixed_states = jax.lax.stop_gradient(states)

    # Right-hand side: how f_t moves with (s_0, x_t, θ) at the solution, with the
    # previous states held fixed (their motion is what L accounts for).
    def evaluate(step, init, xs):
        return jax.vmap(step)(_previous(init, fixed_states), xs)

    primals_in = (step, init, xs)
    tangents_in = jtu.tree_map(
        _zeros_for_none, primals_in, (t_step, t_init, t_xs), is_leaf=lambda x: x is None
    )
    _, rhs = eqx.filter_jvp(evaluate, primals_in, tangents_in)

    jacobians = jax.vmap(jax.jacfwd(step))(_previous(init, fixed_states), xs)
    operator = BidiagonalOperator(DenseTransition(jax.lax.stop_gradient(jacobians)))
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
    - `guess`: the first iterate for `s_1..s_T`; defaults to `s_0` at every step.

    **Returns:** `(states, stats)`: `s_1..s_T` with shape `(T, d)`, and a
    [`partime.Stats`][].

    Differentiable (forward and reverse mode) with respect to `init`, the floating
    leaves of `xs`, and arrays closed over by `step`, by implicit differentiation.
    """
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be a partime method (e.g. `partime.Newton()`), got "
            f"{method!r}."
        )
    init = jnp.asarray(init)
    if init.ndim != 1 or not jnp.issubdtype(init.dtype, jnp.inexact):
        raise ValueError(
            "`init` must be a 1-D floating-point array, got "
            f"shape {init.shape} and dtype {init.dtype}."
        )
    lengths = {leaf.shape[0] for leaf in jtu.tree_leaves(xs) if jnp.ndim(leaf) > 0}
    if any(jnp.ndim(leaf) == 0 for leaf in jtu.tree_leaves(xs)):
        raise ValueError("Every leaf of `xs` needs a leading (time) axis.")
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
    if guess is None:
        guess = jnp.broadcast_to(init, (length, init.shape[0]))
    elif guess.shape != (length, init.shape[0]):
        raise ValueError(
            f"`guess` must have shape {(length, init.shape[0])}, got {guess.shape}."
        )
    guess = guess.astype(init.dtype)
    x0 = _index(xs, 0)
    out_struct = jax.eval_shape(step, init, x0)
    if not (
        isinstance(out_struct, jax.ShapeDtypeStruct) and out_struct.shape == init.shape
    ):
        raise ValueError(
            f"`step` must map a state of shape {init.shape} to one of the same shape, "
            f"got {out_struct}."
        )
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
