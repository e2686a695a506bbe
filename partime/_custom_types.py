"""Shared jaxtyping aliases."""

from typing import Any, TypeAlias

from jaxtyping import Array, Float, PyTree


Carry: TypeAlias = PyTree[Any]
Inputs: TypeAlias = PyTree[Any]
State: TypeAlias = Float[Array, " d"]
States: TypeAlias = Float[Array, "T d"]
