import equinox as eqx

from .._jacobian import AbstractJacobian, Dense
from .base import AbstractMethod


class Newton(AbstractMethod):
    """Newton's method over the whole sequence (DEER).

    The transition is the full Jacobian `Ã_t = ∂f_t/∂s_{t-1}`, computed with
    forward-mode autodiff. Converges quadratically — typically in 3–6 iterations on
    contracting problems, nearly independently of `T` — at the price of `O(T d²)`
    memory and `O(d³)` work per scan combine. The method of choice for small and
    moderate `d`, and the default of `partime.scan` and `partime.ParallelSolver`.

    From a poor guess the linearised dynamics can be unstable (a state near an
    unstable equilibrium, an RNN whose Jacobians have spectral radius > 1) and the
    undamped update overflows far from the converged prefix. Each update is therefore
    trusted only over an adaptive horizon past the prefix (a trust region in time,
    see [`partime.fixed_point_solve`][]); it keeps Newton's guarantee of at least one
    more exact step per iteration, where damping ([`partime.ELK`][]) gives it up.

    **Arguments:** `rtol`, `atol`, `max_iters` (default 50), `fallback`; see
    [`partime.AbstractMethod`][]; and

    - `jacobian`: the structure of the step's Jacobian, if known:
        [`partime.Dense`][] (default), [`partime.Diagonal`][] or
        [`partime.BlockDiagonal`][]`(k)`. With `k x k` blocks each iteration costs
        `k` forward-mode products per step (instead of `d`), memory `O(T d k)` and
        `O(d k²)` per scan combine, and the derivative's linear solve uses the same
        structured scan. Still exact if the declaration is wrong (entries off the
        structure are dropped: Newton becomes a quasi-Newton method, the convergence
        test and the fallback keep the answer exact), only slower.

    The default cap comes from the convergence study (`benchmarks/convergence.py`):
    from a constant guess Newton converges in 4–31 iterations wherever the
    recurrence is predictable over the horizon (contracting: nearly independent of
    `T`; neutral, such as oscillators: growing with the number of periods), and
    needs `O(T)` where it is not (chaotic: positive largest Lyapunov exponent
    `λ` with `λ·T` beyond a few units). The hopeless-case test judges progress over
    the last tenth of the cap, i.e. after 5 accepted iterations (8–11 in all on
    chaotic maps); raise `max_iters` for more patience where iterations are cheap
    relative to sequential steps (accelerators, long horizons).

    ??? cite "Reference"

        ```bibtex
        @inproceedings{lim2024parallelizing,
            title={Parallelizing non-linear sequential models over the sequence length},
            author={Lim, Yi Heng and Zhu, Qi and Selfridge, Joshua and Kasim,
                    Muhammad Firmansyah},
            booktitle={International Conference on Learning Representations},
            year={2024}
        }
        ```
    """

    rtol: float | None = eqx.field(static=True, default=None)
    atol: float | None = eqx.field(static=True, default=None)
    max_iters: int | None = eqx.field(static=True, default=None)
    fallback: bool = eqx.field(static=True, default=True)
    jacobian: AbstractJacobian = eqx.field(static=True, default=Dense())

    @property
    def default_max_iters(self):
        return 50

    def linearise(self, step, prev, xs):
        return self.jacobian.linearise(step, prev, xs)
