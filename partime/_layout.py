"""Where time lives: the layouts that the one engine is handed.

The driver loop (`partime._loop.iterate`) and the implicit derivative rule
(`partime._fixed_point`) are written once. What differs between a whole sequence on one
device, windows moving through it, and a time axis split over a mesh is only *where
time lives*, and a layout says that:

- `forward`: the solve (the loop, run once, per block, or inside `shard_map`);
- `tangent_solve`: the linear solve `L ṡ = ∂f·(ṡ_0, ẋ, θ̇)` of the derivative rule;
- `previous`: `s_0, ..., s_{T-1}` from `s_0` and the states;
- `check`: the trace-time refusal of what cannot work on it.

A layout on which the loop runs directly (the whole sequence here, a device's chunk in
`partime._sharded_fixed_point`) also gives the loop its reductions over time: the
merit, the first step that fails a test, the state at a step, the fallback.
"""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int, PyTree

from ._chunked import chunked_jvp
from ._fallback import sequential_completion
from ._kalman import damped_solve
from ._lds import AbstractTransition, DenseTransition
from ._loop import iterate
from ._matrix_free import implicit_tangent_solve
from ._method.base import AbstractMethod
from ._misc import first_false
from ._operator import BidiagonalOperator
from ._stats import Stats


def zeros_for_none(primal: Any, tangent: Any) -> Any:
    """A zero tangent where JAX passes `None` for an inexact array."""
    if tangent is None and eqx.is_inexact_array(primal):
        return jnp.zeros_like(primal)
    return tangent


def shift(init: Float[Array, " d"], states: Float[Array, "T d"]) -> Array:
    """`s_0, ..., s_{T-1}` on one device."""
    return jnp.concatenate([init[None], states[:-1]])


class AbstractLayout(eqx.Module):
    """Where the time axis of a fixed-point solve lives."""

    length: eqx.AbstractVar[int]

    def check(self, method: AbstractMethod) -> None:
        """Raises a `ValueError` at trace time for what cannot work on this layout."""
        del method

    @abc.abstractmethod
    def forward(
        self,
        step: Any,
        init: Float[Array, " d"],
        xs: PyTree,
        guess: Float[Array, "T d"],
        scale: Float[Array, " T"],
        method: AbstractMethod,
        give_up: Bool[Array, ""],
    ) -> tuple[Float[Array, "T d"], Stats]:
        """The solve: `(states, stats)`. `give_up`: skip the iteration (a caller's
        prediction that it is hopeless), leaving every step to the fallback."""

    @abc.abstractmethod
    def tangent_solve(
        self,
        step: Any,
        init: Float[Array, " d"],
        xs: PyTree,
        states: Float[Array, "T d"],
        tangents: tuple[Any, Any, Any],
        method: AbstractMethod,
    ) -> Float[Array, "T d"]:
        """`ṡ` from `L ṡ = ∂f/∂(s_0, x, θ)·(ṡ_0, ẋ, θ̇)` at the solution `states`,
        solved as `method` solves (dense or matrix-free)."""

    def previous(self, init: Float[Array, " d"], states: Float[Array, "T d"]) -> Array:
        """`s_0, ..., s_{T-1}`."""
        return shift(init, states)

    def close(self, fn: Callable, init: Array, x0: PyTree) -> Callable:
        """`fn` as a PyTree whose arrays (closed-over parameters) are explicit, so that
        they get tangents through the derivative rule."""
        return eqx.filter_closure_convert(fn, init, x0)

    def default_guess(self, init: Float[Array, " d"]) -> Float[Array, "T d"] | None:
        """The first iterate when the user gives none: `s_0` at every step."""
        return jnp.broadcast_to(init, (self.length, init.shape[0]))


