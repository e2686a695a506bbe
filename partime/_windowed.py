"""Windowed parallel-in-time evaluation: fixed blocks and a sliding window.

The whole-sequence solve of [`partime.fixed_point_solve`][] holds every step at once:
`O(T d²)` memory for Newton. Here at most `W` steps are in flight at a time, so memory
is `O(W d²)` (Newton) or `O(W d)` (quasi-Newton, Picard, Jacobi) plus the `O(T d)`
trajectory, for any horizon `T`. Two schedules:

- `"blocks"`: Gauss–Seidel across fixed blocks of `W` steps — a `lax.scan` over the
    blocks, each solved in parallel by `fixed_point_solve` (any method, with its exact
    fallback) from the previous block's last state (Song et al., 2021).
- `"sliding"`: one window of `W` steps that moves forward, after every iteration, by
    the number of its leading steps that have converged, keeping the rest of its
    iterate as the guess for the next iteration (ParaDiGMS; Shih et al., 2023). No
    iteration is spent on steps that have already converged, nor waits for the far
    end of a block.

Derivatives are implicit, as for the whole-sequence solve, and windowed too: the
tangent solve `L ṡ = ∂f·(ṡ_0, ẋ, θ̇)` at the solution is a `lax.scan` over blocks of
`W` steps, each a parallel scan through lineax that carries the incoming tangent state.
Reverse mode is JAX's transpose of that rule: a reverse `lax.scan` over blocks, whose
body is rematerialised so that the Jacobians are never stored for more than one block.
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PyTree

from ._fixed_point import check_inputs, fixed_point_solve
from ._lds import DenseTransition
from ._method.base import AbstractMethod
from ._operator import BidiagonalOperator, ScanSolver
from ._stats import RESULTS


_SCHEDULES = ("sliding", "blocks")


class WindowStats(eqx.Module):
    """Statistics of one windowed solve ([`partime.windowed_solve`][], or
    `partime.scan(..., window=W, return_stats=True)`).

    **Attributes:**

    - `num_iterations`: parallel iterations, summed over all windows. For the sliding
        window this is the depth of the computation: each iteration is one parallel
        evaluation of `W` steps.
    - `num_advances`: how often the window moved: the number of blocks for
        `"blocks"`; the number of iterations after which the sliding window moved
        forward (by at least one step) for `"sliding"`.
    - `num_sequential_steps`: steps computed by the exact sequential fallback.
    - `fallback_start`: the first step that the fallback computed; `length` if none.
    - `length`: the sequence length `T`.
    - `window`: the window length `W` actually used (at most `T`).
    - `schedule`: `"sliding"` or `"blocks"`.
    - `result`: a [`partime.RESULTS`][] member.
    """

    num_iterations: Int[Array, ""]
    num_advances: Int[Array, ""]
    num_sequential_steps: Int[Array, ""]
    fallback_start: Int[Array, ""]
    length: int = eqx.field(static=True)
    window: int = eqx.field(static=True)
    schedule: str = eqx.field(static=True)
    result: RESULTS

    @property
    def fell_back(self) -> Bool[Array, ""]:
        """Whether the sequential fallback computed any step."""
        return self.num_sequential_steps > 0


def _within(x: Array, tol: Array) -> Bool[Array, " W"]:
    """Per step: every component of `|x_t| <= tol_t`. NaN compares False."""
    return jnp.all(jnp.abs(x) <= tol, axis=-1)


def _index(tree: PyTree, t: Int[Array, ""] | int) -> PyTree:
    return jtu.tree_map(lambda a: a[t], tree)


def _slice(tree: PyTree, start: Int[Array, ""], size: int) -> PyTree:
    return jtu.tree_map(
        lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0), tree
    )


def _pad_edge(tree: PyTree, amount: int) -> PyTree:
    """Appends `amount` copies of the last entry along the leading axis."""

    def pad(a):
        tail = jnp.broadcast_to(a[-1:], (amount,) + a.shape[1:])
        return jnp.concatenate([a, tail])

    return jtu.tree_map(pad, tree)


def _split_blocks(tree: PyTree, num_blocks: int, window: int) -> tuple[PyTree, PyTree]:
    """`(full, tail)`: the first `num_blocks·window` entries as `(num_blocks, window,
    ...)`, and the remaining ones."""
    head = num_blocks * window
    full = jtu.tree_map(
        lambda a: a[:head].reshape((num_blocks, window) + a.shape[1:]), tree
    )
    tail = jtu.tree_map(lambda a: a[head:], tree)
    return full, tail


def map_in_windows(fn: Callable, inputs: tuple, window: int) -> PyTree:
    """`jax.vmap(fn)(*inputs)`, evaluated `window` entries at a time (`lax.map`), so
    that `fn`'s intermediates take `O(window)` memory rather than `O(T)`."""
    out_struct = jax.eval_shape(lambda: fn(*_index(inputs, 0)))
    if not jtu.tree_leaves(out_struct):
        # Nothing to compute (and `lax.map` with `batch_size` cannot map to `None`).
        return jax.vmap(fn)(*inputs)
    return jax.lax.map(lambda a: fn(*a), inputs, batch_size=window)


