"""Windowed layouts of time: fixed blocks and a sliding window.

The whole-sequence layout holds every step at once: `O(T d²)` memory for Newton. Here
at most `W` steps are in flight at a time, so memory is `O(W d²)` (Newton) or `O(W d)`
(quasi-Newton, Picard, Jacobi) plus the `O(T d)` trajectory, for any horizon `T`.

- `Blocks`: Gauss–Seidel across fixed blocks of `W` steps — a `lax.scan` over the
    blocks, each solved by the one loop (any method, every safeguard, its exact
    fallback) from the previous block's last state (Song et al., 2021).
- `SlidingWindow`: one window of `W` steps that moves forward, after every
    iteration, by the number of its leading steps that have converged, keeping the
    rest of its iterate as the guess for the next iteration (ParaDiGMS; Shih et al.,
    2023). No iteration is spent on steps that have already converged, nor waits for
    the far end of a block.

Derivatives come from the one rule of `partime._fixed_point`, and are windowed too:
the tangent solve at the solution is a `lax.scan` over blocks of `W` steps, each the
whole-sequence tangent solve carrying the incoming tangent state. Reverse mode is
JAX's transpose of that: a reverse `lax.scan` over blocks, whose body is
rematerialised so that the Jacobians are never stored for more than one block.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Int, PyTree

from ._fallback import sequential_completion
from ._layout import AbstractLayout, linear_tangent_solve, WholeSequence, zeros_for_none
from ._loop import iterate, within
from ._method.base import AbstractDampedMethod
from ._stats import count, RESULTS, Stats


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


class _AbstractWindowed(AbstractLayout):
    length: eqx.AbstractVar[int]
    window: eqx.AbstractVar[int]

    def tangent_solve(self, step, init, xs, states, tangents):
        """The whole-sequence tangent solve, `window` steps at a time, each block's
        first step fed by the previous block's last tangent."""
        window, length = self.window, self.length
        t_step, t_init, t_xs = jtu.tree_map(
            zeros_for_none, (step, init, xs), tangents, is_leaf=lambda x: x is None
        )
        # The last, partial block is padded to a full one (repeating the last state
        # and input, with zero input tangents): being after every real step, the
        # padding cannot affect them, and there is one compiled block rather than two.
        num_blocks = -(-length // window)
        pad = num_blocks * window - length
        if pad:
            states = _pad_edge(states, pad)
            xs = _pad_edge(xs, pad)
            zeros = lambda a: jnp.zeros((pad,) + a.shape[1:], a.dtype)
            t_xs = jtu.tree_map(lambda a: jnp.concatenate([a, zeros(a)]), t_xs)
        blocks, _ = _split_blocks((states, xs, t_xs), num_blocks, window)
        inits = jnp.concatenate([init[None], blocks[0][:-1, -1]])

        def block(t_in, inputs):
            block_init, (block_states, xs_block, t_xs_block) = inputs
            t_states = linear_tangent_solve(
                step, block_init, xs_block, block_states, (t_step, t_in, t_xs_block)
            )
            return t_states[-1], t_states

        # Rematerialised: reverse mode then stores each block's inputs, not its
        # Jacobians, and recomputes them in the backward scan: O(W d²) memory.
        _, t_states = jax.lax.scan(jax.checkpoint(block), t_init, (inits, blocks))
        return t_states.reshape(num_blocks * window, -1)[:length]


class Blocks(_AbstractWindowed):
    """Gauss–Seidel across fixed blocks of `window` steps."""

    length: int = eqx.field(static=True)
    window: int = eqx.field(static=True)

    def forward(self, step, init, xs, guess, scale, method):
        del scale
        length, window = self.length, self.window
        num_blocks, tail = divmod(length, window)

        def solve_block(carry, inputs, size):
            state, stats = carry
            xs_block, guess_block, offset = inputs
            states, block = iterate(
                step, state, xs_block, guess_block, method, WholeSequence(size)
            )
            first = (stats.fallback_start == length) & block.fell_back
            stats = Stats(
                num_iterations=stats.num_iterations + block.num_iterations,
                num_advances=stats.num_advances + 1,
                num_sequential_steps=stats.num_sequential_steps
                + block.num_sequential_steps,
                fallback_start=jnp.where(
                    first, offset + block.fallback_start, stats.fallback_start
                ),
                length=length,
                result=RESULTS.where(
                    stats.result == RESULTS.successful, block.result, stats.result
                ),
            )
            return (states[-1], stats), states

        zero = count(0)
        stats = Stats(
            num_iterations=zero,
            num_advances=zero,
            num_sequential_steps=zero,
            fallback_start=count(length),
            length=length,
            result=RESULTS.successful,
        )
        xs_full, xs_tail = _split_blocks(xs, num_blocks, window)
        guess_full, guess_tail = _split_blocks(guess, num_blocks, window)
        offsets = jnp.arange(num_blocks, dtype=jnp.int32) * window
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
                carry, (xs_tail, guess_tail, count(num_blocks * window)), tail
            )
            pieces.append(states)
        _, stats = carry
        return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0], stats


