"""The Levenberg–Marquardt step of a whole sequence, as a parallel Kalman smoother.

Around an iterate `s` with residuals `r_t = s_t - f_t(s_{t-1})` and transitions
`A_t ≈ ∂f_t/∂s_{t-1}`, the Gauss–Newton model of the merit `½ Σ_t ‖r_t‖²` is
`½ ‖r + L Δ‖²` with the block lower-bidiagonal `(L Δ)_t = Δ_t - A_t Δ_{t-1}`,
`Δ_0 = 0`. The Levenberg–Marquardt step with damping `λ > 0`,

    Δ = argmin ½ Σ_t ‖Δ_t - A_t Δ_{t-1} + r_t‖² + ½ λ Σ_t ‖Δ_t‖²,

i.e. `(LᵀL + λI) Δ = -Lᵀ r`, is the posterior mean (the MAP) of the linear-Gaussian
state-space model

    Δ_t = A_t Δ_{t-1} - r_t + q_t,   q_t ~ N(0, I),     (dynamics)
    0   = Δ_t + v_t,                 v_t ~ N(0, I/λ),   (pseudo-observations)

given *all* the observations: the *smoothed* mean, not the filtered one (the filtered
mean at `t` ignores the observations after `t` and is not the LM step). We compute it
with the parallel Kalman filter and Rauch–Tung–Striebel smoother of Särkkä and
García-Fernández (2021), two associative scans of depth `O(log T)`: the filter's
elements carry `(A, b, C, η, J)` and combine with one small `d × d` solve each (lineax
LU under `vmap`); the smoother is a reverse affine scan `Δ_t = E_t Δ_{t+1} + g_t`.

Because the dynamics noise, the observation matrix and the observation noise are all
multiples of `I`, each step's Kalman gain is the scalar `λ / (1 + λ)` and the filter
elements need no solve at all. With diagonal transitions (quasi-Newton, Picard,
Jacobi) every matrix is diagonal and the whole computation is elementwise: `d`
independent scalar smoothers.

Departure from the ELK reference code: it returns the filtered means; we return the
smoothed ones, which is the LM step (checked against the dense normal equations in the
tests).

??? cite "References"

    ```bibtex
    @article{sarkka2021temporal,
        title={Temporal Parallelization of Bayesian Smoothers},
        author={Särkkä, Simo and García-Fernández, Ángel F.},
        journal={IEEE Transactions on Automatic Control},
        volume={66},
        number={1},
        pages={299--306},
        year={2021}
    }
    @inproceedings{gonzalez2024towards,
        title={Towards Scalable and Stable Parallelization of Nonlinear RNNs},
        author={Gonzalez, Xavier and Warrington, Andrew and Smith, Jimmy T.H. and
                Linderman, Scott W.},
        booktitle={Advances in Neural Information Processing Systems},
        year={2024}
    }
    ```
"""

import jax
import jax.numpy as jnp
import lineax as lx
from jaxtyping import Array, Float

from ._lds import (
    AbstractTransition,
    DiagonalTransition,
    IdentityTransition,
    ZeroTransition,
)


_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _mv(a: Array, b: Array) -> Array:
    return jnp.einsum("...ij,...j->...i", a, b, precision=_HIGHEST)


def _t(a: Array) -> Array:
    return jnp.swapaxes(a, -1, -2)


def _sym(a: Array) -> Array:
    # Covariances and information matrices are symmetric; rounding is not.
    return 0.5 * (a + _t(a))


def _solve(matrices: Float[Array, "n d d"], rhs: Float[Array, "n d k"]) -> Array:
    """Solves `M_i X_i = B_i` for a batch of small systems, with lineax's LU under
    `vmap`."""
    if matrices.shape[0] == 0:
        # `associative_scan` can call the combine on an empty batch; lineax cannot
        # take one.
        return jnp.zeros_like(rhs)

    def solve_one(matrix, b):
        operator = lx.MatrixLinearOperator(matrix)
        state = lx.LU().init(operator, {})

        def solve_column(column):
            return lx.linear_solve(
                operator, column, lx.LU(), state=state, throw=False
            ).value

        return jax.vmap(solve_column, in_axes=1, out_axes=1)(b)

    return jax.vmap(solve_one)(matrices, rhs)


