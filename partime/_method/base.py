"""The abstract base of the fixed-point methods."""

import abc
from collections.abc import Callable
from typing import Any, ClassVar, TYPE_CHECKING

import equinox as eqx
import jax.numpy as jnp
from equinox import AbstractVar
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._lds import AbstractTransition


if TYPE_CHECKING:
    from .._layout import AbstractLayout


# Safeguard constants. They are fixed rather than options: the convergence study
# (`benchmarks/convergence.py`) chose them. Trust region in time (undamped
# methods): shrink 4x past this growth of the merit over the trusted steps, double
# below this fall, reject past this growth.
_SHRINK = 1e4
_GROW = 0.5
_DIVERGED = 1e8
# Levenberg–Marquardt (damped methods): accept when the achieved decrease of the
# merit is at least this fraction of the predicted one.
_ACCEPT = 1e-4


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

    A method also owns its *policy*: how an update is proposed from the linearisation
    (`propose`), over how many steps past the converged prefix it is trusted (`cut`),
    and whether it is accepted (`judge`). The undamped policy here is a trust region
    in time; [`partime.AbstractDampedMethod`][] replaces it by Levenberg–Marquardt
    damping. The one driver loop calls these and knows neither.

    **Safeguards** (every method; see [`partime.fixed_point_solve`][]): non-finite
    values in an update are cut off and replaced by a constant continuation of the
    last finite state; undamped methods trust each update only over an adaptive
    horizon past the converged prefix (a trust region in time: it shrinks when an
    update makes the residuals there explode, and the update is retried); damped
    methods adapt their Levenberg–Marquardt damping from the achieved versus
    predicted reduction of the merit `½ Σ_t ‖r_t‖²`. With `fallback=True` the
    iteration also stops early when it is hopeless — when, at the rate at which the
    converged prefix, the merit and the trusted frontier have progressed over the
    last few accepted iterations, it would not finish within the cap — and the
    fallback takes over.
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

    def relinearise(
        self,
        step: Step,
        prev: Float[Array, "T d"],
        xs: PyTree[Any],
        transition: AbstractTransition,
        policy: PyTree,
        first: Bool[Array, ""] | bool = False,
    ) -> AbstractTransition:
        """The transitions at an accepted iterate (whose steps the loop has already
        evaluated), given those of the last linearisation (of the same steps) and
        the policy's state after `judge`. A method may keep them where recomputing
        them costs more than it saves: they only precondition the update; the
        residual decides convergence. At the `first` iterate (the guess) there are
        none to keep. By default: afresh."""
        del transition, policy, first
        return self.linearise(step, prev, xs)[1]

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

    # An undamped update rejected over a horizon of one step past the prefix (where
    # it is exact: the recurrence itself is not finite there) means the iteration
    # is hopeless; damped methods reject routinely while their trust region adapts.
    rejections_are_hopeless: ClassVar[bool] = True

    # Whether the transitions are the steps' Jacobians (or close to them), so that
    # the growth of their products estimates the largest Lyapunov exponent along
    # the iterate (`Stats.lyapunov`; NaN for methods whose transitions are not),
    # which the hopeless-case test consults too.
    transitions_are_jacobians: ClassVar[bool] = True

    def init_policy(self, length: int, dtype: Any) -> PyTree:
        """The policy's state before the first iteration: the trust horizon, `T`."""
        del dtype
        return jnp.asarray(length, jnp.int32)

    def propose(
        self,
        layout: "AbstractLayout",
        transition: AbstractTransition,
        residual: Float[Array, "T d"],
        policy: PyTree,
    ) -> Float[Array, "T d"]:
        """The update `Δ` (delta form, `L Δ = -r`: no cancellation between iterates)."""
        del policy
        return layout.solve(transition, -residual)

    def cut(
        self, layout: "AbstractLayout", prefix: Int[Array, ""], policy: PyTree
    ) -> Int[Array, ""]:
        """How far the update is trusted: steps from this index on are replaced by a
        constant continuation. An undamped update is exact on the step after the
        converged prefix and degrades with distance from it, so: `horizon` steps."""
        del layout
        return prefix + policy

    def judge(
        self,
        layout: "AbstractLayout",
        policy: PyTree,
        *,
        cut: Int[Array, ""],
        prefix: Int[Array, ""],
        transition: AbstractTransition,
        delta: Float[Array, "T d"],
        old_residual: Float[Array, "T d"],
        old_merit: Float[Array, ""],
        residual: Float[Array, "T d"],
        merit: Float[Array, ""],
    ) -> tuple[Bool[Array, ""], PyTree]:
        """Whether to accept the candidate, and the policy's next state.

        The trust region in time: the horizon shrinks to a quarter of what was used
        when the merit over the trusted steps grew more than `_SHRINK`-fold, and
        doubles when it fell at least `1 / _GROW`-fold. An update that makes it grow
        more than `_DIVERGED`-fold (or non-finite) is rejected and retried over the
        shorter horizon.
        """
        del policy, transition, delta, old_merit, merit
        window = layout.index < cut
        before = layout.merit(old_residual, window)
        after = layout.merit(residual, window)
        accept = ~(after > _DIVERGED * before) & jnp.isfinite(after)
        used = jnp.maximum(cut - prefix, 1)
        horizon = jnp.where(
            ~accept | (after > _SHRINK * before),
            jnp.maximum(used // 4, 1),
            jnp.where(
                after <= _GROW * before, jnp.minimum(2 * used, layout.length), used
            ),
        )
        return accept, horizon.astype(jnp.int32)

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
    model, computed in `O(log T)` depth — and is accepted only if the merit
    decreases; `λ` adapts from the ratio of the achieved to the predicted decrease.

    Damped methods no longer fix at least one step per iteration (their converged
    prefix can stall), in exchange for never increasing the merit.

    - `damping`: the initial `λ > 0`. Larger is more cautious (shorter, more
        gradient-like steps); `λ → 0` is the undamped method.
    """

    damping: AbstractVar[float]

    rejections_are_hopeless: ClassVar[bool] = False

    def init_policy(self, length, dtype):
        """`(λ, growth factor)`."""
        return jnp.asarray(self.damping, dtype), jnp.asarray(2.0, dtype)

    def propose(self, layout, transition, residual, policy):
        damping, _ = policy
        return layout.damped_solve(transition, residual, damping)

    def cut(self, layout, prefix, policy):
        del prefix, policy
        return jnp.asarray(layout.length, jnp.int32)

    def judge(
        self,
        layout,
        policy,
        *,
        cut,
        prefix,
        transition,
        delta,
        old_residual,
        old_merit,
        residual,
        merit,
    ):
        """Nielsen's update of `λ` from the gain ratio: achieved over predicted
        decrease of the merit, the prediction being the Gauss–Newton model
        `½‖r + L Δ‖²` (positive for a Levenberg–Marquardt step). Accepted when the
        ratio is at least `_ACCEPT` and the whole update is finite."""
        del prefix
        damping, growth = policy
        eps = float(jnp.finfo(residual.dtype).eps)
        model = old_residual + layout.apply_operator(transition, delta)
        predicted = old_merit - layout.merit(model)
        ratio = (old_merit - merit) / predicted
        accept = (cut == layout.length) & jnp.isfinite(merit) & (ratio > _ACCEPT)
        shrink = jnp.maximum(1 / 3, 1 - (2 * ratio - 1) ** 3)
        damping = jnp.where(accept, damping * shrink, damping * growth)
        damping = jnp.clip(damping, eps, 1 / eps)
        growth = jnp.where(accept, jnp.asarray(2.0, growth.dtype), 2 * growth)
        return accept, (damping, growth)

    def __check_init__(self):
        if not self.damping > 0:
            raise ValueError(
                f"`damping` must be > 0, got {self.damping}. (For undamped steps use "
                "the undamped method, e.g. `partime.Newton()`.)"
            )
