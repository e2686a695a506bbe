from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Real

from ._solver import ParallelSolver


class WindowState(eqx.Module):
    """The state of a [`partime.WindowController`][]: the wrapped controller's own
    state, the inner step it proposes for the next window, and the end of the solve."""

    controller_state: PyTree
    inner_dt: Real[Array, ""]
    t_end: Real[Array, ""]
    num_steps: int = eqx.field(static=True)


def _num_steps(func: Callable) -> int:
    """The inner steps per window of the `ParallelSolver` whose `func` diffrax passes
    to the controller's `init`."""
    solver = getattr(func, "__self__", None)
    if not isinstance(solver, ParallelSolver):
        raise TypeError(
            "`partime.WindowController` chooses the windows of a "
            "`partime.ParallelSolver`; use it as the `stepsize_controller` of a "
            "`diffeqsolve` whose solver is one. For a sequential solver pass the "
            "wrapped controller itself."
        )
    return solver.num_steps


def _window_end(start, inner_dt, t_end, num_steps: int):
    r"""The end of the window starting at `start`, for inner steps of at most
    `inner_dt` (up to rounding), such that the remaining windows are of equal length:
    with $R$ = `t_end - start`, the window is $R / w$ with $w = \lceil R / (K\,
    \mathrm{d}t) \rceil$, and exactly `t_end` when $w = 1$.

    A window that falls short of `t_end` by rounding alone (100 ulps of the times, as
    diffrax's own clipping) is one window, not two: the rounding of `t0 + (t1 - t0)`
    never costs a second window."""
    dtype = jnp.result_type(start, t_end)
    eps = jnp.finfo(dtype).eps
    reach = num_steps * inner_dt
    # An infinite `t1` (with an event to stop the solve): full windows. Computed as a
    # window ending at `start + reach`, so that no `inf - inf` reaches the gradient
    # (with respect to `t0`) through the branch not taken.
    t_end = jnp.where(jnp.isfinite(t_end), t_end, start + reach)
    remaining = t_end - start
    slack = 100 * eps * (jnp.abs(start) + jnp.abs(t_end))
    windows = jnp.maximum(jnp.ceil((remaining - slack) / reach), 1)
    return jnp.where(windows <= 1, t_end, start + remaining / windows).astype(dtype)


