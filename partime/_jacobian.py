"""Declared structures of a step's Jacobian `∂f_t/∂s_{t-1}`: dense (the default),
diagonal, or block-diagonal.

A structure says which entries of the Jacobian can be non-zero, and so how few
Jacobian-vector products recover it: a block-diagonal Jacobian with `k x k` blocks is
known exactly from `k` products, with the tangents `c_j` that are 1 in column `j` of
every block (`j = 0..k-1`), since `(J c_j)_i = J_{i, k⌊i/k⌋ + j}` when only the
diagonal blocks are non-zero. A diagonal Jacobian is the case `k = 1`: one product,
with the all-ones tangent.

A wrong declaration (entries off the structure) never makes an answer wrong: the
transition is then an approximation of the Jacobian, which makes Newton a
quasi-Newton method, and the convergence test (the residual of every step) and the
exact sequential fallback still decide the answer. It only costs iterations.
"""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._lds import (
    AbstractTransition,
    BlockDiagonalTransition,
    DenseTransition,
    DiagonalTransition,
)


class AbstractJacobian(eqx.Module):
    """The declared structure of a step's Jacobian `∂f_t/∂s_{t-1}`, for the `jacobian`
    argument of [`partime.Newton`][], [`partime.QuasiNewton`][] and
    [`partime.QuasiELK`][].

    It says how to compute the Jacobian (Newton's transition) and its diagonal
    (quasi-Newton's) with as few Jacobian-vector products as the structure allows.
    """

    @abc.abstractmethod
    def linearise(
        self, step: Any, prev: Float[Array, "T d"], xs: PyTree[Any]
    ) -> tuple[Float[Array, "T d"], AbstractTransition]:
        """`f_t(s_{t-1})` for every `t`, and the Jacobians `∂f_t/∂s_{t-1}` in this
        structure (entries off it are dropped)."""

    @abc.abstractmethod
    def diagonal(
        self,
        step: Any,
        prev: Float[Array, "T d"],
        xs: PyTree[Any],
        batch_size: int | None,
        probes: int | None,
    ) -> tuple[Float[Array, "T d"], Float[Array, "T d"]]:
        """`f_t(s_{t-1})` and `diag(∂f_t/∂s_{t-1})` for every `t` (exact if the
        Jacobian has this structure).

        Where the structure is unknown ([`partime.Dense`][]): `probes`, if not
        `None` and below `d`, estimates the diagonal with that many products (see
        [`partime.QuasiNewton`][]); else it is exact, by `d` products, `batch_size`
        at a time (`None`: automatic). Declared structures ignore both."""


def check_probes(probes: int | None) -> None:
    """A `ValueError` unless `probes` is `None` or an integer >= 1."""
    if probes is not None and (
        isinstance(probes, bool) or not isinstance(probes, int) or probes < 1
    ):
        raise ValueError(
            f"`diagonal_probes` must be None (the exact diagonal) or an integer >= 1, "
            f"got {probes!r}."
        )


def coloured_diagonal(
    step: Any, prev: Float[Array, "T d"], xs: PyTree[Any], colors: int
) -> tuple[Float[Array, "T d"], Float[Array, "T d"]]:
    """`f_t(s_{t-1})`, and `diag(∂f_t/∂s_{t-1})` probed with `colors` products: the
    tangent `c_j` is 1 at the components `i ≡ j (mod colors)`, so that
    `(J c_{i mod colors})_i = J_ii + Σ_{l ≡ i, l ≠ i} J_il`. Exact when those other
    entries are zero: a diagonal Jacobian, or a block-diagonal one with blocks of
    `colors` components (Curtis–Powell–Reid colouring)."""
    size = prev.shape[-1]
    columns = np.arange(size) % colors
    tangents = jnp.asarray(columns == np.arange(colors)[:, None], prev.dtype)
    f, products = _probe(step, prev, xs, tangents)
    return f, products[:, columns, np.arange(size)]


def _probe(
    step: Any, prev: Float[Array, "T d"], xs: PyTree[Any], tangents: Array
) -> tuple[Float[Array, "T d"], Float[Array, "T p d"]]:
    """`f_t(s_{t-1})` and the products `(∂f_t/∂s_{t-1}) c_j` with the `p` tangents
    `c_j` (rows of `tangents`), every step linearised once."""

    def one(s, x):
        value, linear = jax.linearize(lambda s_: step(s_, x), s)
        return value, jax.vmap(linear)(tangents)

    return jax.vmap(one)(prev, xs)


