"""Small helpers shared by the entry points."""

import operator
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, Int, PyTree


def as_count(value: Any) -> Any:
    """`value` as a Python `int` if it is an integer of any kind (`np.int64(100)`, a
    concrete JAX integer scalar, ...), else unchanged for the checks to reject.
    `bool`s are not counts."""
    if isinstance(value, (bool, np.bool_)):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


@jax.custom_batching.custom_vmap
def batch_where(pred: Bool[Array, ""], new: PyTree, old: PyTree) -> PyTree:
    """`new`; under `jax.vmap` with a batched `pred`, `where(pred, new, old)` member
    by member.

    For a `lax.cond` whose predicate is made unbatched (`unvmap_any(pred)`, so that
    under `jax.vmap` it stays a cond instead of evaluating both branches): its true
    branch returns `batch_where(pred, new, old)`. Unbatched, that branch runs only
    where `pred` holds, and no select is paid for; batched, the members for which
    `pred` is false keep `old`."""
    del pred, old
    return new


@batch_where.def_vmap
def _batch_where_rule(axis_size, in_batched, pred, new, old):
    pred_batched, new_batched, old_batched = in_batched

    def batched(x, is_batched):
        return x if is_batched else jnp.broadcast_to(x, (axis_size, *x.shape))

    new = jtu.tree_map(batched, new, new_batched)
    old = jtu.tree_map(batched, old, old_batched)
    if pred_batched:
        where = lambda n, o: jnp.where(pred.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
        out = jtu.tree_map(where, new, old)
    else:
        # Still a `batch_where` for the `vmap`s outside this one.
        out = batch_where(pred, new, old)
    return out, jtu.tree_map(lambda _: True, out)


def flat_vmap(fn: Callable, leaves: list, in_axes: tuple) -> PyTree:
    """`jax.vmap(fn, in_axes=(in_axes,))(leaves)`, for a flat list of arrays mapped
    over their leading axis (`0`) or not (`None`); under an outer `jax.vmap`, its
    batch is folded into the mapped axis instead of becoming one more axis of
    every array (at least one leaf mapped).

    XLA:CPU takes about twice as long to compile a loop of random draws (as in
    `diffrax.VirtualBrownianTree`) on `(batch, steps)` arrays as on `(batch ·
    steps,)` arrays. No gradient flows through it: pass no tangents."""

    @jax.custom_batching.custom_vmap
    def call(leaves):
        return jax.vmap(fn, in_axes=(list(in_axes),))(leaves)

    @call.def_vmap
    def rule(axis_size, in_batched, leaves):
        (batched,) = in_batched
        (length,) = {
            x.shape[int(b)] for x, b, a in zip(leaves, batched, in_axes) if a == 0
        }
        size = axis_size * length

        def fold(x, is_batched, axis):
            if axis is None and not is_batched:
                return x, None
            if not is_batched:
                x = jnp.broadcast_to(x, (axis_size, *x.shape))
            elif axis is None:
                x = jnp.broadcast_to(x[:, None], (axis_size, length, *x.shape[1:]))
            return x.reshape(size, *x.shape[2:]), 0

        folded = [fold(*z) for z in zip(leaves, batched, in_axes)]
        out = flat_vmap(fn, [x for x, _ in folded], tuple(a for _, a in folded))
        out = jtu.tree_map(lambda y: y.reshape(axis_size, length, *y.shape[1:]), out)
        return out, jtu.tree_map(lambda _: True, out)

    return call(list(leaves))


def first_false(ok: Bool[Array, " T"]) -> Int[Array, ""]:
    """The index of the first `False` in `ok` (its length if none), as one reduction
    (a cumulative product would be a prefix scan: several kernels, each compiled)."""
    index = jnp.arange(ok.shape[0], dtype=jnp.int32)
    return jnp.min(jnp.where(ok, ok.shape[0], index), initial=ok.shape[0]).astype(
        jnp.int32
    )