# Forward: fixed blocks -------------------------------------------------------------


def _blocks_forward(step, init, xs, guess, *, method, window, length):
    num_blocks, tail = divmod(length, window)

    def solve_block(carry, inputs, size):
        state, stats = carry
        xs_block, guess_block, offset = inputs
        states, block = fixed_point_solve(
            step, state, xs_block, method, length=size, guess=guess_block
        )
        first = (stats.fallback_start == length) & block.fell_back
        stats = WindowStats(
            num_iterations=stats.num_iterations + block.num_iterations,
            num_advances=stats.num_advances + 1,
            num_sequential_steps=stats.num_sequential_steps
            + block.num_sequential_steps,
            fallback_start=jnp.where(
                first, offset + block.fallback_start, stats.fallback_start
            ),
            length=length,
            window=window,
            schedule="blocks",
            result=RESULTS.where(
                stats.result == RESULTS.successful, block.result, stats.result
            ),
        )
        return (states[-1], stats), states

    zero = jnp.array(0)
    stats = WindowStats(
        num_iterations=zero,
        num_advances=zero,
        num_sequential_steps=zero,
        fallback_start=jnp.array(length),
        length=length,
        window=window,
        schedule="blocks",
        result=RESULTS.successful,
    )
    xs_full, xs_tail = _split_blocks(xs, num_blocks, window)
    guess_full, guess_tail = _split_blocks(guess, num_blocks, window)
    offsets = jnp.arange(num_blocks) * window
    carry = (init, stats)
    pieces = []
    if num_blocks > 0:
        carry, states = jax.lax.scan(
            lambda c, i: solve_block(c, i, window),
            carry,
            (xs_full, guess_full, offsets),
        )
        pieces.append(states.reshape(num_blocks * window, -1))
    if tail > 0:
        carry, states = solve_block(
            carry, (xs_tail, guess_tail, jnp.array(num_blocks * window)), tail
        )
        pieces.append(states)
    _, stats = carry
    return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0], stats


# Forward: the sliding window -------------------------------------------------------


