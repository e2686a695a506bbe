"""The fixed-point solve: its one entry point and its one implicit derivative rule.

Solves `r_t = s_t - f(s_{t-1}, x_t) = 0`, `t = 1..T`, for `s_1..s_T` given `s_0`, by
the iterations of an [`partime.AbstractMethod`][] (the loop in `partime._loop`), on a
layout of time (`partime._layout`): the whole sequence, windows moving through it, or
a time axis split over a mesh. Derivatives never unroll the iterations: at the
solution, the implicit function theorem gives `L ṡ = ∂f/∂(s_0, x, θ) · (ṡ_0, ẋ, θ̇)`
with the Newton operator `L` (block lower-bidiagonal, `A_t = ∂f/∂s_{t-1}`), solved by
the layout's parallel scan; on the whole sequence, by the method's own iteration
(`partime._matrix_free`: matrix-free for the methods without dense Jacobians). Reverse
mode is JAX's transpose of that rule.
"""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from ._fallback import SequentialForm
from ._layout import AbstractLayout, shift, WholeSequence
from ._method.base import AbstractMethod
from ._sharded_fixed_point import previous_states, Sharded
from ._stats import count, raise_if_failed, RESULTS, Stats
from ._windowed import AutomaticWindow, Blocks, SlidingWindow


def index(xs: PyTree, t: Int[Array, ""] | int) -> PyTree:
    return jtu.tree_map(lambda a: a[t], xs)


def check_inputs(
    step: Callable, init: Any, xs: PyTree, length: int | None, guess: Any
) -> tuple[Float[Array, " d"], int, Float[Array, "T d"] | None]:
    """Validates the arguments that every fixed-point solve takes, at trace time,
    with messages that say what is wrong. Returns `init` as an array, the sequence
    length `T`, and `guess` cast to `init`'s dtype (`None` if not given)."""
    init = jnp.asarray(init)
    if init.ndim != 1 or not jnp.issubdtype(init.dtype, jnp.inexact):
        raise ValueError(
            "`init` must be a 1-D floating-point array, got "
            f"shape {init.shape} and dtype {init.dtype}."
        )
    if any(jnp.ndim(leaf) == 0 for leaf in jtu.tree_leaves(xs)):
        raise ValueError("Every leaf of `xs` needs a leading (time) axis.")
    lengths = {leaf.shape[0] for leaf in jtu.tree_leaves(xs)}
    if length is not None:
        lengths.add(length)
    if len(lengths) != 1:
        raise ValueError(
            "Cannot determine the sequence length: the leaves of `xs` have leading "
            f"axes {sorted(lengths)}"
            + ("" if lengths else " (and `length` was not given)")
            + "."
        )
    (length,) = lengths
    if length < 1:
        raise ValueError("The sequence must have at least one step.")
    if guess is not None:
        guess = jnp.asarray(guess)
        if guess.shape != (length, init.shape[0]):
            raise ValueError(
                f"`guess` must have shape {(length, init.shape[0])}, got {guess.shape}."
            )
        guess = guess.astype(init.dtype)
    out_struct = jax.eval_shape(step, init, index(xs, 0))
    if not (
        isinstance(out_struct, jax.ShapeDtypeStruct) and out_struct.shape == init.shape
    ):
        raise ValueError(
            f"`step` must map a state of shape {init.shape} to one of the same shape, "
            f"got {out_struct}."
        )
    return init, length, guess


_SCHEDULES = ("sliding", "blocks")


def make_layout(
    length: int,
    *,
    window: int | Literal["auto"] | None = None,
    schedule: str = "sliding",
    tolerance_scale: ArrayLike | None = None,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
) -> AbstractLayout:
    """The one place that chooses where time lives, from the arguments that
    `fixed_point_solve`, `partime.scan` and `partime.ParallelSolver` take."""
    if schedule not in _SCHEDULES:
        raise ValueError(
            f"`schedule` must be one of {_SCHEDULES}, got {schedule!r}: 'sliding' for "
            "the ParaDiGMS sliding window, 'blocks' for Gauss-Seidel across blocks."
        )
    auto = isinstance(window, str) and window == "auto"
    if (
        window is not None
        and not auto
        and (isinstance(window, bool) or not isinstance(window, int | np.integer))
    ):
        raise TypeError(f"`window` must be an integer, 'auto' or None, got {window!r}.")
    if window is not None and not auto and window < 1:
        raise ValueError(f"`window` must be at least 1, got {window}.")
    if mesh is not None:
        if window is not None or tolerance_scale is not None:
            raise ValueError(
                "A mesh does not combine with `window=` or `tolerance_scale=` yet: "
                "shard the whole horizon, or solve in windows on one device."
            )
        return Sharded(length, mesh, axis_name)
    if auto:
        return AutomaticWindow(length)
    if tolerance_scale is not None and schedule == "blocks":
        raise ValueError(
            "`tolerance_scale` works with `schedule='sliding'` only: each block is "
            "solved to the method's tolerances. Use the sliding window (it wastes "
            "fewer iterations too)."
        )
    if window is None and tolerance_scale is None:
        return WholeSequence(length)
    window = length if window is None else min(int(window), length)
    if schedule == "blocks":
        return Blocks(length, window)
    return SlidingWindow(length, window)


