"""No reduced-precision matrix products in the solves: every `dot_general` that partime
emits asks for the highest precision, so float32 stays float32 on GPUs (whose default
for a float32 matrix product is TF32, about 3e-4 relative error) and TPUs (bfloat16
passes). Checked on the lowered program (StableHLO text), which is the same on every
backend, so this runs on the CPU.

The step functions below contain no matrix products of their own: every `dot_general`
in the program is one that partime (or diffrax, for `ParallelSolver`) put there.
"""

import re

import diffrax
import jax
import jax.numpy as jnp
import lineax as lx
import pytest

import partime


T, D = 8, 3
_DOT = re.compile(r"stablehlo\.dot(_general)?\b")
# How StableHLO prints `precision_config` (one entry per operand): absent for DEFAULT.
_HIGHEST = re.compile(r"precision = \[HIGHEST, HIGHEST\]")


def _dots(fn, *args) -> tuple[list[str], list[str]]:
    """The matrix products in the lowered `fn`, and those not at highest precision."""
    text = jax.jit(fn).lower(*args).as_text()
    dots = [line.strip() for line in text.splitlines() if _DOT.search(line)]
    return dots, [line for line in dots if not _HIGHEST.search(line)]


def _step(h, x):
    """A nonlinear recurrence with a dense Jacobian and no matrix product."""
    h = jnp.tanh(0.5 * jnp.roll(h, 1) + 0.3 * h + x) + 0.1 * jnp.mean(h)
    return h, h


def _inputs():
    return jnp.zeros(D, jnp.float32), jnp.ones((T, D), jnp.float32)


def test_the_check_sees_default_precision():
    """The pattern recognises a default-precision product: a pass means something."""
    a = jnp.ones((D, D), jnp.float32)
    dots, loose = _dots(lambda x: a @ x, jnp.ones(D, jnp.float32))
    assert len(dots) == 1 and loose == dots
    dots, loose = _dots(
        lambda x: jnp.matmul(a, x, precision=jax.lax.Precision.HIGHEST),
        jnp.ones(D, jnp.float32),
    )
    assert len(dots) == 1 and loose == []


METHODS = [
    partime.Newton(),
    # One block of D: the structured scan's (batched) matrix products.
    partime.Newton(jacobian=partime.BlockDiagonal(D)),
    partime.QuasiNewton(),
    partime.ELK(),
    partime.QuasiELK(),
    partime.Jacobi(),
    partime.Picard(),
]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("window", [None, 4], ids=["whole", "window"])
def test_scan(method, window):
    if window is not None and isinstance(method, partime.AbstractDampedMethod):
        pytest.skip("damped methods are refused on a sliding window (test_engine.py)")

    def forward(h0, xs):
        return partime.scan(_step, h0, xs, method=method, window=window)

    def loss(h0, xs):
        carry, ys = forward(h0, xs)
        return jnp.sum(carry) + jnp.sum(ys)

    fwd_dots, fwd_loose = _dots(forward, *_inputs())
    grad_dots, grad_loose = _dots(jax.grad(loss, argnums=(0, 1)), *_inputs())
    assert fwd_loose == []
    assert grad_loose == []
    if type(method) in (partime.Newton, partime.ELK):
        # Not vacuous: their gradient's reverse scan multiplies dense Jacobians. (The
        # other methods' gradients are matrix-free: Jacobian-vector products of a
        # step without matrix products, so no `dot_general` at all.)
        assert grad_dots


@pytest.mark.parametrize("blocks", [False, True], ids=["explicit", "implicit"])
def test_linear_solve(blocks):
    """The Newton system's solve on its own, forward and transposed, with `D_t = I`
    and with diagonal blocks; and the sequential reference solve."""
    matrices = 0.5 * jnp.ones((T, D, D), jnp.float32)
    diagonal = (
        2.0 * jnp.broadcast_to(jnp.eye(D, dtype=jnp.float32), (T, D, D))
        if blocks
        else None
    )
    op = partime.BidiagonalOperator(partime.DenseTransition(matrices), diagonal)

    def solve(b):
        solver = partime.ScanSolver()
        x = lx.linear_solve(op, b, solver).value
        y = lx.linear_solve(op.transpose(), b, solver).value
        z = partime.sequential_solve(partime.DenseTransition(matrices), b)
        return x, y, z, op.mv(b)

    dots, loose = _dots(solve, jnp.ones((T, D), jnp.float32))
    assert dots and loose == []


@pytest.mark.parametrize(
    "inner",
    [
        diffrax.Tsit5(),
        diffrax.Kvaerno3(root_finder=diffrax.VeryChord(rtol=1e-8, atol=1e-8)),
    ],
    ids=["Tsit5", "Kvaerno3"],
)
def test_parallel_solver(inner):
    """Explicit and implicit inner solvers (the implicit one has diagonal blocks
    `D_t != I` in its Newton system)."""

    def vector_field(t, y, args):
        return jnp.tanh(0.5 * jnp.roll(y, 1)) - 0.3 * y

    def solve(y0):
        solver = partime.ParallelSolver(inner, num_steps=T)
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field), solver, 0.0, 1.0, 0.5, y0, max_steps=4
        )
        return sol.ys[-1]

    y0 = jnp.ones(D, jnp.float32)
    fwd_dots, fwd_loose = _dots(solve, y0)
    grad_dots, grad_loose = _dots(jax.grad(lambda y: jnp.sum(solve(y))), y0)
    assert fwd_loose == []
    assert grad_loose == []
    assert fwd_dots and grad_dots
