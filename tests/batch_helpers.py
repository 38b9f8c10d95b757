"""Shared by the pipeline tests: draw batches from an iterator and compare batch lists exactly."""

import jax
import numpy as np


def take(iterator, n: int) -> list[dict]:
    """The next `n` batches of `iterator`, as NumPy arrays."""
    return [jax.tree.map(np.array, next(iterator)) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    """Same number of batches, same keys, every array equal bit for bit."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
