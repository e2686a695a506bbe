"""Dense output of a `partime.ParallelSolver` window, from its inner steps."""

import abc
import functools
from collections.abc import Callable
from typing import Any

import diffrax
import jax.numpy as jnp
import jax.tree_util as jtu
from equinox.internal import ω
from jaxtyping import Array, PyTree


def inner_grid(t0, t1, num_steps: int) -> Array:
    """The inner step times of the window `[t0, t1]`: `num_steps + 1` evenly spaced
    points, the last one exactly `t1`. The solver's `step` and its interpolation both
    call this, so that they agree bit for bit."""
    t0 = jnp.asarray(t0)
    t1 = jnp.asarray(t1)
    dtype = jnp.result_type(t0, t1)
    fraction = (jnp.arange(num_steps + 1) / num_steps).astype(dtype)
    ts = t0 + (t1 - t0) * fraction
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
