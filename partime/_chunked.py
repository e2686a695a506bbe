"""Derivatives of a map over time, a chunk of time steps at a time.

A step's derivative with respect to the parameters it closes over, evaluated for all
`T` steps at once (`jax.vmap`), materialises the cotangent of every intermediate of
every step: several `T·d`-sized buffers at once, more than the forward solve needs.
Evaluated chunk after chunk (`jax.lax.map`), rematerialised (`jax.checkpoint`), they
take `O(chunk·d)` instead; reverse mode accumulates the parameters' cotangents over
the chunks, as `jax.lax.scan`'s backward pass does over steps.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree


# The number of chunks: the derivative's intermediates are this much smaller than
# over all of `T` at once. A chunk is never shorter than `_MIN_CHUNK` steps, so that
# short sequences stay one vectorised evaluation.
_NUM_CHUNKS = 8
_MIN_CHUNK = 256


def chunk_size(length: int) -> int:
    """How many time steps one chunk holds."""
    return max(-(-length // _NUM_CHUNKS), min(length, _MIN_CHUNK))


def chunked_jvp(
    fn: Any,
    t_fn: Any,
    inputs: tuple[PyTree, ...],
    t_inputs: tuple[PyTree, ...],
) -> PyTree:
    """The tangent of `jax.vmap(fn)(*inputs)` for tangents `t_fn` of the arrays in
    the PyTree `fn` (not mapped) and `t_inputs` (mapped over their leading axis),
    computed `chunk_size(T)` steps at a time. `None` tangents are symbolic zeros;
    `None` if all are."""
    length = jtu.tree_leaves(inputs)[0].shape[0]
    if not jtu.tree_leaves((t_fn, t_inputs)):
        return None

    def one(args):
        x, t_x = args
        return eqx.filter_jvp(lambda fn, x: fn(*x), (fn, x), (t_fn, t_x))[1]

    return jax.lax.map(
        jax.checkpoint(one), (inputs, t_inputs), batch_size=chunk_size(length)
    )


@eqx.filter_custom_jvp
def vmap_chunked_derivative(fn, inputs):
    """`jax.vmap(fn)(*inputs)`, all steps at once, whose derivative is taken
    `chunk_size(T)` steps at a time (`chunked_jvp`). `fn` a PyTree (closure-converted:
    the parameters it closes over get tangents)."""
    return jax.vmap(lambda *x: fn(*x))(*inputs)


@vmap_chunked_derivative.def_jvp
def _vmap_chunked_derivative_jvp(primals, tangents):
    fn, inputs = primals
    t_fn, t_inputs = tangents
    out = vmap_chunked_derivative(fn, inputs)
    t_out = chunked_jvp(fn, t_fn, inputs, t_inputs)
    if t_out is None:
        t_out = jtu.tree_map(jnp.zeros_like, out)
    return out, t_out