def _shift_back(a: Array) -> Array:
    """`a_{t+1}` at position `t`; zero at the last position."""
    return jnp.concatenate([a[1:], jnp.zeros_like(a[:1])])


def _dense_smoother(
    a: Float[Array, "T d d"], u: Float[Array, "T d"], damping: Float[Array, ""]
) -> Float[Array, "T d"]:
    length, size = u.shape
    dtype = u.dtype
    eye = jnp.eye(size, dtype=dtype)
    gain = damping / (1 + damping)  # the Kalman gain, K = gain · I
    keep = 1 / (1 + damping)  # I - K

    # Filtering elements (Särkkä & García-Fernández 2021, Lemma 7) for
    # F = A_t, u_t, Q = I, H = I, R = I/λ, y_t = 0. The first step starts from the
    # known Δ_0 = 0, so its element has A = 0, η = 0, J = 0.
    first = jnp.arange(length) == 0
    elem_a = jnp.where(first[:, None, None], 0, keep * a)
    elem_b = keep * u
    elem_c = jnp.broadcast_to(keep * eye, (length, size, size))
    elem_eta = jnp.where(first[:, None], 0, -gain * _mv(_t(a), u))
    elem_j = jnp.where(first[:, None, None], 0, gain * _mm(_t(a), a))
    # One array per element, `[A | C | J | b | η]` of shape (d, 3d + 2): the
    # associative scan slices and pads every leaf at every level, so one leaf instead
    # of five compiles several times faster.
    packed = jnp.concatenate(
        [elem_a, elem_c, elem_j, elem_b[..., None], elem_eta[..., None]], axis=-1
    )

    def unpack(x):
        return (
            x[..., :size],
            x[..., size : 2 * size],
            x[..., 2 * size : 3 * size],
            x[..., 3 * size],
            x[..., 3 * size + 1],
        )

    def combine(earlier, later):
        a1, c1, j1, b1, eta1 = unpack(earlier)
        a2, c2, j2, b2, eta2 = unpack(later)
        # One LU of M^{-1} = I + C_1 J_2 per combine; (I + J_2 C_1)^{-1} = M^T.
        rhs = jnp.concatenate([a1, c1, (b1 + _mv(c1, eta2))[..., None]], axis=-1)
        c1_j2 = _mm(c1, j2)
        solved = _solve(jnp.broadcast_to(eye, c1_j2.shape) + c1_j2, rhs)
        m_a1, m_c1, m_v = solved[..., :size], solved[..., size:-1], solved[..., -1]
        a12 = _mm(a2, m_a1)
        b12 = _mv(a2, m_v) + b2
        c12 = _sym(_mm(_mm(a2, m_c1), _t(a2)) + c2)
        eta12 = _mv(_t(m_a1), eta2 - _mv(j2, b1)) + eta1
        j12 = _sym(_mm(_mm(_t(m_a1), j2), a1) + j1)
        return jnp.concatenate(
            [a12, c12, j12, b12[..., None], eta12[..., None]], axis=-1
        )

    _, covs, _, means, _ = unpack(jax.lax.associative_scan(combine, packed))

    # Smoothing elements: Δ_t = E_t Δ_{t+1} + g_t, with
    # E_t = P_t F^T (F P_t F^T + Q)^{-1}, g_t = m_t - E_t (F m_t + u_{t+1}),
    # F = A_{t+1}; and E_T = 0, g_T = m_T.
    a_next = _shift_back(a)
    u_next = _shift_back(u)
    fp = _mm(a_next, covs)
    predicted_cov = _sym(_mm(fp, _t(a_next))) + eye[None]
    # E_t^T = (F P F^T + I)^{-1} F P, the matrix being symmetric.
    gains = _t(_solve(predicted_cov, fp))
    last = (jnp.arange(length) == length - 1)[:, None]
    gains = jnp.where(last[..., None], 0, gains)
    offsets = means - _mv(gains, _mv(a_next, means) + u_next)
    offsets = jnp.where(last, means, offsets)

    def smooth_combine(later, earlier):
        # `reverse=True` hands the element later in time first.
        e2, g2 = later[..., :size], later[..., size]
        e1, g1 = earlier[..., :size], earlier[..., size]
        return jnp.concatenate([_mm(e1, e2), (_mv(e1, g2) + g1)[..., None]], axis=-1)

    packed = jnp.concatenate([gains, offsets[..., None]], axis=-1)
    smoothed = jax.lax.associative_scan(smooth_combine, packed, reverse=True)
    return smoothed[..., size]


