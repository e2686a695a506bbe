import jax
import jax.numpy as jnp
import pytest

from partime._misc import batch_where


def test_batch_where_unbatched():
    # Unbatched, the caller's cond already chose the branch: `new`, whatever `pred`.
    new, old = {"a": jnp.arange(3.0), "b": None}, {"a": -jnp.arange(3.0), "b": None}
    for pred in (True, False):
        out = jax.jit(batch_where)(jnp.asarray(pred), new, old)
        assert jnp.array_equal(out["a"], new["a"])


@pytest.mark.parametrize("batched", ["all", "pred", "new", "old"])
def test_batch_where_vmap(batched):
    pred = jnp.array([True, False, True])
    new = jnp.arange(6.0).reshape(3, 2)
    old = -jnp.arange(6.0).reshape(3, 2)
    axes = {
        "all": (0, 0, 0),
        "pred": (0, None, None),
        "new": (0, 0, None),
        "old": (0, None, 0),
    }[batched]
    args = (pred, new if axes[1] == 0 else new[0], old if axes[2] == 0 else old[0])
    out = jax.vmap(batch_where, in_axes=axes)(*args)
    expected = jnp.where(
        pred[:, None],
        jnp.broadcast_to(args[1], (3, 2)),
        jnp.broadcast_to(args[2], (3, 2)),
    )
    assert jnp.array_equal(out, expected)
    # An unbatched predicate under `vmap`: `new`, as unbatched.
    out = jax.vmap(batch_where, in_axes=(None, 0, 0))(jnp.array(False), new, old)
    assert jnp.array_equal(out, new)


def test_batch_where_nested_vmap():
    pred = jnp.array([[True, False], [False, True]])
    new, old = jnp.ones((2, 2, 3)), jnp.zeros((2, 2, 3))
    out = jax.vmap(jax.vmap(batch_where))(pred, new, old)
    assert jnp.array_equal(out, jnp.where(pred[..., None], new, old))
    # Batched over the outer axis only.
    out = jax.vmap(jax.vmap(batch_where, in_axes=(None, 0, 0)), in_axes=(0, 0, 0))(
        pred[:, 0], new, old
    )
    assert jnp.array_equal(out, jnp.where(pred[:, :1, None], new, old))
