"""One real vector per state: how the iterations see a PyTree of arrays."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree


def _iteration_dtype(dtype) -> jnp.dtype:
    """The real dtype the iterations use for a leaf of `dtype`: its real part's, at
    least `float32`. Newton's tolerances and its linear algebra need more precision
    than `bfloat16`/`float16` give (100 ulps of `bfloat16` is 0.78); the steps
    themselves still run in the state's own dtype."""
    real = jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.inexact) else dtype
    return real if jnp.dtype(real).itemsize > 4 else jnp.dtype(jnp.float32)


class Flattener(eqx.Module):
    """Maps states shaped like one example state to one real vector and back.

    Like `jax.flatten_util.ravel_pytree`, except that a complex leaf contributes its
    real and imaginary parts (the iterations differentiate with `jax.jacfwd`, which
    needs real inputs), that the vector is at least `float32`, and that no implicit
    dtype promotion takes place (so it runs under
    `jax_numpy_dtype_promotion="strict"`). `unravel` returns each leaf in its own
    dtype. A state with no elements at all is the vector `[0]`: the iterations need
    at least one unknown, and this one is fixed at once.
    """

    treedef: jtu.PyTreeDef = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    dtypes: tuple[jnp.dtype, ...] = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(self, example: PyTree):
        leaves, self.treedef = jtu.tree_flatten(example)
        self.shapes = tuple(jnp.shape(leaf) for leaf in leaves)
        self.dtypes = tuple(jnp.result_type(leaf) for leaf in leaves)
        # The widest; no implicit promotion, which strict mode refuses.
        self.dtype = max(
            map(_iteration_dtype, self.dtypes),
            key=lambda d: d.itemsize,
            default=jnp.dtype(jnp.float32),
        )

    @property
    def size(self) -> int:
        """The length of the vector."""
        return max(1, self._num_elements)

    @property
    def _num_elements(self) -> int:
        return sum(
            math.prod(shape) * (2 if jnp.issubdtype(dtype, jnp.complexfloating) else 1)
            for shape, dtype in zip(self.shapes, self.dtypes)
        )

    def ravel(self, tree: PyTree) -> Array:
        leaves = self.treedef.flatten_up_to(tree)
        parts = []
        for leaf, dtype in zip(leaves, self.dtypes):
            leaf = jnp.asarray(leaf)
            if jnp.issubdtype(dtype, jnp.complexfloating):
                parts += [jnp.real(leaf), jnp.imag(leaf)]
            else:
                parts.append(leaf)
        if self._num_elements == 0:
            return jnp.zeros(1, self.dtype)
        return jnp.concatenate([jnp.ravel(p).astype(self.dtype) for p in parts])

    def unravel(self, flat: Array) -> PyTree:
        leaves = []
        start = 0

        def take(shape):
            nonlocal start
            size = math.prod(shape)
            part = jax.lax.slice_in_dim(flat, start, start + size)
            start += size
            return part.reshape(shape)

        for shape, dtype in zip(self.shapes, self.dtypes):
            if jnp.issubdtype(dtype, jnp.complexfloating):
                real, imag = take(shape), take(shape)
                leaves.append(jax.lax.complex(real, imag).astype(dtype))
            else:
                leaves.append(take(shape).astype(dtype))
        return jtu.tree_unflatten(self.treedef, leaves)
