"""The Brownian increments of a window, computed once before its iteration."""

import diffrax
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._misc import flat_vmap


class StoredIncrementTerm(diffrax.AbstractTerm):
    """A term whose control over the current inner step is already known: `contr`
    returns the stored increment (for a Brownian motion, with its Lévy area when the
    solver asked for it), whatever the times; everything else defers to `term`.

    Rebuilt inside the step function from the step's inputs, so that every inner SDE
    step is a deterministic map of its start state, and the Brownian motion is
    evaluated once per window, vectorised, not in every iteration and Jacobian
    probe."""

    term: diffrax.AbstractTerm
    increment: PyTree

    def vf(self, t, y, args):
        return self.term.vf(t, y, args)

    def contr(self, t0, t1, **kwargs):
        del t0, t1, kwargs
        return self.increment

    def prod(self, vf, control):
        return self.term.prod(vf, control)

    def vf_prod(self, t, y, args, control):
        return self.term.vf_prod(t, y, args, control)

    def is_vf_expensive(self, t0, t1, y, args):
        return self.term.is_vf_expensive(t0, t1, y, args)


class InterpolatedIncrementTerm(diffrax.AbstractTerm):
    """A term whose control between any two times of the window is read off the
    stored increments: the Brownian motion interpolated linearly between the inner
    grid's points, from its cumulative increments (exact, up to rounding, at the grid's
    points). For the coarse pass, a first guess: it then evaluates no Brownian
    motion (a `diffrax.VirtualBrownianTree` is a loop of random draws, compiled
    again for every copy), only the window's increments, computed once."""

    term: diffrax.AbstractTerm
    ts: Array
    # The Brownian motion at `ts`, relative to `ts[0]`: leading axis `len(ts)`.
    cumulative: PyTree[Array]

    def vf(self, t, y, args):
        return self.term.vf(t, y, args)

    def contr(self, t0, t1, **kwargs):
        del kwargs
        return jtu.tree_map(lambda a, b: b - a, self._at(t0), self._at(t1))

    def _at(self, t):
        num_steps = self.ts.shape[0] - 1
        position = (t - self.ts[0]) / (self.ts[-1] - self.ts[0]) * num_steps
        index = jnp.clip(jnp.floor(position), 0, num_steps - 1)
        weight = position - index
        index = index.astype(jnp.int32)

        def interpolate(w):
            left, right = w[index], w[index + 1]
            return left + weight.astype(w.dtype) * (right - left)

        return jtu.tree_map(interpolate, self.cumulative)

    def prod(self, vf, control):
        return self.term.prod(vf, control)

    def vf_prod(self, t, y, args, control):
        return self.term.vf_prod(t, y, args, control)

    def is_vf_expensive(self, t0, t1, y, args):
        return self.term.is_vf_expensive(t0, t1, y, args)


def _is_stochastic(term) -> bool:
    is_path = lambda x: isinstance(x, diffrax.AbstractBrownianPath)
    return any(is_path(x) for x in jtu.tree_leaves(term, is_leaf=is_path))


def _map_stochastic(terms, contr_kwargs, fn):
    """`terms` with each leaf term driven by a Brownian motion replaced by
    `fn(leaf, kwargs)`, where `kwargs` are the keyword arguments the solver passes to
    that leaf's `contr` (e.g. `use_levy=True` for SRK solvers). Leaves are visited in
    a fixed order."""
    # `type(...)`: diffrax's own `MultiTerm`, not a user subclass with other fields.
    if type(terms) is diffrax.MultiTerm:
        if not isinstance(contr_kwargs, tuple):
            contr_kwargs = (contr_kwargs,) * len(terms.terms)
        return diffrax.MultiTerm(
            *[
                _map_stochastic(term, kwargs, fn)
                for term, kwargs in zip(terms.terms, contr_kwargs)
            ]
        )
    if _is_stochastic(terms):
        return fn(terms, contr_kwargs if isinstance(contr_kwargs, dict) else {})
    return terms


def _controls_whole_steps(solver) -> bool:
    """Whether `solver.step` asks its terms for the control over the whole step only.
    A wrapped solver (`diffrax.HalfSolver`) also steps over each half of the step, and
    the halves need their own increments."""
    # `type(...)`, not `isinstance`: diffrax forwards `isinstance` through wrappers.
    return not issubclass(type(solver), diffrax.AbstractWrappedSolver)


def store_increments(terms, solver, ts):
    """Every Brownian increment of the window, computed once and vectorised over the
    inner steps; and the function that rebuilds the terms of one inner step from its
    slice of them. For a `solver` that asks for controls over parts of a step
    (`HalfSolver`), nothing is stored: each inner step evaluates the Brownian motion
    itself, as in a sequential solve."""
    if not _controls_whole_steps(solver):
        return [], lambda _: terms
    contr_kwargs = solver.term_compatible_contr_kwargs
    increments = []

    def compute(leaf, kwargs):
        # The Brownian motion's parameters, if any, have no derivative to pass on.
        no_gradient = lambda x: (
            jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x
        )
        dynamic, static = eqx.partition(jtu.tree_map(no_gradient, leaf), eqx.is_array)
        leaves, treedef = jtu.tree_flatten(dynamic)

        def contr(inputs):
            *leaves, ta, tb = inputs
            leaf = eqx.combine(jtu.tree_unflatten(treedef, leaves), static)
            return leaf.contr(ta, tb, **kwargs)

        in_axes = (None,) * len(leaves) + (0, 0)
        # As diffrax's Brownian motions: an error if differentiated in time.
        times = eqxi.nondifferentiable(ts, name="the inner step times of an SDE")
        times = jax.lax.stop_gradient((times[:-1], times[1:]))
        increments.append(flat_vmap(contr, [*leaves, *times], in_axes))
        return leaf

    _map_stochastic(terms, contr_kwargs, compute)

    def make_terms(step_increments):
        remaining = iter(step_increments)
        store = lambda leaf, kwargs: StoredIncrementTerm(leaf, next(remaining))
        return _map_stochastic(terms, contr_kwargs, store)

    return increments, make_terms


def interpolated_terms(terms, solver, ts, increments):
    """`terms` with every Brownian motion replaced by the linear interpolation of
    the window's stored `increments` over its inner grid `ts` (see
    `InterpolatedIncrementTerm`); `terms` as they are where nothing was stored or
    the increments carry Lévy areas, which do not add up over steps (the coarse
    steps then evaluate the Brownian motion itself)."""
    is_levy = lambda x: isinstance(x, diffrax.AbstractBrownianIncrement)
    if not increments or any(map(is_levy, increments)):
        return terms
    remaining = iter(increments)

    def interpolate(leaf, kwargs):
        del kwargs
        cumulative = jtu.tree_map(
            lambda w: jnp.concatenate([jnp.zeros_like(w[:1]), jnp.cumsum(w, axis=0)]),
            next(remaining),
        )
        return InterpolatedIncrementTerm(leaf, ts, cumulative)

    return _map_stochastic(terms, solver.term_compatible_contr_kwargs, interpolate)