class Dense(AbstractJacobian):
    """No structure (the default): the full `d x d` Jacobian, by `d` forward-mode
    products per step; Newton's scan combines cost `O(d³)`, its memory `O(T d²)`."""

    def linearise(self, step, prev, xs):
        def value_and_jac(s, x):
            value = step(s, x)
            return value, value

        jac, f = jax.vmap(jax.jacfwd(value_and_jac, has_aux=True))(prev, xs)
        return f, DenseTransition(jac)

    def diagonal(self, step, prev, xs, batch_size, probes):
        length, size = prev.shape
        if probes is not None and probes < size:
            return coloured_diagonal(step, prev, xs, probes)
        if batch_size is None:
            batch_size = max(1, min(size, 2**22 // max(1, length * size)))

        # One forward-mode product per basis vector, `batch_size` of them at a time,
        # keeping only the matching component: memory `O(T d · batch_size)`.
        def component(i):
            basis = jnp.zeros(size, prev.dtype).at[i].set(1)

            def one_step(s, x):
                _, tangent = jax.jvp(lambda s_: step(s_, x), (s,), (basis,))
                return tangent[i]

            return jax.vmap(one_step)(prev, xs)

        diagonal = jax.lax.map(component, jnp.arange(size), batch_size=batch_size)
        return jax.vmap(step)(prev, xs), diagonal.T


class Diagonal(AbstractJacobian):
    """A diagonal Jacobian: each component of the state depends only on itself at the
    previous step (element-wise recurrences, e.g. diagonal linear recurrences with
    element-wise nonlinearities). One forward-mode product per step, with the
    all-ones tangent: `diag(J) = J 1`. Newton's scan is then elementwise, `O(T d)`.
    """

    def linearise(self, step, prev, xs):
        f, diagonal = coloured_diagonal(step, prev, xs, 1)
        return f, DiagonalTransition(diagonal)

    def diagonal(self, step, prev, xs, batch_size, probes):
        del batch_size, probes
        return coloured_diagonal(step, prev, xs, 1)


class BlockDiagonal(AbstractJacobian):
    """A block-diagonal Jacobian with `block_size x block_size` blocks: the state is
    `d / k` groups of `k = block_size` consecutive components, each depending only on
    its own group at the previous step (as in ParaRNN's cells).

    `k` forward-mode products per step recover the blocks exactly — the tangents
    that are 1 in column `j` of every block — and Newton's scan elements are
    `(d/k, k, k)` stacks: memory `O(T d k)`, each combine a batched `k x k` matrix
    product, `O(d k²)` (instead of `O(T d²)` and `O(d³)`), forward and backward.

    **Arguments:**

    - `block_size`: `k`; the state size must be a multiple of it.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{danieli2026pararnn,
            title={ParaRNN: Unlocking Parallel Training of Nonlinear RNNs for Large
                   Language Models},
            author={Danieli, Federico and Rodriguez, Pau and Sarabia, Miguel and
                    Suau, Xavier and Zappella, Luca},
            booktitle={International Conference on Learning Representations},
            year={2026}
        }
        ```
    """

    block_size: int = eqx.field(static=True)

    def __check_init__(self):
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"`block_size` must be an integer >= 1, got {size!r}.")

    def _check(self, size: int) -> None:
        k = self.block_size
        if size % k:
            raise ValueError(
                f"`partime.BlockDiagonal({k})`: the state has {size} components, "
                f"not a multiple of the block size {k}. (Flattened PyTree states are "
                "concatenated leaf by leaf, in `jax.tree_util` order.)"
            )

    def _blocks(self, step, prev, xs):
        length, size = prev.shape
        k = self.block_size
        self._check(size)
        # Tangent j is 1 in column j of every block: component i is in column i mod k.
        columns = np.arange(size) % k
        tangents = jnp.asarray(columns == np.arange(k)[:, None], prev.dtype)
        f, products = _probe(step, prev, xs, tangents)
        # products[t, j, n k + i] = J_t[n k + i, n k + j] = blocks[t, n, i, j].
        blocks = products.reshape(length, k, size // k, k).transpose(0, 2, 3, 1)
        return f, blocks

    def linearise(self, step, prev, xs):
        if self.block_size == 1:
            return Diagonal().linearise(step, prev, xs)
        f, blocks = self._blocks(step, prev, xs)
        return f, BlockDiagonalTransition(blocks)

    def diagonal(self, step, prev, xs, batch_size, probes):
        del batch_size, probes
        self._check(prev.shape[-1])
        # The same k products; only the diagonal of each block is kept.
        return coloured_diagonal(step, prev, xs, self.block_size)