def _sliding_forward(step, init, xs, guess, scale, *, method, window, length):
    size = init.shape[0]
    rtol, atol = method.tolerances(init.dtype)
    # A step that has been iterated this often without being accepted means the
    # window is making too little progress: the fallback finishes the window. At most
    # `window - 1`: a step takes that long to reach the front when the window only
    # ever advances by its exact front step, which is sequential stepping at
    # `window` times the work.
    cap = max(min(method.iteration_cap(window), window - 1), 1)
    # Every window has `window` steps. Near the end, where fewer remain, the window
    # holds the last `window` inputs rotated so that step `pos` comes first: the
    # entries past the end are never accepted nor updated (so they cannot become
    # non-finite and spill into the scan), and nothing of size `T` is copied.
    if guess is not None:
        guess = jnp.concatenate(
            [guess, jnp.broadcast_to(guess[-1], (2 * window, size))]
        )
        first_window = guess[:window]
    else:
        first_window = jnp.broadcast_to(init, (window, size))
    index = jnp.arange(window)
    init_finite = jnp.all(jnp.isfinite(init))

    def cond_fun(carry):
        pos, stopped = carry[0], carry[1]
        return (pos < length) & ~stopped & init_finite

    def body_fun(carry):
        (pos, _, it, advances, seq, fb_start, _, head, iterate, entered, buf) = carry
        start = jnp.minimum(pos, length - window)
        offset = pos - start
        xs_window = jtu.tree_map(
            lambda a: jnp.roll(a, -offset, axis=0), _slice(xs, start, window)
        )
        valid = index < length - pos
        num_valid = jnp.minimum(window, length - pos)

        prev = jnp.concatenate([head[None], iterate[:-1]])
        f, transition = method.linearise(step, prev, xs_window)
        residual = iterate - f
        scale_window = jnp.roll(
            jax.lax.dynamic_slice_in_dim(scale, start, window), -offset
        )
        tol = scale_window[:, None] * (atol + rtol * jnp.abs(iterate))
        # The leading steps whose residual is within tolerance are final: each one's
        # predecessor is final too (the first one's is `head`).
        converged = jnp.sum(jnp.cumprod((_within(residual, tol) & valid).astype(int)))
        delta = lx.linear_solve(
            BidiagonalOperator(transition), -residual, ScanSolver(), throw=False
        ).value
        # The accepted steps take this update too: for Newton it squares their error
        # (for Jacobi it is one more sweep), for the others it moves them by about
        # the residuals just found within tolerance.
        new = jnp.where(valid[:, None], iterate + delta, iterate)
        # The front step's predecessor is final, so its update is exact: the window
        # always advances by at least that step.
        new = new.at[0].set(f[0])
        accepted = jnp.maximum(converged, 1)

        first_open = jnp.minimum(accepted, window - 1)
        slow = (accepted < num_valid) & (it + 1 - entered[first_open] >= cap)
        failed = slow | ~jnp.all(jnp.isfinite(new))
        if method.fallback:
            # Exact sequential completion of the window from its converged prefix;
            # a loop of zero trips unless the window failed (not a `cond`, which
            # becomes a `select` under `vmap` and would always pay for it).
            end = jnp.where(failed, num_valid, accepted)

            def fallback_body(c):
                j, new = c
                p = jnp.where(j == 0, head, new[jnp.maximum(j - 1, 0)])
                return j + 1, new.at[j].set(step(p, _index(xs_window, j)))

            _, new = jax.lax.while_loop(
                lambda c: c[0] < end, fallback_body, (accepted, new)
            )
            advance = end
            stopped = jnp.array(False)
            seq = seq + end - accepted
            fb_start = jnp.where(
                failed & (fb_start == length), pos + accepted, fb_start
            )
        else:
            advance = accepted
            stopped = failed
        result = RESULTS.where(
            ~stopped,
            RESULTS.successful,
            RESULTS.where(
                jnp.all(jnp.isfinite(new)),
                RESULTS.max_iters_reached,
                RESULTS.diverged,
            ),
        )

        old = jax.lax.dynamic_slice_in_dim(buf, start, window)
        merged = jnp.where((index < offset)[:, None], old, jnp.roll(new, offset, 0))
        buf = jax.lax.dynamic_update_slice_in_dim(buf, merged, start, axis=0)
        head = jnp.where(advance > 0, new[jnp.maximum(advance - 1, 0)], head)
        # The rest of this iterate is the next guess; new steps enter at the far end,
        # from the user's guess or, by default, the window's last value.
        if guess is None:
            fill = jnp.broadcast_to(new[-1], (window, size))
        else:
            fill = jax.lax.dynamic_slice_in_dim(guess, pos + window, window)
        iterate = jax.lax.dynamic_slice_in_dim(
            jnp.concatenate([new, fill]), advance, window
        )
        entered = jax.lax.dynamic_slice_in_dim(
            jnp.concatenate([entered, jnp.full(window, it + 1)]), advance, window
        )
        return (
            pos + advance,
            stopped,
            it + 1,
            advances + (advance > 0),
            seq,
            fb_start,
            result,
            head,
            iterate,
            entered,
            buf,
        )

    zero = jnp.array(0)
    carry = (
        zero,
        jnp.array(False),
        zero,
        zero,
        zero,
        jnp.array(length),
        RESULTS.successful,
        init,
        first_window,
        jnp.zeros(window, zero.dtype),
        jnp.zeros((length, size), init.dtype),
    )
    carry = jax.lax.while_loop(cond_fun, body_fun, carry)
    _, _, it, advances, seq, fb_start, result, _, _, _, buf = carry
    stats = WindowStats(
        num_iterations=it,
        num_advances=advances,
        num_sequential_steps=seq,
        fallback_start=fb_start,
        length=length,
        window=window,
        schedule="sliding",
        result=RESULTS.where(init_finite, result, RESULTS.nonfinite_input),
    )
    return buf, stats