class SlidingWindow(_AbstractWindowed):
    """The ParaDiGMS sliding window of `window` steps."""

    length: int = eqx.field(static=True)
    window: int = eqx.field(static=True)

    def check(self, method):
        if isinstance(method, AbstractDampedMethod):
            raise ValueError(
                f"{type(method).__name__} is a damped method: its Levenberg–Marquardt "
                "step needs the merit of the whole window, which the sliding window "
                "changes every iteration. Use `schedule='blocks'` (each block is "
                "damped), or an undamped method (e.g. `partime.Newton()`)."
            )

    def default_guess(self, init):
        # New steps enter at the far end from the window's last value.
        return None

    def forward(self, step, init, xs, guess, scale, method):
        return _sliding_forward(
            step,
            init,
            xs,
            guess,
            scale,
            method=method,
            window=self.window,
            length=self.length,
        )


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
    index = jnp.arange(window, dtype=jnp.int32)
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
        delta = transition.solve(-residual)
        scale_window = jnp.roll(
            jax.lax.dynamic_slice_in_dim(scale, start, window), -offset
        )
        tol = scale_window[:, None] * (atol + rtol * jnp.abs(iterate))
        # The leading steps whose residual and update are within tolerance (the
        # meaning of `rtol`, `atol` on every layout) are final: each one's
        # predecessor is final too (the first one's is `head`).
        ok = within(residual, tol) & within(delta, tol) & valid
        converged = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)), dtype=jnp.int32)
        # The accepted steps take this update too: for Newton it squares their error
        # (for Jacobi it is one more sweep), for the others it moves them by at most
        # the tolerance.
        new = jnp.where(valid[:, None], iterate + delta, iterate)
        # The front step's predecessor is final, so its update is exact: the window
        # always advances by at least that step.
        new = new.at[0].set(f[0])
        accepted = jnp.maximum(converged, 1)

        first_open = jnp.minimum(accepted, window - 1)
        slow = (accepted < num_valid) & (it + 1 - entered[first_open] >= cap)
        finite = jnp.all(jnp.isfinite(new), axis=-1)
        diverged = ~jnp.all(finite)
        failed = slow | diverged
        # As in the loop: past its first non-finite step, the iterate continues the
        # last finite state as a constant, so that it is never NaN. (The accepted
        # steps are final, whatever their value.)
        first_bad = jnp.sum(jnp.cumprod(finite.astype(jnp.int32)), dtype=jnp.int32)
        cut = jnp.maximum(first_bad, accepted)
        new = jnp.where((index >= cut)[:, None], new[cut - 1], new)
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
                diverged,
                RESULTS.nonlinear_divergence,
                RESULTS.nonlinear_max_steps_reached,
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
            jnp.concatenate([entered, jnp.full(window, it + 1, jnp.int32)]),
            advance,
            window,
        )
        return (
            pos + advance,
            stopped,
            it + 1,
            advances + (advance > 0).astype(jnp.int32),
            seq,
            fb_start,
            result,
            head,
            iterate,
            entered,
            buf,
        )

    zero = count(0)
    carry = (
        zero,
        jnp.array(False),
        zero,
        zero,
        zero,
        count(length),
        RESULTS.successful,
        init,
        first_window,
        jnp.zeros(window, jnp.int32),
        jnp.zeros((length, size), init.dtype),
    )
    carry = jax.lax.while_loop(cond_fun, body_fun, carry)
    _, _, it, advances, seq, fb_start, result, _, _, _, buf = carry
    # A non-finite `init`: every step sequentially, as `jax.lax.scan` would.
    start = jnp.where(init_finite, length, 0)
    buf = sequential_completion(step, init, xs, buf, start)
    stats = Stats(
        num_iterations=it,
        num_advances=advances,
        num_sequential_steps=jnp.where(init_finite, seq, length).astype(jnp.int32),
        fallback_start=jnp.where(init_finite, fb_start, 0).astype(jnp.int32),
        length=length,
        result=RESULTS.where(init_finite, result, RESULTS.nonfinite_input),
    )
    return buf, stats
