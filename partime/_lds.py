"""The linear dynamical system (LDS) engine.

Solves `x_t = A_t x_{t-1} + b_t`, `t = 1..T`, `x_0 = 0`, for all `t` at once with an
associative scan in `O(log T)` depth, and its transpose `y_t = b_t + A_{t+1}^T y_{t+1}`,
`y_{T+1} = 0` (a reverse scan), which reverse-mode autodiff needs.

The affine maps `x -> A x + b` compose as
`(A_2, b_2) ∘ (A_1, b_1) = (A_2 A_1, A_2 b_1 + b_2)`, which is associative; each
transition structure below stores only what its `A_t` needs.

On a CPU the same solves run as a sequential `lax.scan` of matrix-vector products
instead: `O(T d²)` work against the associative scan's `O(T d³)`, one small loop
where the associative scan unrolls `2 log T` levels of distinct shapes (for each of
which XLA:CPU generates code), and faster on a CPU's few cores at every size measured
(`T` to `10⁵`, `d` to 64; see `docs/how-it-works.md`). The choice is made by the
platform at trace time, as `ParallelSolver(window=None)` makes its own.
"""

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


_HIGHEST = jax.lax.Precision.HIGHEST

# `None`: by the platform at trace time; `scan_kind` sets it (for tests).
_SCAN_KIND: Literal["sequential", "associative"] | None = None


@contextlib.contextmanager
def scan_kind(kind: Literal["sequential", "associative"] | None) -> Iterator[None]:
    """Trace the solves and `log_growth`s of the transitions with this kind of scan
    (`None`: sequential on a CPU, associative elsewhere)."""
    global _SCAN_KIND
    previous, _SCAN_KIND = _SCAN_KIND, kind
    try:
        yield
    finally:
        _SCAN_KIND = previous


def _sequential() -> bool:
    if _SCAN_KIND is None:
        return jax.default_backend() == "cpu"
    return _SCAN_KIND == "sequential"