# The solve and its windowed implicit derivative ------------------------------------


@eqx.filter_custom_jvp
def _solve(step, init, xs, guess, scale, *, method, window, schedule, length):
    guess = jax.lax.stop_gradient(guess)
    scale = jax.lax.stop_gradient(scale)
    if schedule == "blocks":
        states, stats = _blocks_forward(
            step, init, xs, guess, method=method, window=window, length=length
        )
    else:
        states, stats = _sliding_forward(
            step, init, xs, guess, scale, method=method, window=window, length=length
        )
    # Custom-JVP outputs must be arrays: the statistics leave without their static part.
    return states, eqx.filter(stats, eqx.is_array)


def _zeros_for_none(primal, tangent):
    if tangent is None and eqx.is_inexact_array(primal):
        return jnp.zeros_like(primal)
    return tangent


def _tangent_solve(step, init, states, xs, tangents, *, window, length):
    """`L ṡ = ∂f/∂(s_0, x, θ)·(ṡ_0, ẋ, θ̇)` at the solution, `window` steps at a time:
    each block's Newton operator is solved by a parallel scan, its first step fed by
    the previous block's last tangent."""
    t_step, t_init, t_xs = jtu.tree_map(
        _zeros_for_none, (step, init, xs), tangents, is_leaf=lambda x: x is None
    )
    # No `stop_gradient` on the solution or the Jacobians: differentiating this
    # rule again (second derivatives) must see how they move; at first order they
    # are known values and cost nothing more.
    prev = jnp.concatenate([init[None], states[:-1]])

    def block(t_in, inputs):
        prev_block, xs_block, t_xs_block = inputs
        t_prev = jnp.zeros_like(prev_block).at[0].set(t_in)
        # How f_t moves with (s_{t-1} at the block's first step only, x_t, θ): the
        # other previous states' motion is what the block's operator accounts for.
        _, rhs = eqx.filter_jvp(
            lambda step, p, x: jax.vmap(step)(p, x),
            (step, prev_block, xs_block),
            (t_step, t_prev, t_xs_block),
        )
        jacobians = jax.vmap(jax.jacfwd(step))(prev_block, xs_block)
        operator = BidiagonalOperator(DenseTransition(jacobians))
        t_states = lx.linear_solve(operator, rhs, ScanSolver()).value
        return t_states[-1], t_states

    # The last, partial block is padded to a full one (repeating the last state and
    # input, with zero input tangents): being after every real step, the padding
    # cannot affect them, and there is one compiled block rather than two.
    num_blocks = -(-length // window)
    pad = num_blocks * window - length
    if pad:
        last = states[-1]
        prev = jnp.concatenate([prev, jnp.broadcast_to(last, (pad,) + last.shape)])
        xs = _pad_edge(xs, pad)
        t_xs = jtu.tree_map(
            lambda a: jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]),
            t_xs,
        )
    blocks, _ = _split_blocks((prev, xs, t_xs), num_blocks, window)
    # Rematerialised: reverse mode then stores each block's inputs, not its Jacobians,
    # and recomputes them in the backward scan: O(W d²) memory.
    _, t_states = jax.lax.scan(jax.checkpoint(block), t_init, blocks)
    return t_states.reshape(num_blocks * window, -1)[:length]


