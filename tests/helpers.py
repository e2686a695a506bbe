import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

import partime


all_methods = (
    partime.Newton(),
    partime.QuasiNewton(),
    partime.Picard(),
    partime.Jacobi(),
)


def tree_allclose(x, y, *, rtol=1e-8, atol=1e-10):
    """Same structure, and every leaf close."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    return all(
        jnp.shape(a) == jnp.shape(b) and bool(jnp.allclose(a, b, rtol=rtol, atol=atol))
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def max_rel_error(x, y):
    """Largest relative error over the leaves, scaled by each leaf's max magnitude."""
    errors = [
        jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30)
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    ]
    return float(max(errors))


# A registry of problems for the engine's tests: `name -> (f, init, xs)` with
# `f(carry, x) -> (carry, y)` as `jax.lax.scan` takes it. Short (`T = 64`, a multiple
# of 8 so that the sharded layout splits it over 8 devices), so that every layout and
# every method can run on each without many long compiles.

PROBLEM_LENGTH = 64


def _rk4(field, h):
    """One classical Runge–Kutta step of `y' = field(t, y)`; `x` is the time."""

    def f(y, t):
        k1 = field(t, y)
        k2 = field(t + h / 2, y + h / 2 * k1)
        k3 = field(t + h / 2, y + h / 2 * k2)
        k4 = field(t + h, y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return y, y[0]

    return f


def _rnn(gain, seed, size=4, input_scale=1.0):
    k1, k2, k3 = jr.split(jr.PRNGKey(seed), 3)
    weights = gain * jr.orthogonal(k1, size)
    inputs = jr.normal(k2, (size, 2)) / jnp.sqrt(2)
    xs = input_scale * jr.normal(k3, (PROBLEM_LENGTH, 2))

    def f(h, x):
        h = jnp.tanh(weights @ h + inputs @ x)
        return h, h[0]

    return f, jnp.zeros(size), xs


def _pytree_step(carry, x):
    a, (b, c) = carry["a"], carry["bc"]
    a = jnp.tanh(0.5 * a + 0.3 * b + x)
    b = 0.8 * b + 0.1 * jnp.sum(a)
    c = jnp.cos(c) * 0.5
    return {"a": a, "bc": (b, c)}, a[0]


def _times(h):
    return jnp.arange(PROBLEM_LENGTH, dtype=float) * h


def _van_der_pol(t, y):
    return jnp.stack([y[1], (1 - y[0] ** 2) * y[1] - y[0]])


def _lorenz(t, y):
    return jnp.stack(
        [10 * (y[1] - y[0]), y[0] * (28 - y[2]) - y[1], y[0] * y[1] - 8 / 3 * y[2]]
    )


def _stiff(t, y):
    # Two components relaxing at rates 1 and 50 onto a moving target: RK4 with
    # `h·50 = 1.5`, inside its stability region but far from the slow scale.
    rates = jnp.array([1.0, 50.0])
    return -rates * (y - jnp.cos(t))


problems = {
    "rnn": _rnn(0.6, seed=0),
    # Spectral radius 1.5 at the constant guess h = 0: undamped Newton's first update
    # grows like 1.5^t.
    "rnn-unstable": _rnn(1.5, seed=1, input_scale=0.3),
    "vdp": (_rk4(_van_der_pol, 0.05), jnp.array([2.0, 0.0]), _times(0.05)),
    "lorenz": (_rk4(_lorenz, 0.02), jnp.array([1.0, 1.0, 1.0]), _times(0.02)),
    "stiff": (_rk4(_stiff, 0.03), jnp.array([2.0, -1.0]), _times(0.03)),
    "pytree": (
        _pytree_step,
        {"a": jnp.ones(3), "bc": (jnp.array(0.5), jnp.zeros((2, 2)))},
        jnp.broadcast_to(jnp.linspace(-1, 1, PROBLEM_LENGTH)[:, None], (64, 3)),
    ),
}

# Every method, damped ones included.
every_method = all_methods + (partime.ELK(), partime.QuasiELK())

# Layouts on one device, as `partime.scan` keyword arguments. (The sharded layout is
# checked on 8 devices in `tests/_sharding_checks.py`.)
layouts = {
    "whole": {},
    "blocks": dict(window=24, schedule="blocks"),
    "sliding": dict(window=24, schedule="sliding"),
}


def expanding_rnn(length, size=8):
    """`(f, init, xs)`: the convergence study's RNN with gain 1.5 (spectral radius),
    which contracts along its trajectory (λ ≈ -0.33 per step) but whose Jacobians
    expand near rest, where Newton starts: over the whole sequence it gives up."""
    k1, k2, k3 = jr.split(jr.PRNGKey(0), 3)
    weights = jr.normal(k1, (size, size)) / size**0.5
    weights = 1.5 * weights / jnp.max(jnp.abs(jnp.linalg.eigvals(weights)))
    inputs = jr.normal(k2, (size, 2))
    xs = jr.normal(k3, (length, 2))

    def f(h, x):
        h = jnp.tanh(weights @ h + inputs @ x)
        return h, h

    return f, jnp.zeros(size), xs
