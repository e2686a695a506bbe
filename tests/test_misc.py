import jax
import jax.numpy as jnp
import numpy as np
import pytest

import partime
from partime._misc import batch_where, flat_vmap


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


def _increment(leaves):
    # A random draw keyed by a typed key, as a Brownian motion's.
    key, scale, ta, tb = leaves
    return scale * (tb - ta) * jax.random.normal(jax.random.fold_in(key, 3), (2,))


def _assert_same(x, y):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-13, atol=0)


def test_flat_vmap_matches_vmap():
    # The same draws (XLA may order the products differently: to rounding).
    keys = jax.random.split(jax.random.key(0), 3)
    scales = jnp.array([1.0, 2.0, 3.0])
    ta, tb = jnp.arange(4.0), jnp.arange(1.0, 5.0)
    in_axes = (None, None, 0, 0)
    expected = lambda key, scale: jax.vmap(_increment, in_axes=(list(in_axes),))(
        [key, scale, ta, tb]
    )
    flat = lambda key, scale: flat_vmap(_increment, [key, scale, ta, tb], in_axes)
    # Unbatched; batched in the unmapped leaves (key, scale), one or both.
    _assert_same(jax.jit(flat)(keys[0], scales[0]), expected(keys[0], 1.0))
    for axes in [(0, 0), (0, None), (None, 0)]:
        key = keys if axes[0] == 0 else keys[0]
        scale = scales if axes[1] == 0 else scales[0]
        out = jax.jit(jax.vmap(flat, in_axes=axes))(key, scale)
        assert out.shape == (3, 4, 2)
        _assert_same(out, jax.vmap(expected, in_axes=axes)(key, scale))
    # Nested, and batched in a mapped leaf.
    nested = jax.vmap(jax.vmap(flat, in_axes=(0, None)), in_axes=(None, 0))
    out = jax.jit(nested)(keys, scales)
    ref = jax.vmap(jax.vmap(expected, in_axes=(0, None)), in_axes=(None, 0))
    _assert_same(out, ref(keys, scales))
    times = jnp.stack([ta, ta + 1])
    mapped = lambda t: flat_vmap(_increment, [keys[0], 1.0, t, t + 1], in_axes)
    out = jax.jit(jax.vmap(mapped))(times)
    ref = jax.vmap(
        lambda t: jax.vmap(_increment, in_axes=(list(in_axes),))(
            [keys[0], 1.0, t, t + 1]
        )
    )(times)
    _assert_same(out, ref)


@pytest.mark.parametrize("t0, t1", [(0.0, 10.0), (0.3, 10.7), (-1.3, 2.9)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_inner_grid_bit_identical_under_jit(t0, t1, dtype):
    # Eager and inside `jit`, with its ends traced, constant, or batched: the same
    # bits, as the two roundings `t0 + round((t1 - t0) * round(k / n))` give.
    n = 100
    t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
    eager = partime.inner_grid(t0, t1, n)
    fraction = np.arange(n + 1, dtype=dtype) / np.asarray(n, dtype)
    width = np.asarray(t1 - t0, dtype)
    expected = np.asarray(t0, dtype) + (width * fraction).astype(dtype)
    expected[-1] = t1
    assert eager.dtype == dtype
    np.testing.assert_array_equal(np.asarray(eager), expected)
    grid = lambda a, b: partime.inner_grid(a, b, n)
    for out in [
        jax.jit(grid)(t0, t1),
        jax.jit(lambda: grid(t0, t1))(),
        jax.jit(lambda b: grid(t0, b))(t1),
        jax.jit(jax.vmap(grid))(jnp.stack([t0, t0]), jnp.stack([t1, t1]))[1],
    ]:
        np.testing.assert_array_equal(np.asarray(out), expected)
