import gc

import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Frees each test module's compiled executables when the module is done.

    Every XLA:CPU executable keeps its own memory mappings alive; the whole suite in
    one process otherwise exceeds Linux's default `vm.max_map_count` (65530), and
    the next compilation crashes with a segmentation fault.
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def getkey():
    """Fresh PRNG keys, deterministic per test."""
    key = jr.PRNGKey(5678)

    def _getkey():
        nonlocal key
        key, subkey = jr.split(key)
        return subkey

    return _getkey