@_solve.def_jvp
def _solve_jvp(primals, tangents, *, method, window, schedule, length):
    step, init, xs, guess, scale = primals
    t_step, t_init, t_xs, _, _ = tangents
    states, stats = _solve(
        step,
        init,
        xs,
        guess,
        scale,
        method=method,
        window=window,
        schedule=schedule,
        length=length,
    )
    t_states = _tangent_solve(
        step,
        init,
        states,
        xs,
        (t_step, t_init, t_xs),
        window=window,
        length=length,
    )
    t_stats = jtu.tree_map(lambda _: None, stats)
    return (states, stats), (t_states, t_stats)


def windowed_solve(
    step: Callable[[Float[Array, " d"], PyTree[Any]], Float[Array, " d"]],
    init: Float[Array, " d"],
    xs: PyTree[Any],
    method: AbstractMethod,
    *,
    window: int | None,
    schedule: Literal["sliding", "blocks"] = "sliding",
    length: int | None = None,
    guess: Float[Array, "T d"] | None = None,
    tolerance_scale: ArrayLike | None = None,
) -> tuple[Float[Array, "T d"], WindowStats]:
    """Evaluates the recurrence `s_t = step(s_{t-1}, x_t)`, `t = 1..T`, in parallel,
    `window` steps at a time.

    As [`partime.fixed_point_solve`][], but at most `W = window` steps are solved at
    once: memory `O(W d²)` for Newton, `O(W d)` for the other methods (plus the
    `O(T d)` trajectory), for any `T`; depth `O((T / W)·iterations·log W)`.

    - `schedule="blocks"`: Gauss–Seidel across fixed blocks of `W` steps, each solved
        by `fixed_point_solve` with `method` (any method, its own iteration cap and
        exact fallback) from the previous block's last state.
    - `schedule="sliding"` (ParaDiGMS): a window of `W` steps that, after every
        iteration, moves forward past its leading steps that have converged (their
        residuals are within tolerance, see below), and keeps
        the rest of its iterate as the next guess; new steps enter at the far end
        from `guess` or, by default, from the window's last value. The step at the
        front of the window is exact after one iteration (its predecessor is final), so
        the window always advances. The window *fails* if a step stays in it for the
        method's `max_iters` iterations, or for `W - 1` (the window then advances by
        its exact front step only: sequential stepping at `W` times the work),
        without converging, or if the iterate becomes non-finite. Then, with
        `fallback=True`, the rest of the window is computed sequentially from its
        converged prefix and a fresh window starts after it; with `fallback=False`
        the solve stops and reports it. Needs an undamped method defined by its
        `linearise` (Newton, QuasiNewton, Picard, Jacobi).

    **Arguments:**

    - `step`, `init`, `xs`, `method`, `length`, `guess`: as for
        [`partime.fixed_point_solve`][].
    - `window`: `W`, the number of steps in flight; `None` (or `W >= T`) for the whole
        sequence in one window.
    - `schedule`: `"sliding"` (default) or `"blocks"`.
    - `tolerance_scale`: optional positive factors, a scalar or shape `(T,)`, that
        scale the convergence tolerance `atol + rtol·|s_t|` step by step (sliding window
        only). See below for when this is sound.

    **Returns:** `(states, stats)`: `s_1..s_T` with shape `(T, d)` and a
    [`partime.WindowStats`][].

    Differentiable (forward and reverse mode) with respect to `init`, the floating
    leaves of `xs`, and arrays closed over by `step`, by implicit differentiation at
    the solution, windowed as well: one parallel linear solve per block of `W` steps,
    carrying the tangent from block to block. Reverse mode recomputes each block's
    Jacobians rather than storing them, so it too needs only `O(W d²)` memory. The
    result does not depend on the schedule or the window (up to the tolerance), nor do
    its derivatives.

    **Scaled tolerances.** The sliding window accepts a step when its residual
    `s_t - step(s_{t-1}, x_t)` is within `tolerance_scale_t · (atol + rtol·|s_t|)`, in
    every component (and its predecessors are accepted). A scale above 1 trades
    accuracy at that
    step for fewer iterations: the accepted `s_t` may then be off by about that much
    from `step(s_{t-1}, x_t)`, and the error carries forward through the later steps
    (amplified by the products of their Jacobians). "Equal to `lax.scan` to
    tolerance", for the values and the derivatives, then holds only to the scaled
    tolerance. It is sound where each step's own uncertainty dwarfs that error: a
    diffusion sampler adds noise of standard deviation `σ_t` at step `t`, and an error
    far below `σ_t` is invisible in the distribution of the samples (ParaDiGMS scales
    the tolerance by each step's noise variance). It is not sound for a deterministic
    recurrence whose individual trajectory matters, nor for an expanding (chaotic)
    one, which amplifies every accepted error.

    ??? cite "References"

        ```bibtex
        @inproceedings{shih2023parallel,
            title={Parallel Sampling of Diffusion Models},
            author={Shih, Andy and Belkhale, Suneel and Ermon, Stefano and Sadigh, Dorsa
                    and Anari, Nima},
            booktitle={Advances in Neural Information Processing Systems},
            year={2023}
        }

        @inproceedings{song2021accelerating,
            title={Accelerating Feedforward Computation via Parallel Nonlinear Equation
                   Solving},
            author={Song, Yang and Meng, Chenlin and Liao, Renjie and Ermon, Stefano},
            booktitle={International Conference on Machine Learning},
            year={2021}
        }
        ```
    """
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be a partime method (e.g. `partime.Newton()`), got "
            f"{method!r}."
        )
    if schedule not in _SCHEDULES:
        raise ValueError(
            f"`schedule` must be one of {_SCHEDULES}, got {schedule!r}: 'sliding' for "
            "the ParaDiGMS sliding window, 'blocks' for Gauss-Seidel across blocks."
        )
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)):
        raise TypeError(f"`window` must be a Python int or None, got {window!r}.")
    if window is not None and window < 1:
        raise ValueError(f"`window` must be at least 1, got {window}.")
    init, length, guess = check_inputs(step, init, xs, length, guess)
    window = length if window is None else min(window, length)
    if xs is None or not jtu.tree_leaves(xs):
        # The sliding window slices the inputs: give it a placeholder with a time axis.
        xs_solve = jnp.zeros((length, 0), init.dtype)
        wrap = lambda f: lambda s, x: f(s, None)
    else:
        xs_solve = xs
        wrap = lambda f: f
    if tolerance_scale is None:
        scale = jnp.ones(length, init.dtype)
    else:
        if schedule == "blocks":
            raise ValueError(
                "`tolerance_scale` works with `schedule='sliding'` only: the blocks "
                "are solved by `partime.fixed_point_solve`, which takes the method's "
                "tolerances. Use the sliding window (it wastes fewer iterations too)."
            )
        scale = jnp.asarray(tolerance_scale)
        if scale.ndim > 1 or (scale.ndim == 1 and scale.shape[0] != length):
            raise ValueError(
                f"`tolerance_scale` must be a scalar or have shape ({length},), got "
                f"shape {scale.shape}."
            )
        if not jnp.issubdtype(scale.dtype, jnp.floating):
            scale = scale.astype(init.dtype)
        scale = jnp.broadcast_to(scale, (length,)).astype(init.dtype)
    closed = eqx.filter_closure_convert(
        wrap(lambda s, x: step(s, x).astype(init.dtype)),
        init,
        _index(xs_solve, 0),
    )
    states, dynamic_stats = _solve(
        closed,
        init,
        xs_solve,
        guess,
        scale,
        method=method,
        window=window,
        schedule=schedule,
        length=length,
    )
    skeleton = WindowStats(
        num_iterations=jnp.array(0),
        num_advances=jnp.array(0),
        num_sequential_steps=jnp.array(0),
        fallback_start=jnp.array(0),
        length=length,
        window=window,
        schedule=schedule,
        result=RESULTS.successful,
    )
    return states, eqx.combine(dynamic_stats, skeleton)
