import jax.numpy as jnp
import jax.tree_util as jtu

import partime


all_methods = (
    partime.Newton(),
    partime.QuasiNewton(),
    partime.Picard(),
    partime.Jacobi(),
)


def tree_allclose(x, y, *, rtol=1e-8, atol=1e-10):
    """Same structure, and every leaf close."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    return all(
        jnp.shape(a) == jnp.shape(b) and bool(jnp.allclose(a, b, rtol=rtol, atol=atol))
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def max_rel_error(x, y):
    """Largest relative error over the leaves, scaled by each leaf's max magnitude."""
    errors = [
        jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    ]
    return float(max(errors))
