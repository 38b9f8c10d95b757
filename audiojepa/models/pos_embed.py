"""Fixed 2-D sine-cosine position tables for a (frequency, time) patch grid.

The tables are NumPy constants, not parameters: a model adds them inside its forward pass, so optimizers,
weight decay and EMA never see them. Every row depends only on its own (frequency, time) index, so the
table of a shorter input is exactly the first columns of a longer one; this is why an encoder can rebuild
the table from the input's own grid instead of truncating a stored one.
"""

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """Sine-cosine codes of integer positions.

    Args:
        dim: even number of output channels.
        positions: [n] positions (any integer or float values).

    Returns:
        [n, dim] float64: the first dim/2 channels are sin(p·ω_i), the last dim/2 are cos(p·ω_i),
        with ω_i = 1 / 10000^(i / (dim/2)) for i < dim/2.
    """
    if dim % 2:
        raise ValueError(f"sin-cos code width must be even, got {dim}.")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.asarray(positions, dtype=np.float64).reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(grid_freq: int, grid_time: int, dim: int, cls_token: bool = True) -> np.ndarray:
    """Position table for a frequency-major patch grid, as used by M2D/MAE.

    Args:
        grid_freq: number of patch rows (frequency), F.
        grid_time: number of patch columns (time), T'.
        dim: channels; a multiple of 4.
        cls_token: prepend an all-zero row for the CLS slot.

    Returns:
        [(1 if cls_token else 0) + F·T', dim] float32. Row f·T' + t (after the CLS row) holds the code of
        the time index t in channels [0, dim/2) and of the frequency index f in channels [dim/2, dim).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos tables need a width divisible by 4, got {dim}.")
    freq_index, time_index = np.meshgrid(np.arange(grid_freq), np.arange(grid_time), indexing="ij")
    table = np.concatenate(
        [sincos_1d(dim // 2, time_index.reshape(-1)), sincos_1d(dim // 2, freq_index.reshape(-1))], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table.astype(np.float32)
