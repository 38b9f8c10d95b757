"""Pretraining methods. Each is a plain class built as
`Method(config.model, input_shape=(n_mels, frames), steps_per_epoch=None)` with init / loss /
update_targets / weight_decay_mask / encode (see audiojepa.methods.m2d.M2D)."""

from audiojepa.methods.jepa import JEPA
from audiojepa.methods.m2d import M2D
from audiojepa.methods.matpac import MATPAC

# Audio-JEPA (Tuncay et al.) is a configuration of "jepa" (configs/audio_jepa.py).
METHODS = {"m2d": M2D, "jepa": JEPA, "matpac": MATPAC}


def get_method(name: str):
    """The method class registered under `name` (e.g. config.method = "m2d")."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods: {sorted(METHODS)}.")
    return METHODS[name]


__all__ = ["JEPA", "M2D", "MATPAC", "METHODS", "get_method"]