def linear_tangent_solve(step, init, xs, states, tangents, method):
    """The implicit derivative on one device: the right-hand side is how `f_t` moves
    with `(s_0, x_t, θ)` at the solution, the previous states held fixed (their
    motion is what `L` accounts for); then the method's own solve of `L ṡ = rhs`
    (`partime._matrix_free`: one dense scan for Newton and ELK, matrix-free, `O(T d)`,
    for the others).

    No `stop_gradient` on the solution or the Jacobians: differentiating this rule
    again (second derivatives) must see how they move.
    """
    t_step, t_init, t_xs = tangents
    prev = shift(init, states)
    _, transition = method.linearise(step, prev, xs)
    if isinstance(transition, DenseTransition):
        # Newton, ELK: the solve holds `T d²` Jacobians anyway; all steps at once,
        # `s_0` through the shifted states (one copy of the step to compile).
        primals = (step, init, xs)
        tangents = jtu.tree_map(
            zeros_for_none, primals, tangents, is_leaf=lambda x: x is None
        )
        _, rhs = eqx.filter_jvp(
            lambda step, init, xs: jax.vmap(step)(shift(init, states), xs),
            primals,
            tangents,
        )
        return implicit_tangent_solve(step, prev, xs, rhs, transition, method)
    # Chunk by chunk (`partime._chunked`): reverse mode then needs `O(chunk·d)` for
    # the parameters' cotangents, not every step's at once. `s_0` moves the first
    # step only. Symbolic zero tangents (`None`) stay symbolic: no `T d` zeros.
    rhs = chunked_jvp(step, t_step, (prev, xs), (None, t_xs))
    if rhs is None:
        rhs = jnp.zeros_like(states)
    if t_init is not None:
        x_first = jtu.tree_map(lambda a: a[0], xs)
        first = jax.jvp(lambda s: step(s, x_first), (init,), (t_init,))[1]
        rhs = rhs.at[0].add(first)
    return implicit_tangent_solve(step, prev, xs, rhs, transition, method)


class WholeSequence(AbstractLayout):
    """Every step at once, on one device: plain DEER and its relatives."""

    length: int = eqx.field(static=True)

    # The loop's reductions over time.

    @property
    def index(self) -> Int[Array, " T"]:
        return jnp.arange(self.length, dtype=jnp.int32)

    def merit(self, residual: Array, mask: Bool[Array, " T"] | None = None) -> Array:
        """`½ Σ_t ‖r_t‖²` (over `mask`, if given); `inf` if not finite."""
        squares = jnp.sum(residual**2, axis=-1)
        if mask is not None:
            squares = jnp.where(mask, squares, 0)
        merit = 0.5 * jnp.sum(squares)
        return jnp.where(jnp.isfinite(merit), merit, jnp.inf)

    def first_false(self, ok: Bool[Array, " T"]) -> Int[Array, ""]:
        """The index of the first `False` (`T` if none): the leading `True`s."""
        return first_false(ok)

    def all(self, ok: Bool[Array, "..."]) -> Bool[Array, ""]:
        return jnp.all(ok)

    def total(self, x: Array) -> Array:
        """The sum of a per-piece scalar over the pieces of time (one piece here)."""
        return x

    def state_at(self, init: Array, states: Array, t: Int[Array, ""]) -> Array:
        """`s_t` (`s_0 = init`)."""
        return jnp.where(t == 0, init, states[jnp.maximum(t - 1, 0)])

    def solve(self, transition: AbstractTransition, b: Array) -> Array:
        return transition.solve(b)

    def damped_solve(self, transition, residual, damping):
        return damped_solve(transition, residual, damping)

    def apply_operator(self, transition: AbstractTransition, x: Array) -> Array:
        """`L x`."""
        return BidiagonalOperator(transition).mv(x)

    def complete(self, step, init, xs, states, start):
        """The exact sequential fallback from step `start`."""
        return sequential_completion(step, init, xs, states, start)

    # The layout's part of the engine.

    def forward(self, step, init, xs, guess, scale, method, give_up):
        del scale
        return iterate(step, init, xs, guess, method, self, give_up=give_up)

    def tangent_solve(self, step, init, xs, states, tangents, method):
        return linear_tangent_solve(step, init, xs, states, tangents, method)