def previous(
    init: Float[Array, " d"],
    states: Float[Array, "T d"],
    *,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
) -> Float[Array, "T d"]:
    """`s_0, ..., s_{T-1}`, sharded like `states` when they live on a mesh."""
    if mesh is None:
        return shift(init, states)
    return previous_states(init, states, mesh=mesh, axis_name=axis_name)


@eqx.filter_custom_jvp
def _solve(step, init, xs, guess, scale, give_up, *, method, layout):
    guess = jax.lax.stop_gradient(guess)
    states, stats = layout.forward(
        step, init, xs, guess, jax.lax.stop_gradient(scale), method, give_up
    )
    # Custom-JVP outputs must be arrays: the statistics leave without their static part.
    return states, eqx.filter(stats, eqx.is_array)


@_solve.def_jvp
def _solve_jvp(primals, tangents, *, method, layout):
    """The one implicit derivative rule: every layout differs only in its linear
    solve (a whole scan, a scan over checkpointed blocks, a scan across devices)."""
    step, init, xs, guess, scale, give_up = primals
    t_step, t_init, t_xs, *_ = tangents
    states, stats = _solve(
        step, init, xs, guess, scale, give_up, method=method, layout=layout
    )
    t_states = layout.tangent_solve(
        step, init, xs, states, (t_step, t_init, t_xs), method
    )
    t_stats = jtu.tree_map(lambda _: None, stats)
    return (states, stats), (t_states, t_stats)


