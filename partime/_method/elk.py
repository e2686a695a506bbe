from typing import Literal

import equinox as eqx

from .._jacobian import AbstractJacobian, Dense
from .base import AbstractDampedMethod
from .quasi_newton import _AbstractDiagonalMethod


class ELK(AbstractDampedMethod):
    """ELK: Newton over the whole sequence, damped as Levenberg–Marquardt
    ("Evaluating Levenberg–Marquardt via Kalman").

    Each iteration minimises the Gauss–Newton model of the merit `½ Σ_t ‖r_t‖²` plus
    `½ λ Σ_t ‖Δ_t‖²`: the smoothed mean of a linear-Gaussian state-space model with
    dynamics `Δ_t = J_t Δ_{t-1} - r_t + noise` (full Jacobians `J_t`) and
    pseudo-observations `Δ_t ≈ 0` of variance `1/λ`. Its normal equations
    `(LᵀL + λI) Δ = -Lᵀ r` are block tridiagonal; they are solved by block cyclic
    reduction (`O(log T)` levels, `T` small `d × d` LUs in all), which gives the
    same smoothed mean as a parallel Kalman filter and Rauch–Tung–Striebel smoother
    in half its memory. The gradient solves the same transposed system as
    [`partime.Newton`][]'s, with the same dense reverse scan. A step is accepted
    only if the merit decreases; `λ` then shrinks (by up to 3×), else it grows (2×,
    4×, ...) and the step is retried — Nielsen's trust-region update from the ratio
    of achieved to predicted decrease.

    Compared with [`partime.Newton`][]: the merit never increases and values never
    blow up, where undamped Newton from a poor guess can overflow (a relaxation
    oscillator, an RNN with unstable Jacobians). The price: each iteration costs a
    few times a Newton iteration, and damped steps no longer fix at least one step
    per iteration, so from a constant guess over a long horizon the merit can stall
    at a non-zero local minimum — the exact sequential fallback then finishes the
    job. On ODE step maps, undamped Newton with its trust region in time (the
    default safeguard) usually converges in fewer iterations; see the convergence
    study in the docs.

    **Arguments:** `rtol`, `atol`, `max_iters` (default 50), `fallback`; see
    [`partime.AbstractMethod`][]; and

    - `damping`: the initial `λ` (default `1e-3`, relative to the unit weight of
        each step's residual).

    ??? cite "References"

        ```bibtex
        @inproceedings{gonzalez2024towards,
            title={Towards Scalable and Stable Parallelization of Nonlinear RNNs},
            author={Gonzalez, Xavier and Warrington, Andrew and Smith, Jimmy T.H. and
                    Linderman, Scott W.},
            booktitle={Advances in Neural Information Processing Systems},
            year={2024}
        }
        @article{sarkka2021temporal,
            title={Temporal Parallelization of Bayesian Smoothers},
            author={Särkkä, Simo and García-Fernández, Ángel F.},
            journal={IEEE Transactions on Automatic Control},
            volume={66},
            number={1},
            pages={299--306},
            year={2021}
        }
        ```
    """

    rtol: float | None = eqx.field(static=True, default=None)
    atol: float | None = eqx.field(static=True, default=None)
    max_iters: int | None = eqx.field(static=True, default=None)
    fallback: bool = eqx.field(static=True, default=True)
    damping: float = eqx.field(static=True, default=1e-3)

    @property
    def default_max_iters(self):
        return 50

    def linearise(self, step, prev, xs):
        return Dense().linearise(step, prev, xs)


class QuasiELK(_AbstractDiagonalMethod, AbstractDampedMethod):
    """Quasi-ELK: [`partime.ELK`][] with diagonal Jacobians `diag(∂f_t/∂s_{t-1})`.

    Every matrix of the Kalman model is then diagonal: the step is `d` independent
    scalar Kalman filters and smoothers (two associative scans), `O(T d)` memory and
    work per iteration, no linear solves. Damped like [`partime.ELK`][]
    (Levenberg–Marquardt with an adaptive `λ`; the predicted decrease is that of the
    diagonal model, so the trust region also guards against the model being wrong).

    By default the diagonal is computed at the first iterate and recomputed only
    after an accepted update that did not halve the merit (`refresh`), as
    [`partime.QuasiNewton`][] does. A rejected update does not move the iterate and
    keeps the diagonal (`λ` grows instead). Recomputing it only where the gain
    ratio showed a poor model refreshed far less, but took 1.6× the iterations of
    `refresh=True` on a small RNN; this rule stays within 1.2× on the convergence
    study's problems (see "Choosing a method").

    **Arguments:** `rtol`, `atol`, `max_iters` (default 200), `fallback`, `damping`
    (default `1e-3`); see [`partime.ELK`][]; and `jacobian`, `jacobian_batch_size`,
    `diagonal_probes`, see [`partime.QuasiNewton`][]; and

    - `refresh`: when to recompute the diagonal after the first iterate: `"auto"`
        (default) as above, `True` at every accepted iterate (as published, and
        the behaviour before this option), `False` never. The answer is exact in
        every case (the diagonal only shapes the update; the residual decides
        convergence), and the gradient does not depend on it. Under `vmap` the
        diagonal is recomputed only when some member asks for it.

    ??? cite "References"

        ```bibtex
        @inproceedings{gonzalez2024towards,
            title={Towards Scalable and Stable Parallelization of Nonlinear RNNs},
            author={Gonzalez, Xavier and Warrington, Andrew and Smith, Jimmy T.H. and
                    Linderman, Scott W.},
            booktitle={Advances in Neural Information Processing Systems},
            year={2024}
        }
        @article{sarkka2021temporal,
            title={Temporal Parallelization of Bayesian Smoothers},
            author={Särkkä, Simo and García-Fernández, Ángel F.},
            journal={IEEE Transactions on Automatic Control},
            volume={66},
            number={1},
            pages={299--306},
            year={2021}
        }
        ```
    """

    rtol: float | None = eqx.field(static=True, default=None)
    atol: float | None = eqx.field(static=True, default=None)
    max_iters: int | None = eqx.field(static=True, default=None)
    fallback: bool = eqx.field(static=True, default=True)
    damping: float = eqx.field(static=True, default=1e-3)
    jacobian: AbstractJacobian = eqx.field(static=True, default=Dense())
    jacobian_batch_size: int | None = eqx.field(static=True, default=None)
    diagonal_probes: int | None = eqx.field(static=True, default=None)
    refresh: bool | Literal["auto"] = eqx.field(static=True, default="auto")

    @property
    def default_max_iters(self):
        return 200
