from typing import ClassVar

import equinox as eqx
import jax

from .._lds import IdentityTransition
from .base import AbstractMethod


class Picard(AbstractMethod):
    """Picard iteration: `Ã_t = I`, so each iteration is a cumulative sum.

    No Jacobians at all: the cheapest iteration that still propagates information along
    the whole sequence. Converges fast where `∂f_t/∂s_{t-1} ≈ I` — small ODE steps
    `s + h·g(s)`, Langevin and diffusion samplers — and slowly elsewhere.

    **Arguments:** `rtol`, `atol`, `max_iters` (default 200), `fallback`; see
    [`partime.AbstractMethod`][].

    ??? cite "Reference"

        ```bibtex
        @inproceedings{shih2023parallel,
            title={Parallel Sampling of Diffusion Models},
            author={Shih, Andy and Belkhale, Suneel and Ermon, Stefano and Sadigh, Dorsa
                    and Anari, Nima},
            booktitle={Advances in Neural Information Processing Systems},
            year={2023}
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
        return f, IdentityTransition(length, size, prev.dtype)
