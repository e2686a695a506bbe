from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from .._lds import DiagonalTransition
from .base import AbstractMethod


def jacobian_diagonal(step, prev, xs, batch_size):
    """`diag(∂f_t/∂s_{t-1})` for every `t` without forming the full Jacobians.

    One forward-mode product per basis vector, `batch_size` of them at a time, keeping
    only the matching component: memory `O(T d · batch_size)` rather than `O(T d²)`.
    """
    length, size = prev.shape

    def component(i):
        basis = jnp.zeros(size, prev.dtype).at[i].set(1)

        def one_step(s, x):
            _, tangent = jax.jvp(lambda s_: step(s_, x), (s,), (basis,))
            return tangent[i]

        return jax.vmap(one_step)(prev, xs)

    diagonal = jax.lax.map(component, jnp.arange(size), batch_size=batch_size)
    return diagonal.T


def diagonal_linearise(step, prev, xs, jacobian_batch_size):
    """`f_t(s_{t-1})` and `diag(∂f_t/∂s_{t-1})`."""
    length, size = prev.shape
    if jacobian_batch_size is None:
        batch_size = max(1, min(size, 2**22 // max(1, length * size)))
    else:
        batch_size = jacobian_batch_size
    f = jax.vmap(step)(prev, xs)
    return f, DiagonalTransition(jacobian_diagonal(step, prev, xs, batch_size))


class QuasiNewton(AbstractMethod):
    """Quasi-Newton over the whole sequence (quasi-DEER): `Ã_t = diag(∂f_t/∂s_{t-1})`.

    Memory and scan work are `O(T d)` instead of Newton's `O(T d²)` and `O(T d³)`, at
    the price of more iterations (linear rather than quadratic convergence). The
    diagonal is computed by forward-mode products, `jacobian_batch_size` basis vectors
    at a time.

    **Arguments:** `rtol`, `atol`, `max_iters` (default 200), `fallback`; see
    [`partime.AbstractMethod`][]; and

    - `jacobian_batch_size`: how many Jacobian-vector products to evaluate at once when
        computing the diagonal. `None` picks the largest that keeps the intermediate
        under about `2^22` numbers (`batch_size · T · d`).

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

    transitions_are_jacobians: ClassVar[bool] = False
    jacobian_batch_size: int | None = eqx.field(static=True, default=None)

    @property
    def default_max_iters(self):
        return 200

    def linearise(self, step, prev, xs):
        return diagonal_linearise(step, prev, xs, self.jacobian_batch_size)
