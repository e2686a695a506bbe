"""Result codes and statistics of a parallel solve."""

import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int, PyTree


# partime's result codes are optimistix's (built on lineax's): a solve that did not
# converge is `nonlinear_max_steps_reached`, one that diverged `nonlinear_divergence`,
# a non-finite `init` `nonfinite_input`. So `diffrax.RESULTS.promote` takes them as
# they are.
RESULTS = optx.RESULTS

# The messages of `throw=True`, with partime's knobs in them (optimistix's speak of
# `max_steps`).
_MESSAGES = (
    "The parallel iteration did not converge within `max_iters` iterations and the "
    "sequential fallback is switched off (`fallback=False`). Increase `max_iters`, "
    "pick a more robust method (e.g. `partime.Newton`), use shorter windows, or set "
    "`fallback=True` to finish the computation sequentially.",
    "The parallel iteration diverged (it produced NaN or infinite values) and the "
    "sequential fallback is switched off (`fallback=False`). Use a damped method, a "
    "better initial guess, shorter windows, or set `fallback=True`.",
    "The initial state contains NaN or infinite values. (The steps were computed "
    "sequentially, as `jax.lax.scan` would; pass `throw=False` to get them.)",
)


class Stats(eqx.Module):
    """Statistics of one parallel-in-time solve, for every layout of time (whole
    sequence, windows, a mesh).

    **Attributes:**

    - `num_iterations`: parallel iterations taken, summed over all windows. For the
        sliding window this is the depth of the computation: each iteration is one
        parallel evaluation of `W` steps.
    - `num_advances`: how many windows were solved: 1 for a whole sequence, the
        number of blocks for `schedule="blocks"`, and for `schedule="sliding"` the
        number of times the window moved forward, plus 1 for its last position.
    - `num_sequential_steps`: steps computed by the exact sequential fallback.
    - `fallback_start`: index of the first step that the fallback computed; equal to
        the sequence length when no fallback ran.
    - `length`: the sequence length `T`.
    - `result`: a `partime.RESULTS` member (optimistix's result codes).
    - `lyapunov`: an estimate of the largest Lyapunov exponent `λ` of the recurrence,
        per step, from the step Jacobians `J_t` at the last iterate at which the method
        linearised: `log ‖J_n ⋯ J_1‖ / n` over the `n` steps in flight if the iteration
        converged; otherwise over the `n` leading steps that had converged in that
        iterate only, where it is the exact trajectory (the steps past them, which the
        fallback then computed, are not counted). On a mesh the devices' chunks' growths
        are summed; for blocks, the mean over the blocks that have an estimate; for the
        sliding window, along its last position (where fewer than 8 of its steps had
        converged: the estimate the hopeless-case test last computed, if any). `λ < 0`:
        errors die out (contracting, predictable, parallel iterations converge fast);
        `λ ≈ 0`: neutral (oscillators: iterations grow with the periods spanned); `λ·T`
        more than a few units: chaotic, the iteration cannot pay. A finite-horizon
        estimate: its sign and order of magnitude are what to read. NaN when the
        method's transitions are not Jacobians (`QuasiNewton`, `QuasiELK`, `Picard`,
        `Jacobi`), when no linearisation was made (the iteration was given up
        beforehand) and when fewer than 8 steps had converged (over so few, the growth
        is a transient); `-inf` for a product that is exactly zero.
    - `window`: how many steps were solved together: `T` for the whole sequence
        (and on a mesh), `W` for blocks and the sliding window, and for the
        automatic window (`window="auto"`) its final width — the steps past the
        converged prefix over which it trusted updates at the end, as a sliding
        window of that many steps; `T` if it never narrowed. (Steps computed by
        the fallback are counted in `num_sequential_steps`.)
    """

    num_iterations: Int[Array, ""]
    num_advances: Int[Array, ""]
    num_sequential_steps: Int[Array, ""]
    fallback_start: Int[Array, ""]
    length: int = eqx.field(static=True)
    result: RESULTS
    lyapunov: Float[Array, ""]
    window: Int[Array, ""]

    @property
    def fell_back(self) -> Bool[Array, ""]:
        """Whether the sequential fallback computed any step."""
        return self.num_sequential_steps > 0

    def __repr__(self) -> str:
        def show(x):
            if isinstance(x, jax.core.Tracer):
                return repr(x)
            return repr(x.tolist()) if isinstance(x, jax.Array) else repr(x)

        fields = ("num_iterations", "num_advances", "num_sequential_steps")
        items = [f"{name}={show(getattr(self, name))}" for name in fields]
        items.append(f"fallback_start={show(self.fallback_start)}")
        items.append(f"length={self.length}")
        items.append(f"lyapunov={show(self.lyapunov)}")
        items.append(f"window={show(self.window)}")
        result = self.result
        if isinstance(result._value, jax.core.Tracer) or jnp.ndim(result._value):
            items.append(f"result={result!r}")
        else:
            names = ("successful", "nonlinear_max_steps_reached")
            names += ("nonlinear_divergence", "nonfinite_input")
            name = next(n for n in names if bool(result == getattr(RESULTS, n)))
            items.append(f"result=RESULTS.{name}")
        return f"Stats({', '.join(items)})"


def count(x) -> Int[Array, ""]:
    """An `int32` counter (no weak types, which `print` shows as `weak_i32[]`)."""
    return jnp.asarray(x, jnp.int32)


def raise_if_failed(stats: Stats, token: PyTree) -> PyTree:
    """`token`, with a run-time error attached if the solve failed (`throw=True`)."""
    result = stats.result
    index = jnp.where(
        result == RESULTS.nonfinite_input,
        2,
        jnp.where(result == RESULTS.nonlinear_divergence, 1, 0),
    )
    return eqx.branched_error_if(token, result != RESULTS.successful, index, _MESSAGES)
