"""`partime.scan`: a drop-in for `jax.lax.scan` that runs in parallel over time."""

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax.sharding import Mesh
from jaxtyping import ArrayLike, PyTree

from ._chunked import vmap_chunked_derivative
from ._fixed_point import fixed_point_solve, index, previous
from ._flatten import Flattener
from ._method.base import AbstractMethod
from ._method.newton import Newton
from ._misc import as_count
from ._stats import count, RESULTS, Stats
from ._windowed import map_in_windows


def _flip(tree: PyTree) -> PyTree:
    return jtu.tree_map(lambda a: jnp.flip(a, axis=0), tree)


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: PyTree,
    xs: PyTree = None,
    length: int | None = None,
    reverse: bool = False,
    unroll: int | bool = 1,
    *,
    method: AbstractMethod = Newton(),
    guess: PyTree = None,
    return_stats: bool = False,
    throw: bool = True,
    window: int | Literal["auto"] | None = None,
    schedule: Literal["sliding", "blocks"] = "sliding",
    tolerance_scale: ArrayLike | None = None,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
) -> tuple[PyTree, PyTree] | tuple[PyTree, PyTree, Stats]:
    """Evaluates `jax.lax.scan(f, init, xs, length, reverse)` in parallel over time.

    The carries `c_1..c_T` of the recurrence `(c_t, y_t) = f(c_{t-1}, x_t)` are found
    all at once, as the solution of the nonlinear system `c_t - f(c_{t-1}, x_t)[0] = 0`,
    by the iterations of `method`, each a linear solve of depth `O(log T)` on an
    accelerator (an associative scan; on a CPU a sequential scan, which is cheaper). The
    outputs `y_t` are then evaluated in parallel from the carries.

    **Arguments:**

    - `f`, `init`, `xs`, `length`, `reverse`: as for `jax.lax.scan`. The carry may be
        any PyTree of floating-point or complex arrays, of any precision (the
        iterations run in at least `float32`; `f` sees the carry in its own dtype).
    - `unroll`: accepted for compatibility with `jax.lax.scan`, where it unrolls the
        sequential loop; the parallel solve has no such loop, so it has no effect.
    - `method`: the fixed-point method: [`partime.Newton`][] (default),
        [`partime.QuasiNewton`][], [`partime.Picard`][], [`partime.Jacobi`][].
    - `guess`: a first guess for the carries `c_1..c_T`, stacked along a leading axis
        like the carries `jax.lax.scan` would return (e.g. the previous training step's
        trajectory). Defaults to `init` at every step.
    - `return_stats`: also return a [`partime.Stats`][].
    - `throw`: raise an error if the solve failed (only possible with
        `fallback=False`, or a non-finite `init`). If `False`, check `stats.result`.
    - `window`, `schedule`, `tolerance_scale`: solve `window` steps at a time, by a
        sliding window or by fixed blocks, optionally with per-step tolerance factors
        (given in the order of `xs`); memory then stays bounded for any horizon.
        `window="auto"` narrows the window only where the whole sequence is
        hopeless: neutral recurrences (oscillators) converge instead of falling
        back, but chaotic ones are iterated too (hence opt-in). See
        [`partime.fixed_point_solve`][].
    - `mesh`, `axis_name`: split the time axis over the devices of mesh axis
        `axis_name` (which may be omitted on a 1-D mesh); `T` must be a multiple of
        their number, and the mesh's axes `jax.sharding.AxisType.Auto`. The outputs
        are sharded over time too. See [`partime.fixed_point_solve`][].

    **Returns:** `(final_carry, ys)`, or `(final_carry, ys, stats)`.

    The result equals `jax.lax.scan`'s to the method's tolerance; if the iteration does
    not converge, the method's exact sequential fallback finishes the steps after the
    converged prefix (see `stats.fell_back`). Gradients (`jax.grad`, `jax.jvp`) are
    computed by implicit differentiation — one parallel linear solve at the solution —
    with respect to `init`, `xs`, and any arrays `f` closes over.
    """
    leaves = jtu.tree_leaves(init)
    if not leaves:
        raise ValueError("`partime.scan` needs a carry with at least one array.")
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                "`partime.scan` solves for the carry with Newton-type iterations, so "
                "every leaf of the carry must be a floating-point array; got one of "
                f"dtype {jnp.result_type(leaf)}. Pass integer counters through `xs` "
                "(e.g. `xs=jnp.arange(T)`) instead of the carry."
            )
    length, window = as_count(length), as_count(window)
    del unroll
    init = jtu.tree_map(jnp.asarray, init)
    if reverse:
        xs = _flip(xs)
    x_leaves = jtu.tree_leaves(xs)
    if length is None and not x_leaves:
        raise ValueError(
            "`partime.scan` got no `xs` to scan over and no `length`, as "
            "`jax.lax.scan` would refuse."
        )
    x_struct = jtu.tree_map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), xs
    )
    carry_struct, out_struct = jax.eval_shape(f, init, x_struct)
    init = _check_carry(carry_struct, init)
    flattener = Flattener(init)
    init_flat = flattener.ravel(init)
    unravel = flattener.unravel
    num_steps = length if length is not None else jnp.shape(x_leaves[0])[0]
    if num_steps == 0:
        # As `jax.lax.scan`: the carry is `init`, the outputs have length zero.
        empty = lambda s: jnp.zeros((0, *s.shape), s.dtype)
        ys = jtu.tree_map(empty, out_struct)
        if return_stats:
            stats = Stats(
                num_iterations=count(0),
                num_advances=count(0),
                num_sequential_steps=count(0),
                fallback_start=count(0),
                length=0,
                result=RESULTS.successful,
                lyapunov=jnp.asarray(jnp.nan, init_flat.dtype),
                window=count(0),
            )
            return init, ys, stats
        return init, ys

    def step(state, x):
        carry, _ = f(unravel(state), x)
        return flattener.ravel(carry)

    if guess is not None:
        guess = jax.vmap(flattener.ravel)(guess)
    if reverse and tolerance_scale is not None and jnp.ndim(tolerance_scale):
        tolerance_scale = _flip(tolerance_scale)
    states, stats = fixed_point_solve(
        step,
        init_flat,
        xs,
        method,
        length=length,
        guess=guess,
        window=window,
        schedule=schedule,
        tolerance_scale=tolerance_scale,
        mesh=mesh,
        axis_name=axis_name,
        throw=throw,
    )
    last = states[-1]
    prev = previous(init_flat, states, mesh=mesh, axis_name=axis_name)
    output = lambda s, x: f(unravel(s), x)[1]
    if mesh is not None:
        ys = jax.vmap(output)(prev, xs)
    elif window is None or isinstance(window, str):
        closed = eqx.filter_closure_convert(output, init_flat, index(xs, 0))
        ys = vmap_chunked_derivative(closed, (prev, xs))
    else:
        ys = map_in_windows(output, (prev, xs), min(window, len(prev)))
    if reverse:
        ys = _flip(ys)
    final = unravel(last)
    if return_stats:
        return final, ys, stats
    return final, ys


def _check_carry(carry_struct: PyTree, init: PyTree) -> PyTree:
    """As `jax.lax.scan`: `f` must return a carry of the structure, shapes and dtypes
    of `init`; a weakly typed leaf of `init` (a Python scalar) takes the dtype `f`
    returns. Returns `init` so promoted."""
    init_struct = jax.eval_shape(lambda: init)
    same = jtu.tree_structure(carry_struct) == jtu.tree_structure(init_struct) and all(
        a.shape == b.shape and (a.dtype == b.dtype or b.weak_type)
        for a, b in zip(jtu.tree_leaves(carry_struct), jtu.tree_leaves(init_struct))
    )
    if not same:
        raise TypeError(
            "`f` must return a carry with the same structure, shapes and dtypes as "
            f"`init`, as for `jax.lax.scan`: got {carry_struct} for init "
            f"{init_struct}."
        )
    return jtu.tree_map(lambda c, i: i.astype(c.dtype), carry_struct, init)
