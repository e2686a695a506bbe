"""Derivatives of a map over time taken a chunk at a time (`partime._chunked`) equal
those of the plain `jax.vmap`: first and second order, with a partial last chunk."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

from partime._chunked import chunk_size, vmap_chunked_derivative

from .helpers import tree_allclose


# More than one chunk, and a partial one at the end.
_LENGTH, _SIZE = 300, 3


def _cell(params, h, x):
    w, u = params
    return jnp.tanh(w @ h + u @ x), jnp.sin(h) * x


def _maps(params, prev, xs):
    """The chunked map and the plain one, on the same closed-over parameters."""
    fn = lambda h, x: _cell(params, h, x)
    closed = eqx.filter_closure_convert(fn, prev[0], xs[0])
    return vmap_chunked_derivative(closed, (prev, xs)), jax.vmap(fn)(prev, xs)


def test_chunked_derivatives_equal_vmap():
    keys = jr.split(jr.PRNGKey(0), 4)
    params = tuple(jr.normal(k, (_SIZE, _SIZE)) for k in keys[:2])
    prev, xs = (jr.normal(k, (_LENGTH, _SIZE)) for k in keys[2:])
    assert chunk_size(_LENGTH) < _LENGTH and _LENGTH % chunk_size(_LENGTH)

    def loss(which, params, prev, xs):
        a, b = _maps(params, prev, xs)[which]
        return jnp.sum(a * jnp.cos(b)) + jnp.sum(b**2)

    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(which, args, tangents):
        """The value, the gradient and (forward over reverse) a Hessian-vector
        product."""
        grad = jax.grad(lambda *a: loss(which, *a), argnums=(0, 1, 2))
        return loss(which, *args), *jax.jvp(lambda *a: grad(*a), args, tangents)

    args = (params, prev, xs)
    tangents = jax.tree.map(jnp.ones_like, args)
    chunked = derivatives(0, args, tangents)
    plain = derivatives(1, args, tangents)
    assert tree_allclose(chunked, plain)
