from typing import ClassVar

import equinox as eqx
import jax

from .._jacobian import AbstractJacobian, check_probes, Dense
from .._lds import DiagonalTransition
from .base import AbstractMethod


class QuasiNewton(AbstractMethod):
    """Quasi-Newton over the whole sequence (quasi-DEER): `Ã_t = diag(∂f_t/∂s_{t-1})`.

    Memory and scan work are `O(T d)` instead of Newton's `O(T d²)` and `O(T d³)`, at
    the price of more iterations (linear rather than quadratic convergence). The
    diagonal is computed by forward-mode products: `d` per step for a dense
    Jacobian (`jacobian_batch_size` at a time; or `diagonal_probes` for an
    estimate), `k` for a declared block-diagonal one, one for a diagonal one. It is
    computed once, at the first iterate, and kept (unless `refresh`): an iteration
    then costs one evaluation of every step besides the scan.

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
    - `refresh`: recompute the diagonal at every iterate, as quasi-DEER does
        (`False`, default: keep the first iterate's). The diagonal only
        preconditions the update, so either answer is exact; a fresh diagonal can
        save iterations when the first iterate is far from the solution, but costs
        the diagonal's products at every iteration. On a GRU with `d = 64` keeping
        it took 9 iterations instead of 8 at a quarter of the time; on the
        convergence study's RNNs and ODEs (`d ≤ 8`) up to 1.2x the iterations, never
        more time. (With a sliding window, `window=W`, it is recomputed whenever the
        window moves.)

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

    transitions_are_jacobians: ClassVar[bool] = False
    jacobian_batch_size: int | None = eqx.field(static=True, default=None)
    diagonal_probes: int | None = eqx.field(static=True, default=None)
    refresh: bool = eqx.field(static=True, default=False)

    @property
    def default_max_iters(self):
        return 200

    def linearise(self, step, prev, xs):
        f, diagonal = self.jacobian.diagonal(
            step, prev, xs, self.jacobian_batch_size, self.diagonal_probes
        )
        return f, DiagonalTransition(diagonal)

    def relinearise(self, step, prev, xs, transition):
        """Keeps the diagonal of the first iterate unless `refresh`: the steps are
        evaluated, no Jacobian-vector product."""
        if self.refresh:
            return self.linearise(step, prev, xs)
        return jax.vmap(step)(prev, xs), transition

    def __check_init__(self):
        check_probes(self.diagonal_probes)
