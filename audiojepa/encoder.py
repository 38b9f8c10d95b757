"""Frozen encoders: exporting them, loading them, and embedding audio of any length.

An exported encoder is a folder with `encoder.json` (method, model config, training input shape,
front end, normalisation statistics) and `params.msgpack` (the encoder's params). `load_encoder`
reads such a folder or a training workdir (its latest checkpoint), so evaluation never asks the
user to re-type how the encoder was trained.

Patch models (M2D, JEPA, MATPAC) embed a log-mel of any length as the official M2D runtime does:
cut it into chunks of the training width, zero-pad the last chunk to whole patches, encode each
chunk (positions restart at 0), concatenate the frequency patches of each time step
(`[T', n_freq_patches x dim]`, one row per patch width of frames) and join the chunks in time.
The clip embedding is the mean over time.

`layer` picks the encoder layer that embeds (audiojepa.models.encoder_layers): None (the default) the final
output, an int that block's output, "all" every layer from one pass, each feature then with a leading
[depth] axis. It is an evaluation choice: exports do not store it.

Waveform models (EncodecMAE) cut the waveform into chunks of the training crop (the last one
zero-padded to a full chunk and its extra frames dropped), encode each chunk and join the frame
features in time; the clip embedding is again the time mean.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from audiojepa import frontend as frontend_lib
from audiojepa import methods
from audiojepa.data import stats
from audiojepa.models import encoder_layers
from audiojepa.models.vit import stack_all_blocks

ENCODER_JSON = "encoder.json"
PARAMS_FILE = "params.msgpack"
CHECKPOINTS_DIR = "checkpoints"  # a training workdir's checkpoint folder (checkpointing.checkpoint_dir)
# 2: transformer blocks stored stacked (vit.TransformerStack); 1 (per-block blocks_<i>) is read and stacked.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)


# How a patch model's F frequency patches per time step become one frame feature: concatenated (F x D, the
# M2D runtime's features) or averaged (D: its HEAR timestamp embeddings, Audio-JEPA's X-ARES encoder).
FREQ_POOLINGS = ("concat", "mean")

# Training-only compute settings and what embeddings use instead: float32 as the reference runtimes,
# XLA attention (cuDNN's needs an NVIDIA GPU and bfloat16), no rematerialisation (no backward pass).
INFERENCE_COMPUTE = {"dtype": "float32", "attention_impl": None, "remat": "none"}


def inference_model_config(model_config):
    """A copy of `config.model` with INFERENCE_COMPUTE in place of its training compute settings (the params
    are the same whatever those are), so an encoder trained in bfloat16 with cuDNN attention embeds in
    float32 on any backend. The stored `model_config` is left as trained."""
    config = model_config.copy_and_resolve_references() if hasattr(model_config, "copy_and_resolve_references") \
        else ml_collections.ConfigDict(dict(model_config))
    with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
        for key, value in INFERENCE_COMPUTE.items():
            if key in config:
                config[key] = value
    return config


@dataclasses.dataclass
class AudioEncoder:
    """A frozen encoder with the front end and normalisation it was trained with.

    Attributes:
      method_name: e.g. "m2d".
      model_config: the method's `config.model`.
      input_shape: (n_mels, frames) of the training crops, `frames` being the chunk width; for
        waveform methods (num_samples,), the chunk length in samples.
      frontend: the log-mel parameters (for waveform methods: the sample rate and frame grid).
      norm_stats: (mean, std) of log-mel values used to normalise inputs (unused by waveform methods).
      params: what the method's `encode` takes (`methods.encoder_params`; {"encoder": ...} for patch models).
      freq_pooling: FREQ_POOLINGS.
      layer: the layer that embeds: None (final output), an int in [-num_layers, num_layers) or "all" (every
        layer; frame features [depth, batch, T', D], clip embeddings [depth, batch, D]); module docstring.
    """

    method_name: str
    model_config: ml_collections.ConfigDict
    input_shape: tuple[int, int]
    frontend: frontend_lib.LogMelParams
    norm_stats: tuple[float, float]
    params: dict
    freq_pooling: str = "concat"
    layer: int | str | None = None

    def __post_init__(self):
        if self.freq_pooling not in FREQ_POOLINGS:
            raise ValueError(f"freq_pooling={self.freq_pooling!r}; valid: {FREQ_POOLINGS}")
        self.input_shape = tuple(int(n) for n in self.input_shape)
        model_shape = self.input_shape
        patch = self.model_config.get("patch_size")
        if patch and len(model_shape) == 2:  # 80x1001: the model sees the whole patches of a chunk
            model_shape = (model_shape[0], model_shape[1] // int(patch[1]) * int(patch[1]))
        self.method = methods.get_method(self.method_name)(inference_model_config(self.model_config),
                                                           input_shape=model_shape)
        self.layer = encoder_layers.check_layer_choice(self.layer, self.num_layers)
        # One compile per layer used (and input shape); "all" is one more.
        self._encode = jax.jit(self.method.encode, static_argnames="layer")
        self._encode_layers = jax.jit(self.method.encode_layers)
        self.is_waveform_model = methods.input_kind(self.method) == "waveform"
        if "encodec" in self.params and hasattr(self.method, "set_encodec_params"):
            self.method.set_encodec_params(self.params["encodec"])  # no need for the EnCodec checkpoint file

    @property
    def num_layers(self) -> int:
        """The evaluated encoder's depth: the layers `layer` can pick."""
        return int(self.method.encoder_depth)

    def with_layer(self, layer: int | str | None) -> AudioEncoder:
        """This encoder embedding with `layer` (checked), sharing the method, params and compiled functions."""
        out = copy.copy(self)
        out.layer = encoder_layers.check_layer_choice(layer, self.num_layers)
        return out

    def _tokens(self, params, x):
        """The method's encode of x at self.layer: [batch, tokens, D], or [depth, batch, tokens, D] for "all";
        under jax.eval_shape too."""
        if self.layer == encoder_layers.ALL:
            return self._encode_layers(params, x)
        return self._encode(params, x, layer=self.layer)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.method.patch_size)

    @property
    def chunk_frames(self) -> int:
        """Log-mel frames per chunk (patch models)."""
        return int(self.input_shape[1])

    @property
    def frame_hop_seconds(self) -> float:
        """Time between consecutive frame features: one patch width of log-mel frames, or one frame of a
        waveform model."""
        if self.is_waveform_model:
            return self.method.frame_hop_samples / self.frontend.sample_rate
        return self.patch_size[1] * self.frontend.hop_length / self.frontend.sample_rate

    @property
    def feature_dim(self) -> int:
        """D of the frame features [batch, T', D] (of each layer's with layer="all"), from shapes only (no
        compile)."""
        if self.is_waveform_model:
            x = jax.ShapeDtypeStruct((1, self.input_shape[0]), jnp.float32)
            return int(jax.eval_shape(self._tokens, self.params, x).shape[-1])
        n_mels, chunk_frames = self.input_shape
        tokens = jax.eval_shape(self._tokens, self.params, jax.ShapeDtypeStruct((1, n_mels, chunk_frames),
                                                                                jnp.float32))
        per_patch = int(tokens.shape[-1])
        return per_patch if self.freq_pooling == "mean" else int(n_mels // self.patch_size[0]) * per_patch

    def waveform_frame_features(self, waveform: np.ndarray) -> np.ndarray:
        """Waveform models: [batch, samples] -> [batch, ceil(samples / hop), D] ([depth, ...] with layer="all"),
        chunked at the training crop.

        Each chunk is encoded on its own, the last (shorter) one at its own length rounded up to whole
        frames, as EncodecMAE's reference does (shared/reference/encodecmae.md §1.14): padding it to a
        full chunk would let its frames attend to the silence. Each distinct last-chunk length compiles
        once (clips of one length: one extra compile).
        """
        waveform = np.atleast_2d(np.asarray(waveform, np.float32))
        chunk, hop = self.input_shape[0], self.method.frame_hop_samples
        outputs = []
        for start in range(0, waveform.shape[1], chunk):
            piece = waveform[:, start:start + chunk]
            frames = -(-piece.shape[1] // hop)
            if piece.shape[1] < frames * hop:  # less than one hop of zeros, where EnCodec would pad anyway
                piece = np.pad(piece, ((0, 0), (0, frames * hop - piece.shape[1])))
            outputs.append(np.asarray(self._tokens(self.params, jnp.asarray(piece)))[..., :frames, :])
        return np.concatenate(outputs, axis=-2)

    def normalized_logmel(self, waveform: np.ndarray) -> np.ndarray:
        """waveform: [batch, samples] (or [samples]) at `frontend.sample_rate` -> [batch, n_mels, frames]."""
        waveform = np.atleast_2d(np.asarray(waveform, np.float32))
        lms = frontend_lib.logmel_host(waveform, self.frontend)
        return stats.normalize(lms, *self.norm_stats)

    def _encode_chunk(self, chunk: np.ndarray) -> np.ndarray:
        """chunk: [batch, n_mels, t] with t a multiple of the patch width -> [batch, t', F x D] ([depth, ...]
        with layer="all")."""
        tokens = np.asarray(self._tokens(self.params, jnp.asarray(chunk)))
        tokens = tokens[..., getattr(self.method, "num_prefix_tokens", 1):, :]
        *lead, _, dim = tokens.shape  # lead: [batch] or [depth, batch]
        grid_f, grid_t = chunk.shape[1] // self.patch_size[0], chunk.shape[2] // self.patch_size[1]
        # Tokens are frequency-major (f·t' + t): [B, F, t', D] -> [B, t', F, D] -> [B, t', F·D] (or the mean
        # over F: [B, t', D]).
        per_step = np.swapaxes(tokens.reshape(*lead, grid_f, grid_t, dim), -3, -2)
        if self.freq_pooling == "mean":
            return per_step.mean(axis=-2)
        return per_step.reshape(*lead, grid_t, grid_f * dim)

    def frame_features(self, lms: np.ndarray) -> np.ndarray:
        """Normalised log-mels [batch, n_mels, frames] (any frames >= 1) -> [batch, T', F x D] ([depth, batch,
        T', F x D] with layer="all").

        As M2D's runtime (shared/reference/m2d.md §5): chunks of `chunk_frames`; only a shorter last chunk is
        zero-padded, to whole patches. A full chunk whose width is not whole patches (80x1001 models) loses
        its last frames to the patch embedding's stride, as in the runtime: 1001 frames give 62 steps.
        """
        lms = np.asarray(lms, np.float32)
        if lms.ndim != 3 or lms.shape[1] != self.input_shape[0]:
            raise ValueError(f"expected log-mels [batch, {self.input_shape[0]}, frames], got {lms.shape}")
        patch_t = self.patch_size[1]
        outputs = []
        for start in range(0, lms.shape[2], self.chunk_frames):
            chunk = lms[:, :, start:start + self.chunk_frames]
            pad = -chunk.shape[2] % patch_t if chunk.shape[2] < self.chunk_frames else 0
            if pad:
                chunk = np.pad(chunk, ((0, 0), (0, 0), (0, pad)))
            outputs.append(self._encode_chunk(chunk))
        return np.concatenate(outputs, axis=-2)

    def clip_embedding(self, lms: np.ndarray) -> np.ndarray:
        """[batch, n_mels, frames] -> [batch, F x D] ([depth, ...] with layer="all"): the time mean of
        `frame_features`."""
        return self.frame_features(lms).mean(axis=-2)

    def embed_waveform(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """waveform [batch, samples] -> (frame features [batch, T', D], clip embeddings [batch, D]);
        D = F x token width for patch models; with layer="all" each has a leading [depth] axis."""
        if self.is_waveform_model:
            features = self.waveform_frame_features(waveform)
        else:
            features = self.frame_features(self.normalized_logmel(waveform))
        return features, features.mean(axis=-2)

    def save(self, output_dir: str, *, source: str = "") -> str:
        """Writes `encoder.json` and `params.msgpack` into `output_dir`; returns the folder. (Not `layer` or
        `freq_pooling`: evaluation choices, given to `load_encoder`.)

        Refuses a training workdir (its checkpoints would be shadowed: `load_encoder` could not tell which
        to read). Each file is written beside itself and swapped into place, params first; encoder.json holds
        the params' SHA-256, so a load after a crash between the two swaps, or of a truncated copy, fails
        naming the file instead of reading mismatched weights.
        """
        if os.path.isdir(os.path.join(output_dir, CHECKPOINTS_DIR)):
            raise ValueError(f"{output_dir} is a training workdir (it holds {CHECKPOINTS_DIR}/): an export there "
                             "would shadow its checkpoints; give another --output, e.g. a subfolder")
        os.makedirs(output_dir, exist_ok=True)
        params_bytes = flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, self.params))
        meta = {
            "format_version": FORMAT_VERSION,
            "method": self.method_name,
            "model": self.model_config.to_dict(),
            "input_shape": list(self.input_shape),
            "frontend": self.frontend.to_dict(),
            "norm_stats": list(self.norm_stats),
            "source": source,
            "params_sha256": hashlib.sha256(params_bytes).hexdigest(),
        }
        _write_atomically(os.path.join(output_dir, PARAMS_FILE), params_bytes)
        _write_atomically(os.path.join(output_dir, ENCODER_JSON), json.dumps(meta, indent=1).encode())
        return output_dir


def _write_atomically(path: str, data: bytes) -> None:
    """Writes `data` to `path` through a temporary file beside it (flushed to disk), then os.replace."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def _read_exported_params(path: str, meta: dict) -> dict:
    """The params of an export folder `path`, checked against encoder.json's SHA-256 (exports since 2026-12);
    errors name the file."""
    params_path = os.path.join(path, PARAMS_FILE)
    with open(params_path, "rb") as f:
        data = f.read()
    expected = meta.get("params_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{params_path} does not match {os.path.join(path, ENCODER_JSON)} (its SHA-256 differs: a "
                         "truncated or damaged copy, or an export interrupted between its two files); export again")
    try:
        return flax.serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001 - msgpack raises several types; all mean the same to the user
        raise ValueError(f"{params_path}: not a readable params file ({type(e).__name__}: {e}); truncated or "
                         "damaged? export again") from e


def restore_train_state(workdir: str, step: int | None = None):
    """(method, state, meta) of a training run's latest intact (or given) checkpoint, on the first local device.
    A damaged latest checkpoint (its digests differ, or it cannot be read) is skipped with a warning naming it;
    a damaged `step` is an error naming it.

    `state` is the whole train state {"step", "params", "target_params", "opt_state"} as nested dicts and
    lists (its structure and shapes are read from the checkpoint, so nothing the run's init would read, such
    as EncodecMAE's stage-1 params file, is needed); `method` is built from the run's config and input shape.
    """
    from audiojepa import checkpointing

    requested_step = step
    step, meta = checkpointing.restore_meta(workdir, step)
    config = ml_collections.ConfigDict(meta["config"])
    frontend = frontend_lib.LogMelParams.from_dict(meta["frontend"])
    method_cls = methods.get_method(meta["method"])
    input_shape = methods.input_shape(method_cls, frontend, meta["crop_frames"])
    method = method_cls(config.model, input_shape=input_shape)
    manager = checkpointing.make_manager(workdir, every_steps=1, read_only=True)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def abstract(at_step):  # the saved state's own structure, on this process's first device
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            manager.item_metadata(at_step)["state"])

    try:
        if requested_step is None:  # the latest checkpoint that reads back as saved (a damaged one: a warning)
            step, state, meta = checkpointing.restore_latest_intact(manager, abstract)
        else:
            state, meta = checkpointing.restore_verified(manager, step, abstract)
    finally:
        manager.close()
    return method, state, meta


def _warn_if_unfinished(workdir: str, step: int) -> None:
    """Logs a warning when the run's `run_summary.json` says it did not finish (failed, stopped, preempted, or
    still running / killed), naming the status, the error and the step whose weights are used."""
    path = os.path.join(workdir, "run_summary.json")  # train.SUMMARY_FILE (this module does not import train)
    try:
        with open(path) as f:
            summary = json.load(f)
    except FileNotFoundError:
        logging.warning("%s has no run_summary.json (a run still going, or killed before it wrote one); using its "
                        "checkpoint at step %d", workdir, step)
        return
    except (OSError, ValueError) as e:
        logging.warning("%s: unreadable (%s); using the checkpoint at step %d", path, e, step)
        return
    if not summary.get("finished"):
        error = f": {summary['error']}" if summary.get("error") else ""
        logging.warning("the run in %s is not finished (status %s at step %s of %s%s); using its checkpoint at "
                        "step %d", workdir, summary.get("status", "unknown"), summary.get("step"),
                        summary.get("total_steps"), error, step)


def _from_workdir(workdir: str, step: int | None, freq_pooling: str, layer: int | str | None) -> AudioEncoder:
    """The evaluated encoder (methods.encoder_params: online, or the EMA target where the method says so) of a
    training run's latest (or given) checkpoint."""
    method, state, meta = restore_train_state(workdir, step)
    _warn_if_unfinished(workdir, int(state["step"]))
    frontend = frontend_lib.LogMelParams.from_dict(meta["frontend"])
    return AudioEncoder(meta["method"], method.config, methods.input_shape(method, frontend, meta["crop_frames"]),
                        frontend, tuple(meta["norm_stats"]),
                        methods.encoder_params(method, state["params"], state["target_params"]), freq_pooling, layer)


def load_encoder(path: str, *, step: int | None = None, freq_pooling: str = "concat",
                 layer: int | str | None = None) -> AudioEncoder:
    """Loads an exported encoder folder, or the latest (or `step`) checkpoint of a training workdir;
    `freq_pooling` (FREQ_POOLINGS) is how its frame features pool the frequency patches, `layer` which layer
    embeds (AudioEncoder.layer; None: the final output)."""
    is_export = os.path.exists(os.path.join(path, ENCODER_JSON))
    is_workdir = os.path.isdir(os.path.join(path, CHECKPOINTS_DIR))
    if is_export and is_workdir:
        raise ValueError(f"{path} holds both an exported encoder ({ENCODER_JSON}) and a training workdir "
                         f"({CHECKPOINTS_DIR}/), so which to load is ambiguous; move the export to its own folder "
                         f"(or delete {ENCODER_JSON} and {PARAMS_FILE}) to load the checkpoints")
    if is_export:
        with open(os.path.join(path, ENCODER_JSON)) as f:
            meta = json.load(f)
        version = meta.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"{path}/{ENCODER_JSON}: format_version {version!r}, this code reads "
                             f"{READABLE_FORMAT_VERSIONS}")
        params = _read_exported_params(path, meta)
        if version == 1:
            params = stack_all_blocks(params)
        return AudioEncoder(meta["method"], ml_collections.ConfigDict(meta["model"]), tuple(meta["input_shape"]),
                            frontend_lib.LogMelParams.from_dict(meta["frontend"]), tuple(meta["norm_stats"]),
                            params, freq_pooling, layer)
    if is_workdir:
        return _from_workdir(path, step, freq_pooling, layer)
    raise FileNotFoundError(f"{path} is neither an exported encoder (no {ENCODER_JSON}) nor a training "
                            "workdir (no checkpoints/)")
