"""The abstract base of the fixed-point methods."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Float, PyTree

from .._lds import AbstractTransition


Step = Callable[[Float[Array, " d"], PyTree[Any]], Float[Array, " d"]]


def default_tolerance(dtype: Any) -> float:
    """Default `rtol` = `atol` for a floating dtype: about 100 ulps at unit scale,
    1e-10 in float64."""
    eps = float(jnp.finfo(dtype).eps)
    return max(1e-10, 100 * eps)


class AbstractMethod(eqx.Module):
    """A fixed-point method for the nonlinear system `s_t = f_t(s_{t-1})`, `t = 1..T`.

    Each iteration linearises every step around the current iterate, with a transition
    `Ã_t ≈ ∂f_t/∂s_{t-1}`, and solves the linear dynamical system

    $$s^{(i+1)}_t = f_t(s^{(i)}_{t-1}) + Ã_t (s^{(i+1)}_{t-1} - s^{(i)}_{t-1})$$

    for all `t` at once with an associative scan. Methods differ only in `Ã_t`.

    Every method has:

    - `rtol`, `atol`: the iteration has converged when, at every step and in every
        component, both the last update and the residual `r_t = s_t - f_t(s_{t-1})`
        of the returned iterate are at most `atol + rtol·|s_t|` (a damped method can
        take small steps far from the solution, hence both; an exact guess takes
        one iteration). `None` picks a default from the dtype (1e-10 in float64,
        ~1e-5 in float32).
    - `max_iters`: the iteration cap (`None`: the method's default). It is also capped
        at `T`: the undamped methods fix at least one more step per iteration, so they
        are exact after `T` iterations.
    - `fallback`: if the iteration does not converge, compute the steps after the
        converged prefix sequentially, so that the answer is still exact (`True`,
        default); or report failure (`False`).

    **Safeguards** (every method; see [`partime.fixed_point_solve`][]): non-finite
    values in an update are cut off and replaced by a constant continuation of the
    last finite state; undamped methods trust each update only over an adaptive
    horizon past the converged prefix (a trust region in time: it shrinks when an
    update makes the residuals there explode, and the update is retried); damped
    methods adapt their Levenberg–Marquardt damping from the achieved versus
    predicted reduction of the merit `½ Σ_t ‖r_t‖²`. With `fallback=True` the
    iteration also stops early when it is hopeless — when, at the rate at which the
    converged prefix and the merit have progressed over the last few iterations, it
    would not finish within the cap — and the fallback takes over.
    """

    rtol: AbstractVar[float | None]
    atol: AbstractVar[float | None]
    max_iters: AbstractVar[int | None]
    fallback: AbstractVar[bool]

    @property
    @abc.abstractmethod
    def default_max_iters(self) -> int:
        """The iteration cap when `max_iters=None`."""

    @abc.abstractmethod
    def linearise(
        self, step: Step, prev: Float[Array, "T d"], xs: PyTree[Any]
    ) -> tuple[Float[Array, "T d"], AbstractTransition]:
        """Evaluates `f_t(s_{t-1})` for all `t`, and the transitions `Ã_t` there.

        **Arguments:**

        - `step`: one step, `(s_{t-1}, x_t) -> s_t`, on flat states.
        - `prev`: `s_0, ..., s_{T-1}`.
        - `xs`: the per-step inputs, leading axis `T`.

        **Returns:** `(f, transition)`.
        """

    def tolerances(self, dtype: Any) -> tuple[float, float]:
        """`(rtol, atol)`, with defaults filled in for `dtype`."""
        default = default_tolerance(dtype)
        rtol = default if self.rtol is None else self.rtol
        atol = default if self.atol is None else self.atol
        return rtol, atol

    def iteration_cap(self, length: int) -> int:
        """The number of iterations after which the method stops."""
        cap = self.default_max_iters if self.max_iters is None else self.max_iters
        return min(cap, length)

    def __check_init__(self):
        if self.max_iters is not None and self.max_iters < 0:
            raise ValueError(f"`max_iters` must be >= 0, got {self.max_iters}.")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")


class AbstractDampedMethod(AbstractMethod):
    """A method whose iterations are damped Gauss–Newton (Levenberg–Marquardt) steps
    on the merit `½ Σ_t ‖r_t‖²`: each update solves
    `(LᵀL + λI) Δ = -Lᵀ r` — the smoothed mean of a linear-Gaussian state-space
    model, by a parallel Kalman filter and smoother — and is accepted only if the merit
    decreases; `λ` adapts from the ratio of the achieved to the predicted decrease.

    Damped methods no longer fix at least one step per iteration (their converged
    prefix can stall), in exchange for never increasing the merit.

    - `damping`: the initial `λ > 0`. Larger is more cautious (shorter, more
        gradient-like steps); `λ → 0` is the undamped method.
    """

    damping: AbstractVar[float]

    def __check_init__(self):
        if not self.damping > 0:
            raise ValueError(
                f"`damping` must be > 0, got {self.damping}. (For undamped steps use "
                "the undamped method, e.g. `partime.Newton()`.)"
            )
