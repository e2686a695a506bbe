"""`partime.diagnose`: one problem of each kind, in both call forms."""

import diffrax
import jax.numpy as jnp
import jax.random as jr
import pytest

import partime

from .helpers import expanding_rnn, problems


def _lorenz(t, y, args):
    return jnp.stack(
        [10 * (y[1] - y[0]), y[0] * (28 - y[2]) - y[1], y[0] * y[1] - 8 / 3 * y[2]]
    )


def _pendulum(friction):
    return lambda t, y, args: jnp.stack([y[1], -jnp.sin(y[0]) - friction * y[1]])


def test_contracting_recurrence():
    f, init, xs = problems["rnn"]
    diagnosis = partime.diagnose(f, init, xs)
    assert diagnosis.kind == "predictable"
    assert diagnosis.unit == "step" and diagnosis.horizon == xs.shape[0]
    assert diagnosis.lyapunov < 0 and not diagnosis.fell_back
    assert "one window" in diagnosis.recommendation
    assert "predictable" in str(diagnosis)


@pytest.mark.parametrize(
    "field, y0, kind",
    [
        (_pendulum(0.5), [2.5, 0.0], "predictable"),
        (_pendulum(0.0), [2.5, 0.0], "neutral"),
        (_lorenz, [1.0, 1.0, 1.0], "chaotic"),
    ],
    ids=["damped-pendulum", "pendulum", "lorenz"],
)
def test_differential_equation(field, y0, kind):
    """Over 20 time units at `dt0 = 0.01`: the damped pendulum contracts, the
    pendulum is neutral (its perturbations grow linearly), Lorenz-63 is chaotic and
    goes sequential at once."""
    diagnosis = partime.diagnose(
        diffrax.ODETerm(field), 0.0, 20.0, jnp.array(y0), dt0=0.01
    )
    assert diagnosis.kind == kind, str(diagnosis)
    assert diagnosis.num_steps == 2000 and diagnosis.unit == "unit time"
    assert diagnosis.growth == pytest.approx(20.0 * diagnosis.lyapunov)
    if kind == "chaotic":
        assert diagnosis.fell_back and diagnosis.num_iterations == 0
        assert "sequential" in diagnosis.recommendation
    else:
        assert not diagnosis.fell_back


def test_automatic_window_chosen():
    """This contracting RNN's Jacobians expand near rest, so Newton's updates are
    rejected at first; the hopeless test now waits for the trust horizon to grow,
    so the automatic window converges over the whole sequence without narrowing
    and without the fallback, and the diagnosis reports that width."""
    f, init, xs = expanding_rnn(200)
    diagnosis = partime.diagnose(f, init, xs)
    assert diagnosis.kind == "predictable" and not diagnosis.fell_back
    assert diagnosis.lyapunov < 0 and diagnosis.num_steps == 200
    assert diagnosis.window == 200


def test_bad_calls():
    f, init, xs = problems["rnn"]
    with pytest.raises(TypeError, match="scan form"):
        partime.diagnose(f, init, xs, dt0=0.1)
    with pytest.raises(TypeError, match="dt0"):
        partime.diagnose(
            diffrax.ODETerm(_lorenz), 0.0, 1.0, jr.normal(jr.PRNGKey(0), (3,))
        )
