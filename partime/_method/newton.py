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
    moderate `d`.

    **Arguments:** `rtol`, `atol`, `max_iters` (default 50), `fallback`; see
    [`partime.AbstractMethod`][].

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