def fixed_point_solve(
    step: Callable[[Float[Array, " d"], PyTree[Any]], Float[Array, " d"]],
    init: Float[Array, " d"],
    xs: PyTree[Any],
    method: AbstractMethod,
    *,
    length: int | None = None,
    guess: Float[Array, "T d"] | None = None,
    window: int | Literal["auto"] | None = None,
    schedule: Literal["sliding", "blocks"] = "sliding",
    tolerance_scale: ArrayLike | None = None,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
    throw: bool = True,
    give_up: ArrayLike | None = None,
) -> tuple[Float[Array, "T d"], Stats]:
    """Evaluates the recurrence `s_t = step(s_{t-1}, x_t)`, `t = 1..T`, in parallel.

    **Arguments:**

    - `step`: one step on flat states. It may close over JAX arrays (parameters):
        they are closure-converted and receive gradients.
    - `init`: `s_0`, a 1-D floating array.
    - `xs`: per-step inputs, every leaf with leading axis `T`; may be `None` if
        `length` is given.
    - `method`: an [`partime.AbstractMethod`][].
    - `length`: `T`, needed only when `xs` has no leaves.
    - `guess`: the first iterate for `s_1..s_T`; defaults to `s_0` at every step. A
        good guess saves iterations: the previous trajectory when parameters change
        little (between training steps), or a cheap coarse sequential pass (for an
        ODE, a few long steps interpolated; `partime.ParallelSolver` does this).
    - `window`, `schedule`, `tolerance_scale`: solve at most `window` steps at a
        time, or `window="auto"` to narrow the window only where the whole
        sequence is hopeless (see *Windows* below).
    - `mesh`, `axis_name`: split the time axis over the devices of mesh axis
        `axis_name` (see *Meshes* below).
    - `throw`: raise an error if the solve failed (possible only with
        `fallback=False`, or a non-finite `init`). If `False`, check `stats.result`.
    - `give_up`: a boolean scalar (may be traced): if true and the method has a
        fallback, the iteration is not attempted — no evaluation, no Jacobian, no
        iteration — and the exact sequential fallback computes every step. For a
        caller that already knows the iteration is hopeless, e.g. from an estimate
        of the Lyapunov exponent (`partime.ParallelSolver` passes its coarse
        pass's).

    **Returns:** `(states, stats)`: `s_1..s_T` with shape `(T, d)`, and a
    [`partime.Stats`][].

    Differentiable (forward and reverse mode) with respect to `init`, the floating
    leaves of `xs`, and arrays closed over by `step`, by implicit differentiation.
    On one device (whole sequence or windows) the derivative's linear system is
    solved like the forward problem: with dense Jacobians by Newton and ELK,
    matrix-free (`O(T d)` memory: Jacobian-vector or vector-Jacobian products of
    `step`, the method's transition as preconditioner, exact sequential pass if it
    does not converge) by the others. On a mesh, with dense Jacobians.

    **Safeguards.** Every iteration is checked, for every method:

    - *Non-finite values.* An update that overflows is cut at its first non-finite
        step and continued from the last finite state as a constant; the steps before
        it (including the next one after the converged prefix, which an undamped
        update always gets right) are kept. The iterate is never NaN.
    - *Divergence.* Undamped methods trust each update over a horizon past the
        converged prefix (initially all of `T`): it shrinks 4× when the update makes
        the merit `½ Σ ‖r_t‖²` over it grow 10⁴-fold, and doubles when the merit
        halves. An update that makes it grow 10⁸-fold (or non-finite) is rejected and
        retried over the shorter horizon. Damped methods ([`partime.ELK`][],
        [`partime.QuasiELK`][]) accept a step only if it decreases the merit, and
        adapt their damping from the achieved versus predicted decrease.
    - *Hopeless cases.* With `fallback=True`, the iteration stops when, at the rate
        at which the converged prefix, the merit and the trusted frontier (the
        prefix plus the horizon the next update is trusted over) have progressed
        over the last tenth of the cap (at least 2 iterations), it would not finish
        within the cap. Only accepted updates count: a rejected one shrinks the
        trust horizon 4× and is retried, and is hopeless only over a horizon of one
        step. A larger `max_iters` therefore also means more patience. A
        predictable problem whose first updates go badly from a poor guess (an RNN
        with unstable Jacobians at the guess) shows its progress in the trust
        horizon, which doubles every other iteration before the prefix moves, and
        converges (20–31 iterations); chaotic recurrences (positive largest
        Lyapunov exponent, e.g. the logistic map, Lorenz-63 over many Lyapunov
        times), whose horizon stays a few steps long, are stopped after 8–11
        iterations (about half of them rejected), instead of running to the cap.
        Where the rates say hopeless, two signs of a predictable problem let the
        iteration go on (methods whose transitions are Jacobians: Newton): a
        negative Lyapunov estimate (`Stats.lyapunov`) along the converged prefix
        of at least 8 steps (contracting: the iterations needed do not grow with
        `T`), or, while that estimate is not positive, a trust horizon growing
        fast enough over the last tenth of the cap that the frontier would reach
        the end within it.
        The price of the test: a problem that would converge just within the cap
        can be stopped and finished sequentially — exact, only not parallel; a
        better guess or a larger `max_iters` helps.
    - *Exact fallback.* If the iteration did not converge, the steps after the
        leading ones that are exact to rounding are recomputed sequentially (a
        `while_loop` of zero trips when it converged). Restarting after the steps
        that are merely within tolerance would let a chaotic recurrence amplify
        their errors (by `e^{λ t}`) far beyond it. Where the last trust horizon
        fell short of the end (errors were seen to grow there), rounding errors
        would be amplified too: the fallback then restarts after the steps whose
        residual is exactly zero, so that it reproduces the sequential answer.
    - *Non-finite input.* A NaN or infinite `init` skips the iteration: every step
        is computed sequentially, as `jax.lax.scan` would (the finite components of
        the state stay exact), and the result is `RESULTS.nonfinite_input`.

    `rtol` and `atol` mean the same on every layout: a step has converged when its
    residual and its last update are within `atol + rtol·|s_t|`.

    **Windows.** With `window=W`, at most `W` steps are solved at once: memory
    `O(W d²)` for Newton, `O(W d)` for the other methods (plus the `O(T d)`
    trajectory), for any `T`.

    - `schedule="blocks"`: Gauss–Seidel across fixed blocks of `W` steps, each solved
        by the loop above (every method and safeguard) from the previous block's last
        state (Song et al., 2021).
    - `schedule="sliding"` (default; ParaDiGMS, Shih et al., 2023): a window of `W`
        steps that, after every iteration, moves forward past its leading steps whose
        residual and update are within tolerance, keeping the rest of its iterate as
        the next guess. The front step is exact after one iteration, so the window
        always advances. It runs the same loop as the whole sequence (trust region in
        time, hopeless-case stop, fallback from the prefix exact to rounding); the
        cap is the method's cap for `W` steps times `ceil(T / W)`. Undamped methods
        only (a damped method is refused at trace time: use `schedule="blocks"`).
    - `tolerance_scale` (sliding only): positive factors, a scalar or shape `(T,)`,
        that scale the tolerance step by step. A scale above 1 trades accuracy for
        iterations; it is sound where each step's own noise dwarfs the error (a
        diffusion sampler with noise `σ_t`), not for a deterministic or chaotic
        recurrence whose trajectory matters.

    - `window="auto"`: the automatic window. The loop starts on the whole sequence
        (a predictable recurrence runs exactly as with `window=None`), and where its
        hopeless-case test would stop it, it narrows instead: updates are trusted
        only over `width` steps past the converged prefix, the steps beyond held at
        the first iterate, and `width` (initially `T`) shrinks 4× at every hopeless
        verdict, down to `T / 64`, and once narrowed 2–4× where the prefix moves too
        slowly for it (more than 10 iterations per window, beyond a slack of 20),
        each time with the cap of a sliding window of that width for the steps
        left; at the narrowest the fallback takes over.
        Neutral recurrences (oscillators over many periods) then converge rather
        than fall back. Every iteration still costs `T` steps (one compiled loop,
        `O(log T)` depth), and nothing here tells chaos apart: a chaotic
        recurrence is iterated in narrow windows, exact but at many times
        sequential cost — hence opt-in (`partime.ParallelSolver` uses it by
        default, behind its chaos test). Undamped methods with `fallback=True`;
        others run the whole sequence. Derivatives as for the whole sequence.

    Derivatives are windowed too: one linear solve per block of `W` steps (dense,
    `O(W d²)`, for Newton; matrix-free for the others), recomputed in reverse mode
    rather than stored.

    **Meshes.** With `mesh=`, device `p` of `P` holds steps `pT/P + 1 .. (p+1)T/P`
    (`T` must be a multiple of `P`; the mesh's axes `jax.sharding.AxisType.Auto`).
    The same loop runs inside `jax.shard_map`, its reductions over time through
    collectives; per iteration the devices exchange `O(P·(d² + d))` numbers, never
    `O(T·d)`, and the fallback runs chunk by chunk. Damped methods need a sharded
    Kalman smoother that partime does not have: they are refused at trace time.
    """
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be a partime method (e.g. `partime.Newton()`), got "
            f"{method!r}."
        )
    init, length, guess = check_inputs(step, init, xs, length, guess)
    layout = make_layout(
        length,
        window=window,
        schedule=schedule,
        tolerance_scale=tolerance_scale,
        mesh=mesh,
        axis_name=axis_name,
    )
    layout.check(method)
    if tolerance_scale is None:
        scale = jnp.ones(length, init.dtype)
    else:
        scale = jnp.asarray(tolerance_scale)
        if scale.ndim > 1 or (scale.ndim == 1 and scale.shape[0] != length):
            raise ValueError(
                f"`tolerance_scale` must be a scalar or have shape ({length},), got "
                f"shape {scale.shape}."
            )
        scale = jnp.broadcast_to(scale.astype(init.dtype), (length,))
    # The layouts slice the inputs: without any, give them a placeholder with a
    # time axis.
    has_xs = bool(jtu.tree_leaves(xs))
    xs_solve = xs if has_xs else jnp.zeros((length, 0), init.dtype)

    def close(fn):
        call = fn if has_xs else lambda s, x: fn(s, xs)
        return layout.close(
            lambda s, x: call(s, x).astype(init.dtype), init, index(xs_solve, 0)
        )

    closed = close(step)
    if isinstance(step, SequentialForm):
        closed = SequentialForm(closed, close(step.sequential))
    if guess is None:
        guess = layout.default_guess(init)
    give_up = jnp.asarray(False if give_up is None else give_up)
    if give_up.shape != () or give_up.dtype != jnp.bool_:
        raise ValueError(
            f"`give_up` must be a boolean scalar, got {give_up.dtype}{give_up.shape}."
        )
    states, dynamic_stats = _solve(
        closed, init, xs_solve, guess, scale, give_up, method=method, layout=layout
    )
    zero = count(0)
    skeleton = Stats(
        num_iterations=zero,
        num_advances=zero,
        num_sequential_steps=zero,
        fallback_start=zero,
        length=length,
        result=RESULTS.successful,
        lyapunov=jnp.zeros((), init.dtype),
        window=zero,
    )
    stats = eqx.combine(dynamic_stats, skeleton)
    if throw:
        # On the last state only: a sharded `states` would be gathered onto one
        # device for the check's host callback.
        states = states.at[-1].set(raise_if_failed(stats, states[-1]))
    return states, stats