def _diagonal_smoother(
    a: Float[Array, "T d"], u: Float[Array, "T d"], damping: Float[Array, ""]
) -> Float[Array, "T d"]:
    # The dense algorithm with every matrix diagonal: d independent scalar smoothers.
    # Elements packed as one (5, d) array each (see `_dense_smoother`).
    length = u.shape[0]
    gain = damping / (1 + damping)
    keep = 1 / (1 + damping)
    first = (jnp.arange(length) == 0)[:, None]
    packed = jnp.stack(
        [
            jnp.where(first, 0, keep * a),
            keep * u,
            jnp.broadcast_to(keep, u.shape).astype(u.dtype),
            jnp.where(first, 0, -gain * a * u),
            jnp.where(first, 0, gain * a * a),
        ],
        axis=-2,
    )

    def combine(earlier, later):
        a1, b1, c1, eta1, j1 = (earlier[..., i, :] for i in range(5))
        a2, b2, c2, eta2, j2 = (later[..., i, :] for i in range(5))
        m = 1 / (1 + c1 * j2)
        return jnp.stack(
            [
                a2 * m * a1,
                a2 * m * (b1 + c1 * eta2) + b2,
                a2 * m * c1 * a2 + c2,
                a1 * m * (eta2 - j2 * b1) + eta1,
                a1 * m * j2 * a1 + j1,
            ],
            axis=-2,
        )

    filtered = jax.lax.associative_scan(combine, packed)
    means, covs = filtered[:, 1], filtered[:, 2]
    a_next = _shift_back(a)
    u_next = _shift_back(u)
    gains = covs * a_next / (a_next * covs * a_next + 1)
    last = (jnp.arange(length) == length - 1)[:, None]
    gains = jnp.where(last, 0, gains)
    offsets = jnp.where(last, means, means - gains * (a_next * means + u_next))

    def smooth_combine(later, earlier):
        e2, g2 = later[..., 0, :], later[..., 1, :]
        e1, g1 = earlier[..., 0, :], earlier[..., 1, :]
        return jnp.stack([e1 * e2, e1 * g2 + g1], axis=-2)

    packed = jnp.stack([gains, offsets], axis=-2)
    smoothed = jax.lax.associative_scan(smooth_combine, packed, reverse=True)
    return smoothed[:, 1]


def damped_solve(
    transition: AbstractTransition,
    residual: Float[Array, "T d"],
    damping: Float[Array, ""] | float,
) -> Float[Array, "T d"]:
    """The Levenberg–Marquardt step `Δ = -(LᵀL + λI)^{-1} Lᵀ r`, by a parallel Kalman
    filter and RTS smoother.

    **Arguments:**

    - `transition`: the `A_t` of `(L Δ)_t = Δ_t - A_t Δ_{t-1}`. Diagonal, identity
        and zero transitions use the elementwise smoother; any other is made dense.
    - `residual`: `r_t`, shape `(T, d)`.
    - `damping`: `λ > 0`. (At `λ = 0` the step is the undamped `-L^{-1} r`; solve
        that with `transition.solve` instead: without observations the filter's
        covariances grow with the dynamics and can overflow.)

    **Returns:** `Δ`, shape `(T, d)`.
    """
    damping = jnp.asarray(damping, residual.dtype)
    u = -residual
    if isinstance(transition, DiagonalTransition):
        return _diagonal_smoother(transition.diagonals, u, damping)
    if isinstance(transition, IdentityTransition):
        return _diagonal_smoother(jnp.ones_like(u), u, damping)
    if isinstance(transition, ZeroTransition):
        # No coupling between steps: each Δ_t = -r_t / (1 + λ).
        return u / (1 + damping)
    return _dense_smoother(transition.as_dense(), u, damping)
