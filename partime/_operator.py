"""The Newton system of a sequence as a lineax operator, and the scan that solves it.

Linearising `r_t = D(s_t) - f_t(s_{t-1})` around a trajectory gives a block
lower-bidiagonal operator

    (L x)_t = D_t x_t - A_t x_{t-1},   x_0 = 0,

where `A_t = ∂f_t/∂s_{t-1}` and `D_t = I` for explicit recurrences (implicit steps have
`D_t ≠ I`). Solving `L x = b` is the linear dynamical system
`x_t = D_t^{-1} A_t x_{t-1} + D_t^{-1} b_t`: an associative scan. [`ScanSolver`][] runs
it and supplies its transpose (a reverse scan), so that `lineax.linear_solve` — and
reverse-mode autodiff through it — work with the parallel solve.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from ._lds import AbstractTransition, DenseTransition


def _shift_forward(x: Array) -> Array:
    """`x_{t-1}` at position `t`; zero at the first position."""
    return jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]])


def _shift_back(x: Array) -> Array:
    """`x_{t+1}` at position `t`; zero at the last position."""
    return jnp.concatenate([x[1:], jnp.zeros_like(x[:1])])


def _block_solve(
    blocks: Float[Array, "T d d"], rhs: Float[Array, "T d ..."], transpose: bool
) -> Array:
    """Solves `D_t z_t = rhs_t` (or `D_t^T z_t = rhs_t`) for every `t`, with lineax's
    LU."""

    def solve_one(block, r):
        operator = lx.MatrixLinearOperator(block.T if transpose else block)
        solver = lx.LU()
        state = solver.init(operator, {})
        solve_vec = lambda v: lx.linear_solve(operator, v, solver, state=state).value
        if r.ndim == 1:
            return solve_vec(r)
        return jax.vmap(solve_vec, in_axes=1, out_axes=1)(r)

    return jax.vmap(solve_one)(blocks, rhs)


class BidiagonalOperator(lx.AbstractLinearOperator):
    """The block lower-bidiagonal operator `(L x)_t = D_t x_t - A_t x_{t-1}`.

    Acts on arrays of shape `(T, d)`. With `transposed=True` it is `L^T`, the block
    upper-bidiagonal `(L^T y)_t = D_t^T y_t - A_{t+1}^T y_{t+1}`.

    **Arguments:**

    - `transition`: the `A_t`, any [`partime.AbstractTransition`][].
    - `diagonal_blocks`: the `D_t` as a `(T, d, d)` array, or `None` for `D_t = I`.
    - `transposed`: whether this is `L^T`.
    """

    transition: AbstractTransition
    diagonal_blocks: Float[Array, "T d d"] | None = None
    transposed: bool = eqx.field(static=True, default=False)

    def mv(self, vector):
        if self.diagonal_blocks is None:
            dx = vector
        else:
            blocks = self.diagonal_blocks
            if self.transposed:
                blocks = jnp.swapaxes(blocks, -1, -2)
            dx = jnp.einsum("tij,tj->ti", blocks, vector, precision="highest")
        if self.transposed:
            return dx - _shift_back(self.transition.apply_transpose(vector))
        return dx - self.transition.apply(_shift_forward(vector))

    def as_matrix(self):
        size = self.in_size()
        shape = self.transition.shape
        basis = jnp.eye(size, dtype=self.transition.dtype).reshape(size, *shape)
        columns = jax.vmap(self.mv)(basis)
        return columns.reshape(size, size).T

    def transpose(self):
        return BidiagonalOperator(
            self.transition, self.diagonal_blocks, not self.transposed
        )

    def in_structure(self):
        return jax.ShapeDtypeStruct(self.transition.shape, self.transition.dtype)

    def out_structure(self):
        return self.in_structure()

    def solve(self, vector: Float[Array, "T d"]) -> Float[Array, "T d"]:
        """Applies `L^{-1}` (or `L^{-T}`) with one associative scan."""
        if self.diagonal_blocks is None:
            return self.transition.solve(vector, reverse=self.transposed)
        # x_t = M_t x_{t-1} + D_t^{-1} b_t with M_t = D_t^{-1} A_t.  The transpose:
        # z_t = c_t + M_{t+1}^T z_{t+1}, then y_t = D_t^{-T} z_t.
        blocks = self.diagonal_blocks
        scaled = DenseTransition(
            _block_solve(blocks, self.transition.as_dense(), transpose=False)
        )
        if self.transposed:
            z = scaled.solve(vector, reverse=True)
            return _block_solve(blocks, z, transpose=True)
        return scaled.solve(_block_solve(blocks, vector, transpose=False))


class ScanSolver(lx.AbstractLinearSolver):
    """Solves a [`partime.BidiagonalOperator`][] with an associative scan.

    `O(log T)` depth; its `transpose` is the reverse scan, which `lineax.linear_solve`
    uses for reverse-mode autodiff.
    """

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if not isinstance(operator, BidiagonalOperator):
            raise ValueError(
                "`partime.ScanSolver` only solves `partime.BidiagonalOperator`s, got "
                f"{type(operator).__name__}."
            )
        return operator

    def compute(self, state: BidiagonalOperator, vector, options: dict[str, Any]):
        del options
        return state.solve(vector), lx.RESULTS.successful, {}

    def transpose(self, state: BidiagonalOperator, options: dict[str, Any]):
        return state.transpose(), options

    def conj(self, state: BidiagonalOperator, options: dict[str, Any]):
        return lx.conj(state), options

    def assume_full_rank(self):
        return True


@lx.linearise.register(BidiagonalOperator)
@lx.materialise.register(BidiagonalOperator)
def _(operator):
    return operator


@lx.diagonal.register(BidiagonalOperator)
def _(operator):
    if operator.diagonal_blocks is None:
        return jnp.ones(operator.in_size(), operator.transition.dtype)
    return jnp.diagonal(operator.diagonal_blocks, axis1=-2, axis2=-1).reshape(-1)


@lx.conj.register(BidiagonalOperator)
def _(operator):
    blocks = operator.diagonal_blocks
    return BidiagonalOperator(
        operator.transition.conj(),
        None if blocks is None else jnp.conj(blocks),
        operator.transposed,
    )


@lx.is_symmetric.register(BidiagonalOperator)
@lx.is_diagonal.register(BidiagonalOperator)
@lx.is_tridiagonal.register(BidiagonalOperator)
@lx.is_positive_semidefinite.register(BidiagonalOperator)
@lx.is_negative_semidefinite.register(BidiagonalOperator)
def _(operator):
    return False


@lx.has_unit_diagonal.register(BidiagonalOperator)
def _(operator):
    return operator.diagonal_blocks is None


@lx.is_lower_triangular.register(BidiagonalOperator)
def _(operator):
    return operator.diagonal_blocks is None and not operator.transposed


@lx.is_upper_triangular.register(BidiagonalOperator)
def _(operator):
    return operator.diagonal_blocks is None and operator.transposed
