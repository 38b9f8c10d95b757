"""Pretraining methods. Each is a plain class built as `Method(config.model, input_shape=(n_mels, frames))`
with init / loss / update_targets / weight_decay_mask / encode (see audiojepa.methods.m2d.M2D)."""

from audiojepa.methods.m2d import M2D

METHODS = {"m2d": M2D}


def get_method(name: str):
    """The method class registered under `name` (e.g. config.method = "m2d")."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods: {sorted(METHODS)}.")
    return METHODS[name]


__all__ = ["M2D", "METHODS", "get_method"]
