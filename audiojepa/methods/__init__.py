"""Pretraining methods. Each is a plain class built as
`Method(config.model, input_shape=..., steps_per_epoch=None)` with init / loss / update_targets /
weight_decay_mask / encode (see audiojepa.methods.m2d.M2D).

Log-mel methods (the default, `input_kind = "logmel"`) take input_shape (n_mels, frames) and
batch["lms"]; waveform methods (`input_kind = "waveform"`, EncodecMAE) take (num_samples,) and
batch["waveform"]. A method that can also train on precomputed shards (EncodecMAE on EnCodec targets) lists
their manifest kinds in `precomputed_kinds` and checks a manifest with `check_precomputed(manifest, path)`
(`check_data`). A method may define `encoder_params(params, target_params)`: the tree its `encode`
needs (default {"encoder": params["encoder"]}), which is what an exported encoder holds."""

from audiojepa.methods.encodecmae import EncodecMAE
from audiojepa.methods.jepa import JEPA
from audiojepa.methods.m2d import M2D
from audiojepa.methods.matpac import MATPAC

# Audio-JEPA (Tuncay et al.) is a configuration of "jepa" (configs/audio_jepa.py).
METHODS = {"m2d": M2D, "jepa": JEPA, "matpac": MATPAC, "encodecmae": EncodecMAE}


def get_method(name: str):
    """The method class registered under `name` (e.g. config.method = "m2d")."""
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; valid methods: {sorted(METHODS)}.")
    return METHODS[name]


__all__ = ["JEPA", "M2D", "MATPAC", "EncodecMAE", "METHODS", "get_method", "input_kind", "input_shape",
           "encoder_params", "check_data"]


def input_kind(method) -> str:
    """"logmel" or "waveform": what the method's loss and encode take (a class or an instance)."""
    return getattr(method, "input_kind", "logmel")


def input_shape(method, frontend, crop_frames: int) -> tuple[int, ...]:
    """The method's `input_shape` for training crops of `crop_frames` frames of `frontend`:
    (n_mels, crop_frames) for log-mel methods, (num_samples,) for waveform methods."""
    if input_kind(method) == "waveform":
        return (frontend.num_samples_for_frames(crop_frames),)
    return (frontend.n_mels, int(crop_frames))


def encoder_params(method, params, target_params=None):
    """The params `method.encode` needs, as an exported encoder stores them."""
    if hasattr(method, "encoder_params"):
        return method.encoder_params(params, target_params)
    return {"encoder": params["encoder"]}


def random_encoder_params(method, rng):
    """`encoder_params` of `method` freshly initialised from `rng`: the evaluation's random-init floor. A method
    whose init can start from trained weights (EncodecMAE's self-training starts from stage 1) defines
    `random_encoder_params` so that the floor is never a trained encoder."""
    if hasattr(method, "random_encoder_params"):
        return method.random_encoder_params(rng)
    return encoder_params(method, *method.init(rng))


def check_data(name: str, method, spec) -> None:
    """Raises unless method `name` (config.method) can train on the shards `spec` (a pipeline.DataSpec) describes.

    Waveform shards suit every method; precomputed shards (spec.kind, e.g. "encodec_targets") only a
    method whose `precomputed_kinds` holds that kind, after its `check_precomputed` accepts the manifest.
    """
    if spec.kind == "waveform":
        return
    if spec.kind not in getattr(method, "precomputed_kinds", ()):
        takers = sorted(n for n, cls in METHODS.items() if spec.kind in getattr(cls, "precomputed_kinds", ()))
        raise ValueError(f"config.method={name!r} cannot train on the precomputed {spec.kind!r} shards of "
                         f"{spec.manifest_path} (config.data.shards); only {takers} can. Point config.data.shards "
                         "at waveform shards (tools/make_shards.py) for this method.")
    method.check_precomputed(spec.manifest, spec.manifest_path)
