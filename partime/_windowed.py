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
- `AutomaticWindow` (`window="auto"`): every step in flight, as on the whole
    sequence, until the iteration is hopeless there; then updates are trusted only
    over a window past the converged prefix that narrows at every hopeless verdict,
    and where the prefix moves too slowly for its width, and the fallback runs only
    at the narrowest.

Derivatives come from the one rule of `partime._fixed_point`, and are windowed too:
the tangent solve at the solution is a `lax.scan` over blocks of `W` steps, each the
whole-sequence tangent solve carrying the incoming tangent state. Reverse mode is
JAX's transpose of that: a reverse `lax.scan` over blocks, whose body is
rematerialised so that the Jacobians are never stored for more than one block.
"""

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Int, PyTree

from ._layout import AbstractLayout, linear_tangent_solve, WholeSequence, zeros_for_none
from ._loop import AbstractSchedule, iterate, WholeSchedule
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

    def tangent_solve(self, step, init, xs, states, tangents, method):
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
                step,
                block_init,
                xs_block,
                block_states,
                (t_step, t_in, t_xs_block),
                method,
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

    def forward(self, step, init, xs, guess, scale, method, give_up):
        del scale
        length, window = self.length, self.window
        num_blocks, tail = divmod(length, window)

        def solve_block(carry, inputs, size):
            state, stats, weight = carry
            xs_block, guess_block, offset = inputs
            states, block = iterate(
                step,
                state,
                xs_block,
                guess_block,
                method,
                WholeSequence(size),
                give_up=give_up,
            )
            first = (stats.fallback_start == length) & block.fell_back
            # The mean estimate over the blocks that have one.
            has = ~jnp.isnan(block.lyapunov)
            share = jnp.where(has, count(size), count(0))
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
                lyapunov=stats.lyapunov + jnp.where(has, block.lyapunov * size, 0),
                window=stats.window,
            )
            return (states[-1], stats, weight + share), states

        zero = count(0)
        stats = Stats(
            num_iterations=zero,
            num_advances=zero,
            num_sequential_steps=zero,
            fallback_start=count(length),
            length=length,
            result=RESULTS.successful,
            lyapunov=jnp.zeros((), init.dtype),
            window=count(min(window, length)),
        )
        xs_full, xs_tail = _split_blocks(xs, num_blocks, window)
        guess_full, guess_tail = _split_blocks(guess, num_blocks, window)
        offsets = jnp.arange(num_blocks, dtype=jnp.int32) * window
        carry = (init, stats, count(0))
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
        _, stats, weight = carry
        lyapunov = stats.lyapunov / jnp.maximum(weight, 1).astype(init.dtype)
        lyapunov = jnp.where(weight > 0, lyapunov, jnp.nan).astype(init.dtype)
        stats = eqx.tree_at(lambda s: s.lyapunov, stats, lyapunov)
        return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0], stats


class _Sliding(AbstractSchedule):
    """The schedule of the sliding window: `window` steps in flight, from `start`; after
    every iteration the window moves on by its settled steps (never past the last
    `window` steps). Its state is `(start, trajectory)`: the trajectory holds the
    final steps before the window and the user's guess after it."""

    length: int = eqx.field(static=True)
    window: int = eqx.field(static=True)
    guessed: bool = eqx.field(static=True)
    moves: ClassVar[bool] = True

    def iteration_cap(self, method):
        # The method's cap on a window of `window` steps, for each of the windows
        # that tile the sequence.
        return -(-self.length // self.window) * method.iteration_cap(self.window)

    def start(self, init, guess):
        window, size = self.window, init.shape[0]
        if guess is None:
            # New steps enter at the far end from the window's last value.
            return (count(0), jnp.zeros((self.length + window, size), init.dtype)), (
                jnp.broadcast_to(init, (window, size))
            )
        # Padded by `window` steps, so that the fill after the window is one slice.
        tail = jnp.broadcast_to(guess[-1], (window, size))
        return (count(0), jnp.concatenate([guess, tail])), guess[:window]

    def in_flight(self, state, init, xs, scale):
        start, trajectory = state
        head = jnp.where(start == 0, init, trajectory[jnp.maximum(start - 1, 0)])
        if scale is not None:
            scale = jax.lax.dynamic_slice_in_dim(scale, start, self.window)
        return head, _slice(xs, start, self.window), scale

    def offset(self, state):
        return state[0]

    def advance(self, state, states, settled):
        start, trajectory = state
        window = self.window
        trajectory = jax.lax.dynamic_update_slice_in_dim(trajectory, states, start, 0)
        shift = jnp.clip(settled, 0, self.length - window - start)
        if self.guessed:
            fill = jax.lax.dynamic_slice_in_dim(trajectory, start + window, window)
        else:
            fill = jnp.broadcast_to(states[-1], states.shape)
        moved = jax.lax.dynamic_slice_in_dim(
            jnp.concatenate([states, fill]), shift, window
        )
        return (start + shift, trajectory), moved, shift

    def finish(self, state, states):
        start, trajectory = state
        trajectory = jax.lax.dynamic_update_slice_in_dim(trajectory, states, start, 0)
        return trajectory[: self.length]

    def width(self, state):
        return count(self.window)


class SlidingWindow(_AbstractWindowed):
    """The ParaDiGMS sliding window of `window` steps: the one loop, on the steps in
    the window, moving it on past the steps that have settled."""

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

    def forward(self, step, init, xs, guess, scale, method, give_up):
        window = min(self.window, self.length)
        schedule = _Sliding(self.length, window, guess is not None)
        return iterate(
            step,
            init,
            xs,
            guess,
            method,
            WholeSequence(window),
            schedule,
            scale,
            give_up,
        )


# The automatic window narrows this many times per hopeless verdict, down to this
# fraction of the sequence.
_NARROW = 4
_NARROWEST = 64
# Once narrowed, it also narrows where a window takes more than `_PER_WINDOW`
# iterations to move through, beyond a slack of `_SLACK` iterations (the start after a
# narrowing, the few hard steps of a relaxation oscillator's jump): to the width its
# converged prefix crossed in `_PACE` iterations since the last narrowing, 2-4x.
_PER_WINDOW = 10
_SLACK = 20
_PACE = 8


class _Narrowing(AbstractSchedule):
    """The schedule of the automatic window: every step in flight, but updates are
    trusted only `width` steps past the converged prefix (the window); the steps
    beyond it are held at the first iterate, as a sliding window's new steps enter
    from the guess. `width` starts at the whole sequence (a problem that converges
    there runs as on it) and narrows `_NARROW`-fold whenever the iteration is judged
    hopeless, down to `length / _NARROWEST`. Once narrowed, it narrows too where the
    prefix moves too slowly for the width (more than `_PER_WINDOW` iterations per
    window): a neutral problem's iteration advances by about as many steps in any
    window wider than that, so its width settles where a window converges in a few
    iterations, at about the same depth. Each narrowing brings the cap of a sliding
    window of that width for the steps left. Its state is `(width, first iterate,
    iteration and converged prefix at the last narrowing)`."""

    length: int = eqx.field(static=True)
    # The method's cap on a window of `length` steps.
    per_window: int = eqx.field(static=True)
    moves: ClassVar[bool] = False
    narrows: ClassVar[bool] = True

    def iteration_cap(self, method):
        return method.iteration_cap(self.length)

    def start(self, init, guess):
        return (count(self.length), guess, count(0), count(0)), guess

    def in_flight(self, state, init, xs, scale):
        return init, xs, scale

    def offset(self, state):
        return count(0)

    def advance(self, state, states, settled):
        return state, states, count(0)

    def finish(self, state, states):
        return states

    def width(self, state):
        return jnp.minimum(state[0], self.length)

    def limit(self, state, prefix):
        return prefix + state[0]

    def held(self, state, states):
        del states
        return state[1]

    def narrow(self, state, iteration, reached, hopeless):
        width, held, since, start = state
        narrowest = -(-self.length // _NARROWEST)
        spent, moved = iteration - since, reached - start
        # Behind a pace of `_PER_WINDOW` iterations per window by over `_SLACK`
        # (in floating point: `width · spent` overflows int32 for long sequences).
        f32 = lambda a: a.astype(jnp.float32)
        slow = (
            (width < self.length)
            & (reached < self.length)
            & (_PER_WINDOW * f32(moved) < f32(width) * f32(spent - _SLACK))
        )
        quarter = jnp.maximum(width // _NARROW, narrowest)
        paced = _PACE * moved // jnp.maximum(spent, 1)
        paced = jnp.clip(paced, quarter, jnp.maximum(width // 2, narrowest))
        new = jnp.where(hopeless, quarter, paced)
        windows = -(-(self.length - reached) // new)
        cap = iteration + windows * jnp.minimum(self.per_window, new)
        narrowed = (hopeless | slow) & (new < width)
        return narrowed, (new, held, iteration, reached), cap


class AutomaticWindow(WholeSequence):
    """Every step at once, narrowing to a window past the converged prefix when the
    iteration over the whole sequence is hopeless (`window=None`)."""

    def forward(self, step, init, xs, guess, scale, method, give_up):
        if method.fallback and not isinstance(method, AbstractDampedMethod):
            schedule = _Narrowing(self.length, method.iteration_cap(self.length))
        else:
            # Damped methods judge the merit of the whole sequence, and without a
            # fallback the iteration is never given up: nothing to narrow.
            schedule = WholeSchedule(self.length)
        return iterate(step, init, xs, guess, method, self, schedule, scale, give_up)
