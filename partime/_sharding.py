"""The linear dynamical system solve with the time axis split over devices.

Each of the `P` devices on a mesh axis holds a chunk of `C = T / P` consecutive steps.
The solve of `x_t = A_t x_{t-1} + b_t` then takes three stages (reduce, then scan):

1. every device composes its chunk's affine maps `x -> A_t x + b_t` into one, its
    *affine summary* `(A_C ⋯ A_1, x̂_C)`: the map from the state entering the chunk to
    the state leaving it (a pairwise reduction of depth `O(log C)`);
2. the `P` summaries are gathered on every device (`lax.all_gather`: `P·(d² + d)`
    numbers for dense transitions, `P·2d` for diagonal ones) and composed by a scan of
    `P` elements, which gives every chunk's incoming state `z`;
3. every device solves its chunk (`transition.solve`, the ordinary associative scan)
    with `A_1 z` added to its first right-hand side.

No device ever sees another device's `T·d` data, and each keeps what the one-device
solve keeps for its chunk (a scan that kept every prefix `A_t ⋯ A_1` would add `C·d²`).
The transpose (the reverse scan) shards the same way, with one extra `lax.ppermute` of
the next chunk's first transition (`d²` numbers), because `y_t = A_{t+1}^T y_{t+1} +
b_t` reaches one step into the next chunk.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, PartitionSpec
from jaxtyping import Array, Float

from ._lds import (
    AbstractTransition,
    compose_diagonals,
    compose_matrices,
    DenseTransition,
    DiagonalTransition,
    IdentityTransition,
    scan_kind,
    ZeroTransition,
)


_HIGHEST = jax.lax.Precision.HIGHEST


def time_axis(mesh: Any, axis_name: str | None) -> tuple[str, int]:
    """Checks `mesh` and picks the axis that splits time: `(axis_name, size)`."""
    if not isinstance(mesh, Mesh):
        raise TypeError(
            "`mesh` must be a `jax.sharding.Mesh`, e.g. `jax.make_mesh((8,), "
            '("time",), axis_types=(jax.sharding.AxisType.Auto,))`; got '
            f"{type(mesh).__name__}."
        )
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                f"The mesh has axes {mesh.axis_names}: pass `axis_name=` to say which "
                "one splits the time axis."
            )
        (axis_name,) = mesh.axis_names
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"`axis_name={axis_name!r}` is not an axis of the mesh (its axes are "
            f"{mesh.axis_names})."
        )
    # The step function is traced once outside `shard_map` and replayed inside it;
    # under explicit sharding its operations carry the outer mesh and cannot be
    # replayed in the manual one.
    context = jax.sharding.get_abstract_mesh()
    if AxisType.Explicit in mesh.axis_types or (
        not context.empty and AxisType.Explicit in context.axis_types
    ):
        raise ValueError(
            "partime's sharded solves need a mesh whose axes are "
            "`jax.sharding.AxisType.Auto`, used outside any explicit-sharding "
            "`jax.set_mesh` context: build it as `jax.make_mesh((P,), ('time',), "
            "axis_types=(jax.sharding.AxisType.Auto,))`."
        )
    return axis_name, mesh.shape[axis_name]


def filter_shard_map(
    fn: Callable,
    mesh: Mesh,
    in_specs: Sequence[Any],
    out_specs: Any,
    check_vma: bool = True,
) -> Callable:
    """`jax.shard_map` for arguments that are PyTrees with non-array leaves (equinox
    modules, closure-converted functions): the arrays go through `shard_map` with the
    given spec (a prefix of each argument), everything else is closed over. Outputs
    must be arrays."""

    def wrapped(*args):
        dynamic, static = eqx.partition(args, eqx.is_array)

        def inner(*dynamic):
            # The sequential CPU solve's carry is not device-varying, which
            # `shard_map` refuses: inside it, solves are associative scans.
            with scan_kind("associative"):
                return fn(*eqx.combine(dynamic, static))

        return jax.shard_map(
            inner,
            mesh=mesh,
            in_specs=tuple(in_specs),
            out_specs=out_specs,
            check_vma=check_vma,
        )(*dynamic)

    return wrapped


# A transition's structure, and the arrays that hold its per-step blocks:
# "dense" (T, d, d); "diagonal" (T, d); "identity" and "zero": None.


def _structure(transition: AbstractTransition) -> tuple[str, Array | None]:
    if isinstance(transition, DenseTransition):
        return "dense", transition.matrices
    if isinstance(transition, DiagonalTransition):
        return "diagonal", transition.diagonals
    if isinstance(transition, IdentityTransition):
        return "identity", None
    if isinstance(transition, ZeroTransition):
        return "zero", None
    # Any other structure (its arrays hold the local chunk) goes through dense blocks.
    return "dense", transition.as_dense()


def _compose(kind: str) -> Callable:
    """`(A_2, b_2) ∘ (A_1, b_1) = (A_2 A_1, A_2 b_1 + b_2)` for the structure."""
    return compose_matrices if kind == "dense" else compose_diagonals


def _apply(kind: str, block: Array | None, z: Float[Array, " d"]) -> Array:
    """`A z` for one block of the structure."""
    if kind == "dense":
        return jnp.matmul(block, z, precision=_HIGHEST)
    if kind == "diagonal":
        return block * z
    return z  # identity; "zero" never gets here


def _reduce(combine: Callable, elements: tuple[Array, Array]) -> tuple[Array, Array]:
    """The composition `e_C ∘ ⋯ ∘ e_1` of a sequence of affine maps, by pairwise
    reduction: `log C` levels, and only the reduction's halving temporaries in memory
    (a scan would keep all `C` prefixes)."""
    while elements[0].shape[0] > 1:
        length = elements[0].shape[0]
        even = tuple(e[: length - length % 2] for e in elements)
        paired = combine(tuple(e[0::2] for e in even), tuple(e[1::2] for e in even))
        if length % 2:
            paired = tuple(
                jnp.concatenate([p, e[-1:]]) for p, e in zip(paired, elements)
            )
        elements = paired
    return elements[0][0], elements[1][0]


def _transition(kind: str, blocks: Array | None, b: Array) -> AbstractTransition:
    length, size = b.shape
    if kind == "dense":
        return DenseTransition(blocks)
    if kind == "diagonal":
        return DiagonalTransition(blocks)
    return IdentityTransition(length, size, b.dtype)


def chunk_solve(
    transition: AbstractTransition,
    b: Float[Array, "C d"],
    axis_name: str,
    num_chunks: int,
    reverse: bool = False,
) -> Float[Array, "C d"]:
    """One device's share of [`partime.AbstractTransition.solve`][] over a time axis
    split into `num_chunks` chunks on mesh axis `axis_name`. Call inside `shard_map`,
    with this device's chunk of the transitions and of `b`.

    Forward: `x_t = A_t x_{t-1} + b_t`, `x_0 = 0`; reverse (the transpose):
    `y_t = A_{t+1}^T y_{t+1} + b_t`, `y_{T+1} = 0`.

    Communication: one `all_gather` of the chunk summaries (`num_chunks·(d² + d)`
    numbers for dense transitions), and in reverse one `ppermute` of a single block.
    """
    kind, blocks = _structure(transition)
    if kind == "zero":
        return b  # x_t = b_t: nothing couples the chunks.
    index = jax.lax.axis_index(axis_name)
    combine = _compose(kind)
    if blocks is None:
        edge = None
    elif reverse:
        # The reverse recurrence uses A_{t+1}: the chunk's own blocks from the second
        # on, then the next chunk's first (the last chunk receives zeros, which
        # multiply y_{T+1} = 0). It composes from the chunk's end: flip.
        following = jax.lax.ppermute(
            blocks[:1], axis_name, [(i + 1, i) for i in range(num_chunks - 1)]
        )
        edge = following[0]
        if kind == "dense":
            edge = edge.T
            shifted = jnp.swapaxes(jnp.concatenate([blocks[1:], following]), -1, -2)
        else:
            shifted = jnp.concatenate([blocks[1:], following])
        summary = _reduce(combine, (jnp.flip(shifted, 0), jnp.flip(b, 0)))
    else:
        edge = blocks[0]
        summary = _reduce(combine, (blocks, b))

    # 1. The chunk's affine summary: the map from the state entering the chunk (from
    # the left; in reverse, from the right) to the state leaving it.
    if blocks is None:
        summary = (None, jnp.sum(b, axis=0))
    summary_a, summary_b = summary

    # 2. Every chunk's summary, on every device, composed by a scan over the chunks.
    # In reverse the information flows from the last chunk: flip, scan forward, flip.
    gathered_b = jax.lax.all_gather(summary_b, axis_name)
    gathered_a = None
    if summary_a is not None:
        gathered_a = jax.lax.all_gather(summary_a, axis_name)
    if reverse:
        gathered_b = jnp.flip(gathered_b, axis=0)
        gathered_a = None if gathered_a is None else jnp.flip(gathered_a, axis=0)
    ends = _transition(kind, gathered_a, gathered_b).solve(gathered_b)
    zero = jnp.zeros_like(ends[:1])
    if reverse:
        # ends[k] leaves chunk P-1-k; chunk p receives the state leaving chunk p+1.
        incoming = jnp.concatenate([zero, ends])[num_chunks - 1 - index]
    else:
        incoming = jnp.concatenate([zero, ends])[index]

    # 3. The chunk's own solve, with the incoming state's contribution to its first
    # step (in reverse, its last) added to `b`.
    coupling = _apply(kind, edge, incoming)
    b = b.at[-1 if reverse else 0].add(coupling)
    return transition.solve(b, reverse=reverse)


def sharded_solve(
    transition: AbstractTransition,
    b: Float[Array, "T d"],
    *,
    mesh: Mesh,
    axis_name: str | None = None,
    reverse: bool = False,
) -> Float[Array, "T d"]:
    """[`partime.AbstractTransition.solve`][] with the time axis split over the devices
    of one mesh axis.

    **Arguments:**

    - `transition`, `b`, `reverse`: as for `transition.solve(b, reverse)`. `T` must be a
        multiple of the number of devices on the axis.
    - `mesh`: a `jax.sharding.Mesh`.
    - `axis_name`: the mesh axis that splits time; may be omitted on a 1-D mesh.

    **Returns:** the solution, shape `(T, d)`, sharded over `axis_name`.
    """
    axis_name, num_chunks = time_axis(mesh, axis_name)
    length = b.shape[0]
    if length % num_chunks != 0:
        raise ValueError(
            f"The sequence length {length} is not a multiple of the {num_chunks} "
            f"devices on mesh axis {axis_name!r}."
        )
    spec = PartitionSpec(axis_name)
    solve = filter_shard_map(
        functools.partial(
            chunk_solve, axis_name=axis_name, num_chunks=num_chunks, reverse=reverse
        ),
        mesh,
        in_specs=(spec, spec),
        out_specs=spec,
    )
    return solve(transition, b)
