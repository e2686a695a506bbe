import equinox as eqx
import jax

from .._lds import DenseTransition
from .base import AbstractMethod


def dense_linearise(step, prev, xs):
    """`f_t(s_{t-1})` and the full Jacobians `∂f_t/∂s_{t-1}`, by forward mode."""

    def value_and_jac(s, x):
        value = step(s, x)
        return value, value

    jac, f = jax.vmap(jax.jacfwd(value_and_jac, has_aux=True))(prev, xs)
    return f, DenseTransition(jac)


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
    [`partime.AbstractMethod`][].

    The default cap comes from the convergence study (`benchmarks/convergence.py`):
    from a constant guess Newton converges in 4–31 iterations wherever the
    recurrence is predictable over the horizon (contracting: nearly independent of
    `T`; neutral, such as oscillators: growing with the number of periods), and
    needs `O(T)` where it is not (chaotic: positive largest Lyapunov exponent
    `λ` with `λ·T` beyond a few units). The hopeless-case test judges progress over
    the last tenth of the cap, i.e. after 5 iterations; raise `max_iters` for more
    patience where iterations are cheap relative to sequential steps (accelerators,
    long horizons).

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

    @property
    def default_max_iters(self):
        return 50

    def linearise(self, step, prev, xs):
        return dense_linearise(step, prev, xs)