class AbstractTransition(eqx.Module):
    """The transitions `A_1, ..., A_T` of a linear dynamical system on `R^d`."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """`(T, d)`."""

    # Every transition also has a `dtype` (a field or a property).

    @abc.abstractmethod
    def apply(self, x: Float[Array, "T d"]) -> Float[Array, "T d"]:
        """`x_t -> A_t x_t` for every `t`."""

    @abc.abstractmethod
    def apply_transpose(self, x: Float[Array, "T d"]) -> Float[Array, "T d"]:
        """`x_t -> A_t^T x_t` for every `t`."""

    @abc.abstractmethod
    def solve(
        self, b: Float[Array, "T d"], reverse: bool = False
    ) -> Float[Array, "T d"]:
        """Forward: `x_t = A_t x_{t-1} + b_t`, `x_0 = 0`.
        Reverse (the transpose): `y_t = A_{t+1}^T y_{t+1} + b_t`, `y_{T+1} = 0`.
        """

    @abc.abstractmethod
    def as_dense(self) -> Float[Array, "T d d"]:
        """The transitions as a stack of `d x d` matrices."""

    def conj(self) -> "AbstractTransition":
        """The elementwise complex conjugate (the identity on real transitions)."""
        return jax.tree_util.tree_map(jnp.conj, self)

    def log_growth(self, mask: Bool[Array, " T"] | None = None) -> Float[Array, ""]:
        """`log ‖A_T ⋯ A_1‖` (the largest entry in magnitude), without overflow: the
        product is formed as a tree of pairwise products, each rescaled to largest
        entry 1 and the logarithms of the scales summed. `O(T d³)` work,
        `O(log T)` depth. `-inf` if the product is zero. `mask`: the product of the
        `A_t` where it is true only (the others taken as the identity)."""
        matrices = self.as_dense()
        if mask is not None:
            eye = jnp.eye(matrices.shape[-1], dtype=matrices.dtype)
            matrices = jnp.where(mask[:, None, None], matrices, eye)
        return _log_norm_product(matrices)


def _log_norm_product(matrices: Float[Array, "T d d"]) -> Float[Array, ""]:
    """`log max_ij |(M_T ⋯ M_1)_ij|`, by rescaled pairwise products (on a CPU, by
    rescaled products in sequence)."""
    dtype = matrices.dtype
    if _sequential():
        return _log_norm_product_sequential(matrices)
    total = jnp.zeros((), dtype)
    while matrices.shape[0] > 1:
        if matrices.shape[0] % 2:
            eye = jnp.eye(matrices.shape[-1], dtype=dtype)
            matrices = jnp.concatenate([matrices, eye[None]])
        # Later steps on the left.
        matrices = jnp.matmul(matrices[1::2], matrices[0::2], precision=_HIGHEST)
        scale = jnp.max(jnp.abs(matrices), axis=(-2, -1))
        total = total + jnp.sum(jnp.log(scale))
        safe = jnp.where(scale > 0, scale, 1)
        matrices = matrices / safe[:, None, None]
    return total + jnp.log(jnp.max(jnp.abs(matrices)))


def _log_norm_product_sequential(matrices: Float[Array, "T d d"]) -> Float[Array, ""]:
    """`_log_norm_product` by a `lax.scan`: `P_t = M_t P_{t-1}`, rescaled to largest
    entry 1 after every product and the logarithms of the scales summed."""

    def body(carry, matrix):
        product, total = carry
        product = jnp.matmul(matrix, product, precision=_HIGHEST)
        scale = jnp.max(jnp.abs(product))
        safe = jnp.where(scale > 0, scale, 1)
        return (product / safe, total + jnp.log(scale)), None

    start = (matrices[0], jnp.zeros((), matrices.dtype))
    (product, total), _ = jax.lax.scan(body, start, matrices[1:])
    return total + jnp.log(jnp.max(jnp.abs(product)))


def _shift_back(a: Array) -> Array:
    """`a_{t+1}` at position `t`; zero at the last position."""
    return jnp.concatenate([a[1:], jnp.zeros_like(a[:1])])


def compose_matrices(
    first: tuple[Array, Array], second: tuple[Array, Array]
) -> tuple[Array, Array]:
    """`(A_2, b_2) ∘ (A_1, b_1) = (A_2 A_1, A_2 b_1 + b_2)` for matrices `A` (with any
    leading batch axes)."""
    a1, b1 = first
    a2, b2 = second
    a_out = jnp.matmul(a2, a1, precision=_HIGHEST)
    b_out = jnp.einsum("...ij,...j->...i", a2, b1, precision=_HIGHEST) + b2
    return a_out, b_out


def compose_diagonals(
    first: tuple[Array, Array], second: tuple[Array, Array]
) -> tuple[Array, Array]:
    """`(a_2, b_2) ∘ (a_1, b_1) = (a_2 a_1, a_2 b_1 + b_2)` for diagonals `a`."""
    a1, b1 = first
    a2, b2 = second
    return a2 * a1, a2 * b1 + b2


def matvec(a: Array, x: Array) -> Array:
    """`a x` for matrices `a` (with any leading batch axes)."""
    return jnp.einsum("...ij,...j->...i", a, x, precision=_HIGHEST)


def matvec_transpose(a: Array, x: Array) -> Array:
    """`a^T x` for matrices `a` (with any leading batch axes)."""
    return jnp.einsum("...ji,...j->...i", a, x, precision=_HIGHEST)


def _affine_solve(
    a: Array,
    b: Array,
    reverse: bool,
    compose: Callable,
    apply: Callable[[Array, Array], Array],
    apply_transpose: Callable[[Array, Array], Array],
    transpose: Callable[[Array], Array],
) -> Array:
    """Forward, `x_t = a_t x_{t-1} + b_t` (`x_0 = 0`); in `reverse`, the transpose
    `y_t = a_{t+1}^T y_{t+1} + b_t` (`y_{T+1} = 0`); along the leading axis of `a`
    and `b`, which may carry axes of blocks after it. `compose` composes two affine
    maps `(a, b)`; `apply(a, x)` is `a x`, `apply_transpose(a, x)` is `a^T x` and
    `transpose(a)` is `a^T`.

    Sequential on a CPU (see the module's docstring): in reverse, the carry is
    `z_t = a_t^T y_t`, so that the transposes are applied in the loop rather than
    formed and shifted."""
    if _sequential():
        if reverse:

            def body(z, inputs):
                a_t, b_t = inputs
                y = z + b_t
                return apply_transpose(a_t, y), y

        else:

            def body(x, inputs):
                a_t, b_t = inputs
                x = apply(a_t, x) + b_t
                return x, x

        start = jnp.zeros(b.shape[1:], jnp.result_type(a, b))
        _, x = jax.lax.scan(body, start, (a, b), reverse=reverse)
        return x
    if reverse:
        a = _shift_back(transpose(a))
    _, x = jax.lax.associative_scan(compose, (a, b), reverse=reverse)
    return x


def _affine_scan(a: Array, b: Array, reverse: bool) -> Array:
    """`_affine_solve` for matrices `a`."""
    swap = lambda m: jnp.swapaxes(m, -1, -2)
    return _affine_solve(
        a, b, reverse, compose_matrices, matvec, matvec_transpose, swap
    )


class DenseTransition(AbstractTransition):
    """Full `d x d` transitions (Newton / DEER). Each combine costs `O(d^3)`."""

    matrices: Float[Array, "T d d"]

    @property
    def shape(self):
        return self.matrices.shape[:2]

    @property
    def dtype(self):
        return self.matrices.dtype

    def apply(self, x):
        return jnp.einsum("tij,tj->ti", self.matrices, x, precision=_HIGHEST)

    def apply_transpose(self, x):
        return jnp.einsum("tji,tj->ti", self.matrices, x, precision=_HIGHEST)

    def solve(self, b, reverse=False):
        return _affine_scan(self.matrices, b, reverse)

    def as_dense(self):
        return self.matrices


class DiagonalTransition(AbstractTransition):
    """Diagonal transitions (quasi-Newton): memory and work `O(T d)`."""

    diagonals: Float[Array, "T d"]

    @property
    def shape(self):
        return self.diagonals.shape

    @property
    def dtype(self):
        return self.diagonals.dtype

    def apply(self, x):
        return self.diagonals * x

    def apply_transpose(self, x):
        return self.diagonals * x

    def solve(self, b, reverse=False):
        times = lambda a, x: a * x
        same = lambda a: a
        return _affine_solve(
            self.diagonals, b, reverse, compose_diagonals, times, times, same
        )

    def as_dense(self):
        return jax.vmap(jnp.diag)(self.diagonals)

    def log_growth(self, mask=None):
        logs = jnp.log(jnp.abs(self.diagonals))
        if mask is not None:
            logs = jnp.where(mask[:, None], logs, 0)
        return jnp.max(jnp.sum(logs, axis=0))


class BlockDiagonalTransition(AbstractTransition):
    """Block-diagonal transitions with `k x k` blocks on the diagonal (a structured
    Newton, e.g. for ParaRNN-style cells): memory `O(T d k)`, each combine a batched
    `k x k` matrix product, `O(d k^2)`.

    Component `i` of the state is entry `i mod k` of block `i // k`.
    """

    blocks: Float[Array, "T n k k"]

    @property
    def shape(self):
        length, num_blocks, size, _ = self.blocks.shape
        return (length, num_blocks * size)

    @property
    def dtype(self):
        return self.blocks.dtype

    def _blocked(self, x: Array) -> Array:
        return x.reshape(*x.shape[:-1], *self.blocks.shape[1:3])

    def apply(self, x):
        out = jnp.einsum(
            "tnij,tnj->tni", self.blocks, self._blocked(x), precision=_HIGHEST
        )
        return out.reshape(x.shape)

    def apply_transpose(self, x):
        out = jnp.einsum(
            "tnji,tnj->tni", self.blocks, self._blocked(x), precision=_HIGHEST
        )
        return out.reshape(x.shape)

    def solve(self, b, reverse=False):
        return _affine_scan(self.blocks, self._blocked(b), reverse).reshape(b.shape)

    def as_dense(self):
        length, num_blocks, size, _ = self.blocks.shape
        eye = jnp.eye(num_blocks, dtype=self.dtype)
        dense = jnp.einsum("tnij,nm->tnimj", self.blocks, eye, precision=_HIGHEST)
        return dense.reshape(length, num_blocks * size, num_blocks * size)

    def log_growth(self, mask=None):
        # The product is block-diagonal: its largest entry is the largest of the
        # blocks' products' (`O(T d k²)` work, not `O(T d³)`).
        blocks = self.blocks
        if mask is not None:
            eye = jnp.eye(blocks.shape[-1], dtype=blocks.dtype)
            blocks = jnp.where(mask[:, None, None, None], blocks, eye)
        return jnp.max(jax.vmap(_log_norm_product, in_axes=1)(blocks))


class IdentityTransition(AbstractTransition):
    """`A_t = I` (Picard): the solve is a cumulative sum."""

    length: int = eqx.field(static=True)
    size: int = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    @property
    def shape(self):
        return (self.length, self.size)

    def apply(self, x):
        return x

    def apply_transpose(self, x):
        return x

    def solve(self, b, reverse=False):
        return jax.lax.cumsum(b, axis=0, reverse=reverse)

    def as_dense(self):
        return jnp.broadcast_to(
            jnp.eye(self.size, dtype=self.dtype), (self.length, self.size, self.size)
        )

    def log_growth(self, mask=None):
        return jnp.zeros((), self.dtype)


class ZeroTransition(AbstractTransition):
    """`A_t = 0` (Jacobi): the solve is the identity map on `b`."""

    length: int = eqx.field(static=True)
    size: int = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    @property
    def shape(self):
        return (self.length, self.size)

    def apply(self, x):
        return jnp.zeros_like(x)

    def apply_transpose(self, x):
        return jnp.zeros_like(x)

    def solve(self, b, reverse=False):
        return b

    def as_dense(self):
        return jnp.zeros((self.length, self.size, self.size), self.dtype)

    def log_growth(self, mask=None):
        # The empty product (nothing masked in) is the identity.
        empty = jnp.asarray(False) if mask is None else ~jnp.any(mask)
        return jnp.where(empty, 0, -jnp.inf).astype(self.dtype)


def sequential_solve(
    transition: AbstractTransition, b: Float[Array, "T d"], reverse: bool = False
) -> Float[Array, "T d"]:
    """Reference implementation of [`partime.AbstractTransition.solve`][], with
    `jax.lax.scan`.

    For tests, and as the exact sequential path.
    """
    a = transition.as_dense()
    if reverse:
        a = _shift_back(jnp.swapaxes(a, -1, -2))

    def body(x_prev, inputs):
        a_t, b_t = inputs
        x = jnp.matmul(a_t, x_prev, precision=_HIGHEST) + b_t
        return x, x

    _, x = jax.lax.scan(body, jnp.zeros_like(b[0]), (a, b), reverse=reverse)
    return x
