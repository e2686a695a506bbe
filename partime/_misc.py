"""Small helpers shared by the entry points."""

import operator
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Bool, PyTree


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