class WindowController(diffrax.AbstractStepSizeController[WindowState, Any]):
    r"""Makes `dt0` and a step size controller mean the *inner* step of a
    [`partime.ParallelSolver`][], and chooses the windows from it.

    Without it, each diffrax step of a `ParallelSolver` is a window of `num_steps`
    inner steps, so `dt0` and a controller's `dtmax` bound windows. Wrapped in a
    `WindowController`, the user's controller keeps the meaning it has for a
    sequential solver, and the solve is split into as few windows as that allows:

    ```python
    solver = partime.ParallelSolver(diffrax.Tsit5(), num_steps=1000)
    controller = partime.WindowController(diffrax.PIDController(rtol=1e-6, atol=1e-6))
    sol = diffrax.diffeqsolve(
        term, solver, t0, t1, dt0, y0, stepsize_controller=controller
    )
    ```

    With inner step $\mathrm{d}t$ and $K$ = `num_steps`, a window starting at $s$
    with $R = t_1 - s$ left to go is $R / w$ long, $w = \lceil R / (K\,\mathrm{d}t)
    \rceil$: the remaining horizon in as few windows as inner steps of at most
    $\mathrm{d}t$ allow, of equal length, the last one ending at $t_1$ exactly (also
    when `t0 + (t1 - t0)` rounds below `t1`).

    - With `diffrax.ConstantStepSize()` (the default), $\mathrm{d}t$ = `dt0`: the solve
        takes $\lceil (t_1 - t_0) / (K\,\mathrm{d}t_0) \rceil$ windows of $K$ inner
        steps each, all of length $(t_1 - t_0) / (wK) \le$ `dt0`. `dt0 = (t1 - t0) /
        num_steps` is exactly one window, also under `jit` with traced `t0`, `t1`.
    - With an adaptive controller such as `diffrax.PIDController`, $\mathrm{d}t$ is
        the inner step it proposes: its `dt0` (or its own choice of the first step
        when `dt0=None`), `dtmin` and `dtmax` bound the inner steps, and its
        tolerances the inner steps' local errors. It judges each window by its
        inner steps' *mean* error estimate (the window's summed estimate divided by
        $K$) on the window's inner step: a window is accepted when its inner steps'
        local errors average within tolerance — the same total local error as a
        sequential solve at that tolerance with as many steps. A rejected window is
        retried with the smaller inner step it proposes.

    `max_steps` still counts windows, and `diffrax.SaveAt(steps=True)` saves window
    ends. The result is the inner solver's solution on the inner grid actually taken
    (every window split into `num_steps` equal steps), to the method's tolerance.
    """

    controller: diffrax.AbstractStepSizeController

    def __new__(cls, controller: diffrax.AbstractStepSizeController | None = None):
        # diffrax checks `isinstance(..., AbstractAdaptiveStepSizeController)` (for
        # SDEs with `UnsafeBrownianPath`, for the tolerances of steady-state events),
        # so the wrapper is adaptive exactly when the wrapped controller is.
        adaptive = isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
        return super().__new__(_AdaptiveWindowController if adaptive else cls)

    def __init__(self, controller: diffrax.AbstractStepSizeController | None = None):
        self.controller = (
            diffrax.ConstantStepSize() if controller is None else controller
        )

    def __check_init__(self):
        controller = self.controller
        if isinstance(controller, WindowController):
            raise ValueError("`partime.WindowController` cannot wrap itself.")
        if isinstance(controller, diffrax.ClipStepSizeController):
            raise ValueError(
                "`partime.WindowController` does not support "
                "`diffrax.ClipStepSizeController` (`step_ts`, `jump_ts`): it would "
                "clip the windows' first inner steps only. Split the solve at those "
                "times instead, one `diffeqsolve` per piece."
            )
        if not isinstance(
            controller,
            (diffrax.ConstantStepSize, diffrax.AbstractAdaptiveStepSizeController),
        ):
            raise TypeError(
                "`partime.WindowController(controller=...)` must be "
                "`diffrax.ConstantStepSize()` or an adaptive step size controller "
                f"such as `diffrax.PIDController(...)`; got {controller!r}. (With "
                "`diffrax.StepTo(ts=...)`, `ts` sets the windows of a plain "
                "`ParallelSolver`.)"
            )

    def wrap(self, direction):
        return WindowController(self.controller.wrap(direction))

    def init(
        self, terms, t0, t1, y0, dt0, args, func, error_order
    ) -> tuple[Any, WindowState]:
        num_steps = _num_steps(func)
        dtype = jnp.result_type(t0, t1)
        if isinstance(self.controller, diffrax.ConstantStepSize):
            if dt0 is None:
                raise ValueError(
                    "`partime.WindowController(diffrax.ConstantStepSize())` needs "
                    "`dt0`, the inner step; `dt0=(t1 - t0) / num_steps` makes the "
                    "whole horizon one window."
                )
            controller_state = None
            # `dt0` itself, not `(t0 + dt0) - t0`, which loses the bits of `t0`.
            inner_dt = jnp.asarray(dt0, dtype=dtype)
        else:
            inner_t1, controller_state = self.controller.init(
                terms, t0, t1, y0, dt0, args, func, error_order
            )
            inner_dt = (inner_t1 - t0).astype(dtype)
        t_end = jnp.asarray(t1, dtype=dtype)
        state = WindowState(controller_state, inner_dt, t_end, num_steps)
        return _window_end(t0, inner_dt, t_end, num_steps), state

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ) -> tuple[Any, Any, Any, Any, WindowState, diffrax.RESULTS]:
        state = controller_state
        num_steps = state.num_steps
        if isinstance(self.controller, diffrax.ConstantStepSize):
            keep, start, inner_dt = True, t1, state.inner_dt
            made_jump, result = False, diffrax.RESULTS.successful
            inner_state = None
        else:
            # The wrapped controller sees the window as one inner step: the first,
            # with the inner steps' mean error (`ParallelSolver` sums their
            # magnitudes); it accepts or rejects and proposes the next inner step.
            inner_t1 = t0 + (t1 - t0) / num_steps
            mean_error = jtu.tree_map(lambda e: e / num_steps, y_error)
            keep, next_t0, next_t1, made_jump, inner_state, result = (
                self.controller.adapt_step_size(
                    t0,
                    inner_t1,
                    y0,
                    y1_candidate,
                    args,
                    mean_error,
                    error_order,
                    state.controller_state,
                )
            )
            start = jnp.where(keep, t1, t0)
            inner_dt = (next_t1 - next_t0).astype(state.inner_dt.dtype)
        end = _window_end(start, inner_dt, state.t_end, num_steps)
        new_state = WindowState(inner_state, inner_dt, state.t_end, num_steps)
        return keep, start, end, made_jump, new_state, result


class _AdaptiveWindowController(
    WindowController, diffrax.AbstractAdaptiveStepSizeController
):
    @property
    def rtol(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.controller.rtol

    @property
    def atol(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.controller.atol

    @property
    def norm(self):  # pyright: ignore[reportIncompatibleVariableOverride]
        return self.controller.norm


WindowController.__init__.__doc__ = """**Arguments:**

- `controller`: the step size controller of the inner steps:
    `diffrax.ConstantStepSize()` (the default: the inner step is at most `dt0`) or
    an adaptive one such as `diffrax.PIDController(rtol=..., atol=...)`, whose
    `dt0` (or `dt0=None`), `dtmin`, `dtmax` and tolerances then apply to the inner
    steps. `diffrax.StepTo` (whose `ts` set the windows of a plain
    `ParallelSolver`) and `diffrax.ClipStepSizeController` are refused.
"""
