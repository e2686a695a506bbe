from typing import ClassVar

import equinox as eqx
import jax

from .._lds import ZeroTransition
from .base import AbstractMethod


class Jacobi(AbstractMethod):
    """Jacobi iteration: `Ã_t = 0`, i.e. `s^{(i+1)}_t = f_t(s^{(i)}_{t-1})`.

    Every step is evaluated in parallel from the previous iterate; no scan, no
    Jacobians. It fixes at least one more step per iteration, and converges in far
    fewer than `T` iterations only when information is forgotten quickly along the
    sequence (strongly contracting maps, feed-forward stacks).

    **Arguments:** `rtol`, `atol`, `max_iters` (default 200), `fallback`; see
    [`partime.AbstractMethod`][].

    ??? cite "Reference"

        ```bibtex
        @inproceedings{song2021accelerating,
            title={Accelerating Feedforward Computation via Parallel Nonlinear Equation
                   Solving},
            author={Song, Yang and Meng, Chenlin and Liao, Renjie and Ermon, Stefano},
            booktitle={International Conference on Machine Learning},
            year={2021}
        }
        ```
    """

    rtol: float | None = eqx.field(static=True, default=None)
    atol: float | None = eqx.field(static=True, default=None)
    max_iters: int | None = eqx.field(static=True, default=None)
    fallback: bool = eqx.field(static=True, default=True)

    transitions_are_jacobians: ClassVar[bool] = False

    @property
    def default_max_iters(self):
        return 200

    def linearise(self, step, prev, xs):
        f = jax.vmap(step)(prev, xs)
        length, size = prev.shape
        return f, ZeroTransition(length, size, prev.dtype)
