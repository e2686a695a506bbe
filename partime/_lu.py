"""An LU linear solver in plain JAX operations, for the root finders of implicit inner
solvers.

Inside a window, each inner step's root finder factorises its Jacobian, vmapped over
the inner steps: a *batched* LAPACK `getrf`. On XLA:CPU (jaxlib 0.10), batched LAPACK
kernels spread the batch over the intra-op thread pool (`ParallelBatchMap`) and block
until it is done; two such kernels running at once can deadlock the process (every
worker idle, the main thread in `BlockUntilReady`), which made
`ParallelSolver(Kvaerno3(...))` hang. Gaussian elimination written as a
`lax.fori_loop` of vector operations calls no library kernel; for the small systems
of an inner step it costs about the same.
"""

from typing import Any

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import lineax as lx

# Private: lineax's own helpers to flatten PyTree-structured operators and vectors,
# exactly as `lineax.LU` does.
from lineax._solver.misc import (
    pack_structures,
    ravel_vector,
    transpose_packed_structures,
    unravel_solution,
)


def _lu_factor(matrix):
    """`(lu, perm)` with `matrix[perm] = L @ U` (partial pivoting), `L` unit lower
    triangular below the diagonal of `lu`, `U` on and above it."""
    n = matrix.shape[0]
    index = jnp.arange(n)
    if n == 0:
        # An empty state: nothing to factorise (and no column `k` to index).
        return matrix, index

    def body(k, carry):
        lu, perm = carry
        p = jnp.argmax(jnp.where(index >= k, jnp.abs(lu[:, k]), -1))
        row_k, row_p = lu[k], lu[p]
        lu = lu.at[k].set(row_p).at[p].set(row_k)
        perm = perm.at[k].set(perm[p]).at[p].set(perm[k])
        factors = jnp.where(index > k, lu[:, k] / lu[k, k], 0)
        lu = lu - factors[:, None] * jnp.where(index > k, lu[k], 0)[None, :]
        lu = lu.at[:, k].set(jnp.where(index > k, factors, lu[:, k]))
        return lu, perm

    return jax.lax.fori_loop(0, n, body, (matrix, index))


def _triangular_solve(matrix, vector, *, lower: bool, unit_diagonal: bool):
    n = vector.shape[0]
    index = jnp.arange(n)
    if n == 0:
        return jnp.zeros_like(vector)

    def body(i, x):
        k = i if lower else n - 1 - i
        known = index < k if lower else index > k
        value = vector[k] - jnp.sum(jnp.where(known, matrix[k], 0) * x)
        return x.at[k].set(value if unit_diagonal else value / matrix[k, k])

    return jax.lax.fori_loop(0, n, body, jnp.zeros_like(vector))


def _lu_solve(lu, perm, vector, transpose: bool):
    if transpose:
        # A^T = U^T L^T P: solve U^T z = b, L^T w = z, then x[perm] = w.
        z = _triangular_solve(lu.T, vector, lower=True, unit_diagonal=False)
        w = _triangular_solve(lu.T, z, lower=False, unit_diagonal=True)
        return jnp.zeros_like(w).at[perm].set(w)
    y = _triangular_solve(lu, vector[perm], lower=True, unit_diagonal=True)
    return _triangular_solve(lu, y, lower=False, unit_diagonal=False)


class PortableLU(lx.AbstractLinearSolver):
    """As `lineax.LU`, in plain JAX operations instead of LAPACK (see above)."""

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        del options
        if operator.in_size() != operator.out_size():
            raise ValueError("`PortableLU` needs a square operator.")
        lu_and_perm = _lu_factor(operator.as_matrix())
        return lu_and_perm, pack_structures(operator), eqxi.Static(False)

    def compute(self, state, vector, options: dict[str, Any]):
        del options
        (lu, perm), packed_structures, transpose = state
        vector = ravel_vector(vector, packed_structures)
        solution = _lu_solve(lu, perm, vector, transpose.value)
        solution = unravel_solution(solution, packed_structures)
        return solution, lx.RESULTS.successful, {}

    def transpose(self, state, options: dict[str, Any]):
        del options
        lu_and_perm, packed_structures, transpose = state
        structures = transpose_packed_structures(packed_structures)
        return (lu_and_perm, structures, eqxi.Static(not transpose.value)), {}

    def conj(self, state, options: dict[str, Any]):
        del options
        (lu, perm), packed_structures, transpose = state
        return ((lu.conj(), perm), packed_structures, transpose), {}

    def assume_full_rank(self):
        return True
