import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)


@pytest.fixture
def getkey():
    """Fresh PRNG keys, deterministic per test."""
    key = jr.PRNGKey(5678)

    def _getkey():
        nonlocal key
        key, subkey = jr.split(key)
        return subkey

    return _getkey
