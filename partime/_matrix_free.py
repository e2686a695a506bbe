"""The derivative's linear solve without Jacobians: `O(T d)` memory, as the forward.

The implicit derivative of a fixed-point solve is the solution of `L ṡ = b` (reverse
mode: `Lᵀ λ = g`), `L` the block lower-bidiagonal Newton operator
`(L x)_t = x_t - A_t x_{t-1}`, `A_t = ∂f_t/∂s_{t-1}`. `StepOperator` applies `L`
with one Jacobian-vector product of the step per time step (and `Lᵀ` with one
vector-Jacobian product), never forming `A_t`. `PreconditionedScanSolver` solves
it the way the method solves the forward problem: the preconditioned iteration

    x ← x + P⁻¹ (b - L x)

with `P` the bidiagonal operator of the method's own transition `Ã_t` (diagonal for
quasi-Newton, identity for Picard, zero for Jacobi), each `P⁻¹` one associative scan.
Its error is multiplied by `I - P⁻¹L`, which is strictly block lower-triangular
(nilpotent): the iteration is exact after at most `T` iterations, like the forward
one. It stops when every residual is within a tenth of the method's `rtol` (relative
to the solution and the right-hand side; not below 10 ulps), and otherwise, after the
method's iteration cap, on a non-finite or exploding residual, solves exactly with one
sequential pass of Jacobian-vector (or vector-Jacobian) products, as the forward
falls back.

Methods with dense transitions (Newton, ELK) keep their dense solve: with `A_t` at
hand, one scan is exact.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jaxtyping import Array, Float, Int, PyTree

from ._lds import AbstractTransition, DenseTransition
from ._method.base import AbstractMethod, default_tolerance
from ._operator import _shift_back, _shift_forward, BidiagonalOperator


# An iteration whose residual grows this much beyond the right-hand side's is not
# going to converge before it overflows: the exact sequential pass takes over.
_EXPLODED = 1e8

# How much tighter than the method's `rtol` the derivative's iteration converges.
_TANGENT_MARGIN = 10.0


class StepOperator(lx.AbstractLinearOperator):
    """The Newton operator `(L x)_t = x_t - A_t x_{t-1}` of a step map, matrix-free.

    `A_t x` is a Jacobian-vector product of `step` at `(prev_t, x_t)`; with
    `transposed=True` this is `Lᵀ`, `(Lᵀ y)_t = y_t - A_{t+1}ᵀ y_{t+1}`, by
    vector-Jacobian products. Memory `O(T d)` (plus one step's intermediates per time
    step); each product re-evaluates the step.

    **Arguments:**

    - `step`: `(s_{t-1}, x_t) -> s_t` on flat states (closure-converted, so that
        parameters it closes over are leaves of this operator).
    - `prev`: `s_0, ..., s_{T-1}`, shape `(T, d)`.
    - `xs`: the per-step inputs, leading axis `T`.
    - `transposed`: whether this is `Lᵀ`.
    """

    step: Any
    prev: Float[Array, "T d"]
    xs: PyTree[Any]
    transposed: bool = eqx.field(static=True, default=False)

    def jvp(self, v: Float[Array, "T d"]) -> Float[Array, "T d"]:
        """`A_t v_t` for every `t`."""

        def one(p, x, v):
            return jax.jvp(lambda s: self.step(s, x), (p,), (v,))[1]

        return jax.vmap(one)(self.prev, self.xs, v)

    def vjp(self, v: Float[Array, "T d"]) -> Float[Array, "T d"]:
        """`A_tᵀ v_t` for every `t`."""

        def one(p, x, v):
            return jax.vjp(lambda s: self.step(s, x), p)[1](v)[0]

        return jax.vmap(one)(self.prev, self.xs, v)

    def mv(self, vector):
        if self.transposed:
            return vector - _shift_back(self.vjp(vector))
        return vector - self.jvp(_shift_forward(vector))

    def sequential_solve(
        self, b: Float[Array, "T d"], x: Float[Array, "T d"], trips: Int[Array, ""]
    ) -> Float[Array, "T d"]:
        """`L⁻¹ b` (or `L⁻ᵀ b`) exactly, one time step after another, if `trips` is
        `T`; `x` unchanged if it is 0. A `while_loop`, not a `cond`: under `vmap` a
        batch that converged everywhere makes no trips (a `cond` would run both)."""
        step, length = self.step, b.shape[0]

        def body(carry):
            i, c, out = carry
            t = length - 1 - i if self.transposed else i
            p, x_t = self.prev[t], jtu.tree_map(lambda a: a[t], self.xs)
            if self.transposed:
                # y_t = b_t + A_{t+1}ᵀ y_{t+1}: carry `A_{t+1}ᵀ y_{t+1}` backwards.
                y = b[t] + c
                c = jax.vjp(lambda s: step(s, x_t), p)[1](y)[0]
            else:
                y = jax.jvp(lambda s: step(s, x_t), (p,), (c,))[1] + b[t]
                c = y
            return i + 1, c, out.at[t].set(y)

        init = (jnp.asarray(0, jnp.int32), jnp.zeros_like(b[0]), x)
        _, _, out = jax.lax.while_loop(lambda c: c[0] < trips, body, init)
        return out

    def as_matrix(self):
        size = self.in_size()
        basis = jnp.eye(size, dtype=self.prev.dtype).reshape(size, *self.prev.shape)
        return jax.vmap(self.mv)(basis).reshape(size, size).T

    def transpose(self):
        return StepOperator(self.step, self.prev, self.xs, not self.transposed)

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.prev.shape, self.prev.dtype)

    def out_structure(self):
        return self.in_structure()


class PreconditionedScanSolver(lx.AbstractLinearSolver):
    """Solves a `StepOperator` by the iteration `x ← x + P⁻¹(b - L x)`,
    `P` the bidiagonal operator of `method`'s transition, to `method`'s `rtol`
    within its iteration cap, else exactly by a sequential pass.

    Its state is `(operator, transition)`; its `transpose` solves `Lᵀ` with `Pᵀ` (a
    reverse scan), which `lineax.linear_solve` uses for reverse-mode autodiff.
    """

    method: AbstractMethod

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if not isinstance(operator, StepOperator):
            raise ValueError(
                "`PreconditionedScanSolver` only solves `StepOperator`s, got "
                f"{type(operator).__name__}."
            )
        _, transition = self.method.linearise(operator.step, operator.prev, operator.xs)
        return operator, transition

    def compute(self, state, vector, options):
        del options
        operator, transition = state
        return self.solve(operator, transition, vector), lx.RESULTS.successful, {}

    def solve(
        self,
        operator: StepOperator,
        transition: AbstractTransition,
        b: Float[Array, "T d"],
    ) -> Float[Array, "T d"]:
        # Tangents have no absolute scale: `rtol` only (the dtype's default if the
        # method's is 0, which only an exact solve would meet), a decade tighter than
        # the forward's: the residual understates the error `L⁻¹ r` by up to `‖L⁻¹‖`,
        # and a parameter's gradient adds the per-step errors over all `T` steps (at
        # the forward's 100 ulps a float32 gradient was up to 6x further from the
        # truth than `lax.scan`'s own). Not below 10 ulps: the residual's rounding
        # floor is about one ulp of `x`.
        rtol = self.method.tolerances(b.dtype)[0] or default_tolerance(b.dtype)
        eps = float(jnp.finfo(b.dtype).eps)
        rtol = max(rtol / _TANGENT_MARGIN, _TANGENT_MARGIN * eps)
        cap = self.method.iteration_cap(b.shape[0])
        precondition = lambda r: transition.solve(r, reverse=operator.transposed)
        b_norm = jnp.max(jnp.abs(b))

        def converged(x, r):
            # NaN compares False: a non-finite residual never converges.
            bound = rtol * (jnp.abs(x) + b_norm)
            return jnp.all(jnp.abs(r) <= bound)

        def keep_going(carry):
            i, x, r = carry
            r_norm = jnp.max(jnp.abs(r))
            sane = r_norm <= _EXPLODED * b_norm
            return (i < cap) & sane & ~converged(x, r)

        def body(carry):
            i, x, r = carry
            x = x + precondition(r)
            return i + 1, x, b - operator.mv(x)

        x = precondition(b)
        init = (jnp.asarray(1, jnp.int32), x, b - operator.mv(x))
        _, x, r = jax.lax.while_loop(keep_going, body, init)
        trips = jnp.where(converged(x, r), 0, b.shape[0]).astype(jnp.int32)
        return operator.sequential_solve(b, x, trips)

    def transpose(self, state, options):
        operator, transition = state
        return (operator.transpose(), transition), options

    def conj(self, state, options):
        # Real operators only (the states are real): conjugation is the identity.
        return state, options

    def assume_full_rank(self):
        return True


@lx.linearise.register(StepOperator)
@lx.materialise.register(StepOperator)
@lx.conj.register(StepOperator)
def _(operator):
    return operator


@lx.diagonal.register(StepOperator)
def _(operator):
    return jnp.ones(operator.in_size(), operator.prev.dtype)


@lx.has_unit_diagonal.register(StepOperator)
def _(operator):
    return True


@lx.is_symmetric.register(StepOperator)
@lx.is_diagonal.register(StepOperator)
@lx.is_tridiagonal.register(StepOperator)
@lx.is_positive_semidefinite.register(StepOperator)
@lx.is_negative_semidefinite.register(StepOperator)
def _(operator):
    return False


@lx.is_lower_triangular.register(StepOperator)
def _(operator):
    return not operator.transposed


@lx.is_upper_triangular.register(StepOperator)
def _(operator):
    return operator.transposed


def implicit_tangent_solve(
    step: Any,
    prev: Float[Array, "T d"],
    xs: PyTree[Any],
    rhs: Float[Array, "T d"],
    transition: AbstractTransition,
    method: AbstractMethod,
) -> Float[Array, "T d"]:
    """`L⁻¹ rhs` for the derivative rule on one device, given `method`'s
    linearisation `transition` at the solution: dense for a method whose transition is
    dense (one scan, exact), matrix-free otherwise (the transition preconditions).

    Neither the operator nor (for the dense path) the Jacobians are stopped:
    differentiating the rule again (second derivatives) sees how they move; only
    the preconditioner is. The solve is `jax.lax.custom_linear_solve`, not
    `lineax.linear_solve`: lineax's transpose rule checks its solution on the host
    and raises when it is not finite, so the gradient of a solve that overflowed
    would be an error instead of non-finite, as diffrax's is.
    """
    if isinstance(transition, DenseTransition):
        operator = BidiagonalOperator(transition)
        solve = lambda b: operator.solve(b)
        transpose_solve = lambda b: operator.transpose().solve(b)
    else:
        operator = StepOperator(step, prev, xs)
        solver = PreconditionedScanSolver(method)
        transition = jtu.tree_map(jax.lax.stop_gradient, transition)
        solve = lambda b: solver.solve(operator, transition, b)
        transpose_solve = lambda b: solver.solve(operator.transpose(), transition, b)
    return jax.lax.custom_linear_solve(
        operator.mv,
        rhs,
        solve=lambda _, b: solve(b),
        transpose_solve=lambda _, b: transpose_solve(b),
    )
