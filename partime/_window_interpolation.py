"""Dense output of a `partime.ParallelSolver` window, from its inner steps."""

import abc
import functools
from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox.internal import ω
from jaxtyping import Array, PyTree


@jax.custom_jvp
def _rounded(x: Array) -> Array:
    """`x`, held apart from the arithmetic that consumes it.

    XLA contracts a product followed by a sum into one fused multiply-add (one
    rounding instead of two), and folds constants with two roundings; eager JAX
    never fuses. Neither an optimisation barrier nor a select survives XLA:CPU, but
    a bit pattern the compiler cannot prove unchanged does: an `or` with the
    comparison `x != x` (true only for a NaN, whose bits it may change)."""
    int_dtype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, int_dtype)
    bits = bits | (x != x).astype(int_dtype)
    return jax.lax.bitcast_convert_type(bits, x.dtype)


_rounded.defjvp(lambda primals, tangents: (_rounded(*primals), *tangents))


def grid_time(t0, t1, fraction) -> Array:
    """`t0 + (t1 - t0) * fraction`, rounded twice, as eager JAX does, inside `jit` as
    outside it. A step time one ulp off moves a `diffrax.VirtualBrownianTree` by
    about its tolerance where it meets one of the tree's dyadic nodes (and changes an
    `UnsafeBrownianPath` altogether)."""
    return t0 + _rounded((t1 - t0) * fraction)


def inner_grid(t0, t1, num_steps: int) -> Array:
    """The inner step times of a [`partime.ParallelSolver`][] window `[t0, t1]`:
    `num_steps + 1` evenly spaced points `t0 + (t1 - t0) * (k / num_steps)`, the last
    one exactly `t1`.

    Bit for bit the times the solver steps to, under `jax.jit` or not: give them to
    `diffrax.StepTo(ts=...)` for a sequential solve on the same grid (with the same
    `diffrax.VirtualBrownianTree`, the same SDE solution).

    **Arguments:**

    - `t0`, `t1`: the window's ends (scalars).
    - `num_steps`: the solver's `num_steps`.

    **Returns:** an array of shape `(num_steps + 1,)`, in the dtype of `t0` and `t1`.
    """
    t0 = jnp.asarray(t0)
    t1 = jnp.asarray(t1)
    dtype = jnp.result_type(t0, t1)
    # A constant of the program, each `k / num_steps` correctly rounded in `dtype`:
    # computed in the program, XLA would multiply by `1 / num_steps` instead.
    fraction = np.arange(num_steps + 1, dtype=dtype) / np.asarray(num_steps, dtype)
    ts = grid_time(t0, t1, fraction)
    return ts.at[-1].set(t1)


class AbstractWindowInterpolation(diffrax.AbstractLocalInterpolation):
    """Dense output over one window: finds the inner step that holds `t` and defers to
    the inner solver's own interpolation there."""

    t0: Any
    t1: Any
    # The inner steps' dense infos, stacked on a leading axis of length `num_steps`.
    infos: PyTree[Array]

    @property
    def num_steps(self) -> int:
        return jtu.tree_leaves(self.infos)[0].shape[0]

    @abc.abstractmethod
    def _make_inner(self, t0, t1, info) -> diffrax.AbstractLocalInterpolation:
        """The inner solver's interpolation over one inner step."""

    def _local(self, t, left: bool) -> diffrax.AbstractLocalInterpolation:
        ts = inner_grid(self.t0, self.t1, self.num_steps)
        # Same convention as `diffrax.DenseInterpolation`: at an inner grid point,
        # `left=True` picks the step that ends there.
        index = jnp.searchsorted(ts, t, side="left" if left else "right")
        index = jnp.clip(index - 1, 0, self.num_steps - 1)
        info = jtu.tree_map(lambda x: x[index], self.infos)
        return self._make_inner(ts[index], ts[index + 1], info)

    def evaluate(self, t0, t1=None, left: bool = True) -> PyTree[Array]:
        if t1 is not None:
            return (
                self.evaluate(t1, left=left) ** ω - self.evaluate(t0, left=left) ** ω
            ).ω
        return self._local(t0, left).evaluate(t0, left=left)

    def derivative(self, t, left: bool = True) -> PyTree[Array]:
        return self._local(t, left).derivative(t, left=left)


@functools.cache
def window_interpolation_cls(
    inner_interpolation_cls: Callable[..., diffrax.AbstractLocalInterpolation],
) -> type[AbstractWindowInterpolation]:
    # Cached so that each inner interpolation gets one class with a stable identity:
    # `diffrax.DenseInterpolation` keeps it as a static field.
    class WindowInterpolation(AbstractWindowInterpolation):
        t0: Any
        t1: Any
        infos: PyTree[Array]

        def _make_inner(self, t0, t1, info):
            return inner_interpolation_cls(t0=t0, t1=t1, **info)

    name = getattr(inner_interpolation_cls, "__qualname__", "interpolation")
    WindowInterpolation.__qualname__ = f"WindowInterpolation[{name}]"
    WindowInterpolation.__name__ = WindowInterpolation.__qualname__
    return WindowInterpolation
