"""The Brownian increments of a window, computed once before its iteration."""

import diffrax
import jax
import jax.tree_util as jtu
from jaxtyping import PyTree


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
        contr = lambda ta, tb: leaf.contr(ta, tb, **kwargs)
        increments.append(jax.vmap(contr)(ts[:-1], ts[1:]))
        return leaf

    _map_stochastic(terms, contr_kwargs, compute)

    def make_terms(step_increments):
        remaining = iter(step_increments)
        store = lambda leaf, kwargs: StoredIncrementTerm(leaf, next(remaining))
        return _map_stochastic(terms, contr_kwargs, store)

    return increments, make_terms
