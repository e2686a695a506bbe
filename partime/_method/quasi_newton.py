from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from equinox import AbstractVar
from equinox.internal import unvmap_any

from .._jacobian import AbstractJacobian, check_probes, Dense
from .._lds import DiagonalTransition
from .._misc import batch_where
from .base import AbstractMethod


# `refresh="auto"`: the diagonal is recomputed after an accepted update that reduced
# the merit less than `1 / _STALL`-fold.
_STALL = 0.5


class _AbstractDiagonalMethod(AbstractMethod):
    """The diagonal transitions `diag(∂f_t/∂s_{t-1})` of QuasiNewton and QuasiELK:
    how they are computed (`jacobian`, `jacobian_batch_size`, `diagonal_probes`) and
    when they are recomputed (`refresh`). Wraps the policy of the class after it in
    the MRO (undamped or damped) as `(policy, stale)`."""

    jacobian: AbstractVar[AbstractJacobian]
    jacobian_batch_size: AbstractVar[int | None]
    diagonal_probes: AbstractVar[int | None]
    refresh: AbstractVar[bool | Literal["auto"]]

    transitions_are_jacobians: ClassVar[bool] = False

    def linearise(self, step, prev, xs):
        f, diagonal = self.jacobian.diagonal(
            step, prev, xs, self.jacobian_batch_size, self.diagonal_probes
        )
        return f, DiagonalTransition(diagonal)

    def init_policy(self, length, dtype):
        """The policy of the method, and whether to recompute the diagonal."""
        return super().init_policy(length, dtype), jnp.asarray(False)

    def propose(self, layout, transition, residual, policy):
        return super().propose(layout, transition, residual, policy[0])

    def cut(self, layout, prefix, policy):
        return super().cut(layout, prefix, policy[0])

    def judge(self, layout, policy, *, old_merit, merit, **kwargs):
        accept, inner = super().judge(
            layout, policy[0], old_merit=old_merit, merit=merit, **kwargs
        )
        return accept, (inner, merit > _STALL * old_merit)

    def relinearise(self, step, prev, xs, transition, policy, first=False):
        """Recomputes the diagonal if `refresh` says so (and at the `first`
        iterate), else keeps it."""
        if self.refresh is True:
            return self.linearise(step, prev, xs)[1]
        stale = jnp.asarray(first)
        if self.refresh == "auto":
            stale = stale | policy[1]
        # Unbatched under `jax.vmap`: the diagonal is recomputed only if some member
        # of the batch asks for it (a batched cond would compute it at every call),
        # and kept by the others.
        return jax.lax.cond(
            unvmap_any(stale),
            lambda: batch_where(stale, self.linearise(step, prev, xs)[1], transition),
            lambda: transition,
        )

    def __check_init__(self):
        check_probes(self.diagonal_probes)
        if not (isinstance(self.refresh, bool) or self.refresh == "auto"):
            raise ValueError(
                f"`refresh` must be True, False or 'auto', got {self.refresh!r}."
            )


class QuasiNewton(_AbstractDiagonalMethod, AbstractMethod):
    """Quasi-Newton over the whole sequence (quasi-DEER): `Ã_t = diag(∂f_t/∂s_{t-1})`.

    Memory and scan work are `O(T d)` instead of Newton's `O(T d²)` and `O(T d³)`, at
    the price of more iterations (linear rather than quadratic convergence). The
    diagonal is computed by forward-mode products: `d` per step for a dense
    Jacobian (`jacobian_batch_size` at a time; or `diagonal_probes` for an
    estimate), `k` for a declared block-diagonal one, one for a diagonal one. By
    default it is computed at the first iterate and recomputed only after an
    iteration that did not halve the merit `½ Σ_t ‖r_t‖²` (`refresh`): an
    iteration that keeps it costs one evaluation of every step besides the scan.

    **Arguments:** `rtol`, `atol`, `max_iters` (default 200), `fallback`; see
    [`partime.AbstractMethod`][]; and

    - `jacobian`: the structure of the step's Jacobian, if known
        ([`partime.Dense`][] by default; [`partime.Diagonal`][],
        [`partime.BlockDiagonal`][]); it only makes the diagonal cheaper. A wrong
        declaration gives a wrong diagonal, which costs iterations but never
        exactness.
    - `jacobian_batch_size`: how many Jacobian-vector products to evaluate at once when
        computing the diagonal of a dense Jacobian. `None` picks the largest that
        keeps the intermediate under about `2^22` numbers (`batch_size · T · d`).
    - `diagonal_probes`: estimate the diagonal of a dense Jacobian from this many
        products per step instead of `d` (`None`, default: exact). The tangent `j`
        is 1 at the components `i ≡ j (mod c)`, which gives
        `J_ii + Σ_{l ≡ i, l ≠ i} J_il`: exact for diagonal Jacobians, close where
        the diagonal dominates its row (gated cells, ODE steps `I + h ∂g/∂s`). The
        answer is exact regardless (the diagonal only preconditions the
        iteration), but a poor estimate costs iterations: measure
        `stats.num_iterations` before and after.
    - `refresh`: when to recompute the diagonal after the first iterate: `"auto"`
        (default) after an accepted update that reduced the merit less than
        2-fold, `True` at every iterate (quasi-DEER as published), `False` never.
        The diagonal only preconditions the update and the residual decides
        convergence, so the answer is exact in every case; a kept diagonal costs
        iterations only where the iterate moves far from where it was computed.
        Under `vmap` the diagonal is recomputed only when some member asks for it.
        (With a sliding window, `window=W`, it is recomputed whenever the window
        moves.) See "Choosing a method" for measurements.

    ??? cite "Reference"

        ```bibtex
        @inproceedings{gonzalez2024towards,
            title={Towards Scalable and Stable Parallelization of Nonlinear RNNs},
            author={Gonzalez, Xavier and Warrington, Andrew and Smith, Jimmy T.H. and
                    Linderman, Scott W.},
            booktitle={Advances in Neural Information Processing Systems},
            year={2024}
        }
        ```
    """

    rtol: float | None = eqx.field(static=True, default=None)
    atol: float | None = eqx.field(static=True, default=None)
    max_iters: int | None = eqx.field(static=True, default=None)
    fallback: bool = eqx.field(static=True, default=True)
    jacobian: AbstractJacobian = eqx.field(static=True, default=Dense())
    jacobian_batch_size: int | None = eqx.field(static=True, default=None)
    diagonal_probes: int | None = eqx.field(static=True, default=None)
    refresh: bool | Literal["auto"] = eqx.field(static=True, default="auto")

    @property
    def default_max_iters(self):
        return 200
