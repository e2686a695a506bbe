"""Result codes and statistics of a parallel solve."""

import equinox as eqx
import equinox.internal as eqxi
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


class RESULTS(eqxi.Enumeration):
    """Outcome of a parallel-in-time solve.

    A solve whose iteration did not converge but which finished the remaining steps with
    the exact sequential fallback is `successful`: its answer is exact. Check
    [`partime.Stats.fell_back`][] to see whether that happened.
    """

    successful = ""
    max_iters_reached = (
        "The parallel iteration did not converge within `max_iters` iterations and the "
        "sequential fallback is switched off (`fallback=False`). Increase `max_iters`, "
        "pick a more robust method (e.g. `partime.Newton`), use shorter windows, or "
        "set `fallback=True` to finish the computation sequentially."
    )
    diverged = (
        "The parallel iteration diverged (it produced NaN or infinite values) and the "
        "sequential fallback is switched off (`fallback=False`). Use a damped method, "
        "a better initial guess, shorter windows, or set `fallback=True`."
    )
    nonfinite_input = (
        "The initial state contains NaN or infinite values; the recurrence cannot be "
        "evaluated. Check `init` / `y0`."
    )


class Stats(eqx.Module):
    """Statistics of one parallel-in-time solve.

    **Attributes:**

    - `num_iterations`: parallel iterations taken.
    - `fallback_start`: index of the first step that the exact sequential fallback
        computed; equal to the sequence length when no fallback ran.
    - `length`: the sequence length `T`.
    - `result`: a [`partime.RESULTS`][] member.
    """

    num_iterations: Int[Array, ""]
    fallback_start: Int[Array, ""]
    length: int = eqx.field(static=True)
    result: RESULTS

    @property
    def fell_back(self) -> Bool[Array, ""]:
        """Whether the sequential fallback computed any step."""
        return self.fallback_start < self.length

    @property
    def num_sequential_steps(self) -> Int[Array, ""]:
        """How many steps the sequential fallback computed."""
        return jnp.asarray(self.length) - self.fallback_start
