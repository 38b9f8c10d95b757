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

Fixed shapes: XLA compiles the encoder once per input shape, so embedding clips of many lengths
(FSD50K: 0.3-30 s) at each chunk's own width would compile thousands of times. Instead every chunk is
zero-padded to the smallest of a few widths (`time_buckets`: powers of two of patches up to a full
chunk) and the patches past the chunk's end are masked out of attention (the method's
`encode(..., valid=)`; a CLS token stays valid) and their outputs dropped: the same features as the
per-length path, to float32 rounding (tests/test_bounded_compiles.py, 1e-5). Chunk rows of all clips
wait per bucket and are encoded `batch_size` at a time; a last partial batch is padded with zero rows
to a power of two (`padded_rows`). So embedding compiles at most len(time_buckets) x
(1 + ceil(log2(batch_size))) shapes whatever the clip lengths, and a streaming pass over a task (each
bucket: full batches, then one partial batch) at most 2 x len(time_buckets). `compile_count` counts them
(each trace of the encoder is one compile) and each new one is logged.

`layer` picks the encoder layer that embeds (audiojepa.models.encoder_layers): None (the default) the final
output, an int that block's output, "all" every layer from one pass, each feature then with a leading
[depth] axis. It is an evaluation choice: exports do not store it.

Waveform models (EncodecMAE) cut the waveform into chunks of the training crop, encode each chunk and
join the frame features in time; the clip embedding is again the time mean. A shorter last chunk is
encoded as at its own length rounded up to whole frames, as EncodecMAE's reference does, but in the same
fixed shapes: it is zero-padded to a time bucket of 75 Hz frames, EnCodec redoes its convs' reflect padding
at the row's own length (audiojepa.models.encodec, `num_samples`) and the MAE transformer masks the padding
frames out of attention (the method's `encode(..., valid=)`), so its frames are those of the chunk alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Hashable, Iterable, Iterator

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from einops.array_api import (  # the array-API entry: no framework lookup (never imports torch)
    rearrange,
    reduce,
)

from audiojepa import methods
from audiojepa.data import stats
from audiojepa.models import encoder_layers
from audiojepa.models.vit import stack_all_blocks
from audiojepa.ops import frontend as frontend_lib
from audiojepa.runtime import storage

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

# Chunk rows per encoder call when embedding (AudioEncoder.batch_size).
BATCH_SIZE = 32
# Chunk rows that may wait for their bucket's batch to fill before the fullest bucket goes early: only
# waveform models, whose buckets are exact last-chunk lengths, come near it (patch models wait at most
# len(time_buckets) x batch_size rows).
MAX_WAITING_ROWS = 2048


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


def time_buckets(chunk_frames: int, patch_frames: int) -> tuple[int, ...]:
    """The widths, in patches (time steps), that patch models' chunks are zero-padded to: the powers of two below
    a full chunk's steps, a full chunk's steps (chunk_frames // patch_frames) and, where a chunk is not whole
    patches, a shorter last chunk's largest count (ceil): 208-frame chunks, 16-frame patches: (1, 2, 4, 8, 13);
    608: (1, ..., 32, 38); 1001: (1, ..., 32, 62, 63). Padding at most doubles a last chunk's patches (about
    1.2x on average over evenly spread lengths), where the full chunk as the only bucket would make a 0.3 s
    clip cost as much as 6 s (608 frames: 2 of 38 steps)."""
    full, longest = chunk_frames // patch_frames, -(-chunk_frames // patch_frames)
    return tuple(sorted({1 << k for k in range(full.bit_length()) if 1 << k < full} | {full, longest}))


def padded_rows(num_rows: int, batch_size: int) -> int:
    """Rows of an encoder call of 1 <= num_rows <= batch_size chunks: the next power of two, at most batch_size
    (zero rows fill the rest)."""
    return min(int(batch_size), 1 << (int(num_rows) - 1).bit_length())


def patch_validity(valid_steps: jax.Array, grid_f: int, grid_t: int) -> jax.Array:
    """valid_steps [batch] int -> [batch, grid_f x grid_t] bool over frequency-major patch tokens (f·T' + t):
    True where t < valid_steps."""
    return jnp.tile(jnp.arange(grid_t)[None, :] < valid_steps[:, None], (1, grid_f))


def _counted_encode(method, traced: list) -> Callable:
    """method.encode (or encode_layers for layer="all") as one jitted function (params, x, valid_steps=None, *,
    layer) -> tokens, which appends x's shape to `traced` and logs it each time it is traced, i.e. compiled.

    valid_steps: None, or [batch] int: the time steps of each row that are content, of log-mels x [batch, n_mels,
    frames] (patches) or of waveforms x [batch, samples] (75 Hz frames); the rest is masked out of attention."""
    def encode(params, x, valid_steps=None, *, layer=None):
        traced.append(tuple(x.shape))
        logging.info("AudioEncoder: compiling the encoder for inputs %s (layer %s); %d shapes so far",
                     tuple(x.shape), layer, len(traced))
        kwargs = {}
        if valid_steps is not None and x.ndim == 2:  # waveforms: one step per frame_hop_samples
            kwargs["valid"] = jnp.arange(x.shape[1] // method.frame_hop_samples)[None, :] < valid_steps[:, None]
        elif valid_steps is not None:
            patch_f, patch_t = method.patch_size
            kwargs["valid"] = patch_validity(valid_steps, x.shape[1] // patch_f, x.shape[2] // patch_t)
        if layer == encoder_layers.ALL:
            return method.encode_layers(params, x, **kwargs)
        return method.encode(params, x, layer=layer, **kwargs)
    return jax.jit(encode, static_argnames="layer")


class _ChunkBatcher:
    """Encodes the chunks of many clips in batches of a few fixed shapes, streaming (AudioEncoder's core).

    A clip arrives as chunk rows (bucket, row, steps): `bucket` names the row's padded shape. Rows wait per
    bucket; a bucket is encoded when it holds `batch_size` rows, or, when more than `max_waiting` rows wait,
    the fullest goes early; `flush` encodes the rest. A clip is done once all its chunks are: its frame
    features joined in time, or with `pool` their time mean only (a running sum per chunk, so a waiting clip
    holds one embedding, not its features). Each row's output depends on its own content and the call's
    shape only, never on the other rows.
    """

    def __init__(self, encode_rows: Callable, batch_size: int, pool: bool, max_waiting: int = MAX_WAITING_ROWS):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size={batch_size}: need at least 1 chunk row per encoder call")
        self.encode_rows, self.batch_size, self.pool = encode_rows, int(batch_size), pool
        self.max_waiting = max(int(max_waiting), self.batch_size)
        self.queues: dict = {}  # bucket -> [(clip key, chunk index, row, steps)]
        self.parts: dict = {}  # clip key -> per chunk: features [..., steps, D], or with pool (sum [..., D], steps)
        self.remaining: dict = {}  # clip key -> chunks not encoded yet
        self.done: list = []
        self.num_waiting = 0

    def add(self, key: Hashable, rows: list) -> list[tuple[Hashable, np.ndarray]]:
        """Queues one clip's chunk rows; returns the clips completed, [(key, output)]."""
        if key in self.parts:
            raise ValueError(f"clip {key!r} given twice")
        if not rows:
            raise ValueError(f"clip {key!r} has no frames to encode")
        self.parts[key], self.remaining[key] = [None] * len(rows), len(rows)
        for index, (bucket, row, steps) in enumerate(rows):
            queue = self.queues.setdefault(bucket, [])
            queue.append((key, index, row, steps))
            self.num_waiting += 1
            if len(queue) == self.batch_size:
                self._encode(bucket)
            elif self.num_waiting > self.max_waiting:
                self._encode(max(self.queues, key=lambda b: len(self.queues[b])))
        return self._take_done()

    def flush(self) -> list[tuple[Hashable, np.ndarray]]:
        """Encodes every waiting row; returns the clips completed."""
        for bucket in list(self.queues):
            self._encode(bucket)
        return self._take_done()

    def _encode(self, bucket) -> None:
        queue = self.queues.pop(bucket)
        self.num_waiting -= len(queue)
        outputs = self.encode_rows([row for _, _, row, _ in queue], [steps for *_, steps in queue],
                                   padded_rows(len(queue), self.batch_size))
        for (key, index, _, steps), features in zip(queue, outputs):
            self.parts[key][index] = (features.sum(axis=-2, dtype=np.float64), steps) if self.pool else features
            self.remaining[key] -= 1
            if not self.remaining[key]:
                self.done.append(key)

    def _take_done(self) -> list[tuple[Hashable, np.ndarray]]:
        out = []
        for key in self.done:
            parts = self.parts.pop(key)
            del self.remaining[key]
            if self.pool:
                out.append((key, (sum(s for s, _ in parts) / sum(n for _, n in parts)).astype(np.float32)))
            else:
                out.append((key, np.concatenate(parts, axis=-2)))
        self.done = []
        return out


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
      batch_size: chunk rows per encoder call (module docstring: fixed shapes).
    """

    method_name: str
    model_config: ml_collections.ConfigDict
    input_shape: tuple[int, int]
    frontend: frontend_lib.LogMelParams
    norm_stats: tuple[float, float]
    params: dict
    freq_pooling: str = "concat"
    layer: int | str | None = None
    batch_size: int = BATCH_SIZE

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
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size={self.batch_size}: need at least 1 chunk row per encoder call")
        # One compile per input shape and layer used ("all" is one more), each noted in _traced; with_layer
        # copies share both.
        self._traced: list[tuple[int, ...]] = []
        self._encode = _counted_encode(self.method, self._traced)
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

    @property
    def compile_count(self) -> int:
        """Encoder input shapes compiled so far (by this encoder and its with_layer copies; a layer is its own)."""
        return len(self._traced)

    @property
    def traced_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The input shapes compiled so far, in order: [rows, n_mels, width] (waveform models: [rows, samples])."""
        return tuple(self._traced)

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(self.method.patch_size)

    @property
    def chunk_frames(self) -> int:
        """Log-mel frames per chunk (patch models)."""
        return int(self.input_shape[1])

    @property
    def time_buckets(self) -> tuple[int, ...]:
        """The chunk widths that chunks are padded to (`time_buckets` function): in patches, or for waveform
        models in frames of frame_hop_samples."""
        if self.is_waveform_model:
            return time_buckets(self.input_shape[0], self.method.frame_hop_samples)
        return time_buckets(self.chunk_frames, self.patch_size[1])

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
        # The final output's width (every layer's is the same), traced without the compiled function.
        x = jax.ShapeDtypeStruct((1, *self.input_shape), jnp.float32)
        per_patch = int(jax.eval_shape(self.method.encode, self.params, x).shape[-1])
        if self.is_waveform_model:
            return per_patch
        n_mels = self.input_shape[0]
        return per_patch if self.freq_pooling == "mean" else int(n_mels // self.patch_size[0]) * per_patch

    def waveform_frame_features(self, waveform: np.ndarray) -> np.ndarray:
        """Waveform models: [batch, samples] -> [batch, ceil(samples / hop), D] ([depth, ...] with layer="all"),
        chunked at the training crop.

        Each chunk is encoded on its own, the last (shorter) one at its own length rounded up to whole
        frames, as EncodecMAE's reference does (shared/reference/encodecmae.md §1.14): padding it to a
        full chunk would let its frames attend to the silence (the model has no padding mask). Full chunks
        share one compile; each distinct last-chunk length compiles once (module docstring).
        """
        waveform = np.atleast_2d(np.asarray(waveform, np.float32))
        return self._stacked_features(waveform, self._waveform_rows)

    def normalized_logmel(self, waveform: np.ndarray) -> np.ndarray:
        """waveform: [batch, samples] (or [samples]) at `frontend.sample_rate` -> [batch, n_mels, frames]."""
        waveform = np.atleast_2d(np.asarray(waveform, np.float32))
        lms = frontend_lib.logmel_host(waveform, self.frontend)
        return stats.normalize(lms, *self.norm_stats)

    def frame_features(self, lms: np.ndarray) -> np.ndarray:
        """Normalised log-mels [batch, n_mels, frames] (any frames >= 1) -> [batch, T', F x D] ([depth, batch,
        T', F x D] with layer="all").

        As M2D's runtime (shared/reference/m2d.md §5): chunks of `chunk_frames`; only a shorter last chunk is
        zero-padded, to whole patches. A full chunk whose width is not whole patches (80x1001 models) loses
        its last frames to the patch embedding's stride, as in the runtime: 1001 frames give 62 steps.
        Computed from padded, masked chunks in a few fixed shapes (module docstring): the same values.
        """
        lms = np.asarray(lms, np.float32)
        if lms.ndim != 3 or lms.shape[1] != self.input_shape[0]:
            raise ValueError(f"expected log-mels [batch, {self.input_shape[0]}, frames], got {lms.shape}")
        return self._stacked_features(lms, self._logmel_rows)

    def clip_embeddings(self, clips: Iterable[tuple[Hashable, np.ndarray]], *, batch_size: int | None = None,
                        max_waiting_rows: int = MAX_WAITING_ROWS) -> Iterator[tuple[Hashable, np.ndarray]]:
        """(key, waveform [samples] at `frontend.sample_rate`) pairs of any lengths -> (key, clip embedding [D],
        [depth, D] with layer="all") pairs, each as soon as its last chunk is encoded (not in input order).

        Streaming, for a whole task: the chunks of all clips are encoded in shared batches of `batch_size`
        rows (default self.batch_size), at most ~2 shapes per time bucket; memory is the waiting chunk rows
        (at most `max_waiting_rows`) and one embedding per waiting clip. Each embedding is the time mean of
        `embed_waveform`'s frame features of the clip alone, to float32 rounding.
        """
        batcher = _ChunkBatcher(self._encode_rows, batch_size or self.batch_size, pool=True,
                                max_waiting=max_waiting_rows)
        for key, waveform in clips:
            waveform = np.asarray(waveform, np.float32)
            if waveform.ndim != 1:
                raise ValueError(f"clip {key!r}: expected a waveform [samples], got shape {waveform.shape}")
            rows = self._waveform_rows(waveform) if self.is_waveform_model else \
                self._logmel_rows(self.normalized_logmel(waveform)[0])
            yield from batcher.add(key, rows)
        yield from batcher.flush()

    def _stacked_features(self, clips: np.ndarray, rows_of: Callable) -> np.ndarray:
        """Frame features of equal-length clips [batch, ...], through one _ChunkBatcher: [batch, T', D] ([depth,
        batch, T', D])."""
        if not len(clips):  # no clip: no encoder call
            lead = (self.num_layers,) if self.layer == encoder_layers.ALL else ()
            steps = sum(n for *_, n in rows_of(np.zeros(clips.shape[1:], np.float32)))
            return np.zeros((*lead, 0, steps, self.feature_dim), np.float32)
        batcher = _ChunkBatcher(self._encode_rows, self.batch_size, pool=False)
        features = {}
        for i, clip in enumerate(clips):
            features.update(batcher.add(i, rows_of(clip)))
        features.update(batcher.flush())
        return np.stack([features[i] for i in range(len(clips))], axis=-3)

    def _logmel_rows(self, lms: np.ndarray) -> list[tuple[int, np.ndarray, int]]:
        """One clip's normalised log-mel [n_mels, frames] -> its chunk rows (bucket, log-mel [n_mels, bucket x
        patch frames], steps): each chunk zero-padded to its time bucket; `steps` of its patches are content."""
        patch_t, rows = self.patch_size[1], []
        for start in range(0, lms.shape[1], self.chunk_frames):
            width = min(self.chunk_frames, lms.shape[1] - start)
            # A full chunk has the stride's whole patches (80x1001: 62); a shorter last one is padded to whole ones.
            steps = width // patch_t if width == self.chunk_frames else -(-width // patch_t)
            bucket = next(b for b in self.time_buckets if b >= steps)
            row = np.zeros((lms.shape[0], bucket * patch_t), np.float32)
            kept = min(width, steps * patch_t)
            row[:, :kept] = lms[:, start:start + kept]
            rows.append((bucket, row, steps))
        return rows

    def _waveform_rows(self, waveform: np.ndarray) -> list[tuple[int, np.ndarray, int]]:
        """Waveform models: one clip [samples] -> its chunk rows (bucket, waveform [bucket x hop], frames): each
        chunk zero-padded to whole frames (less than one hop, as the reference's last chunk), which are its
        content, then to its time bucket of frames, masked."""
        chunk, hop = self.input_shape[0], self.method.frame_hop_samples
        rows = []
        for start in range(0, waveform.shape[0], chunk):
            piece = waveform[start:start + chunk]
            frames = -(-piece.shape[0] // hop)
            bucket = next(b for b in self.time_buckets if b >= frames)
            row = np.zeros(bucket * hop, np.float32)
            row[:piece.shape[0]] = piece
            rows.append((bucket, row, frames))
        return rows

    def _encode_rows(self, rows: list[np.ndarray], steps: list[int], num_rows: int) -> list[np.ndarray]:
        """Chunk rows of one bucket (equal shapes) and their content steps -> each row's features [steps, D]
        ([depth, steps, D] with layer="all"), from one encoder call on `num_rows` rows (zero rows after them)."""
        x = np.zeros((num_rows, *rows[0].shape), np.float32)
        x[:len(rows)] = rows
        grid_t = (x.shape[1] // self.method.frame_hop_samples if self.is_waveform_model
                  else x.shape[2] // self.patch_size[1])
        valid_steps = np.full(num_rows, grid_t, np.int32)  # zero rows all valid: no row without a valid token
        valid_steps[:len(rows)] = steps
        if self.is_waveform_model:
            tokens = np.asarray(self._encode(self.params, x, valid_steps, layer=self.layer))
            return [tokens[..., i, :n, :].copy() for i, n in enumerate(steps)]
        tokens = np.asarray(self._encode(self.params, x, valid_steps, layer=self.layer))
        tokens = tokens[..., getattr(self.method, "num_prefix_tokens", 1):, :]
        grid_f = x.shape[1] // self.patch_size[0]
        # Tokens are frequency-major (f·t' + t); leading axes [rows] or [depth, rows]. Each time step: its F
        # frequency patches concatenated, or their mean.
        if self.freq_pooling == "mean":
            per_step = reduce(tokens, "... (f t) d -> ... t d", "mean", f=grid_f)
        else:
            per_step = rearrange(tokens, "... (f t) d -> ... t (f d)", f=grid_f)
        return [per_step[..., i, :n, :].copy() for i, n in enumerate(steps)]

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

        `output_dir` may be a URL (gs://..., any etils.epath scheme; audiojepa.runtime.storage). Refuses a training
        workdir (its checkpoints would be shadowed: `load_encoder` could not tell which to read). Each file is
        written whole (storage.write_atomically: locally beside itself and swapped into place; on an object store
        in one write), params first; encoder.json holds the params' SHA-256, so a load after a crash between the
        two, or of a truncated copy, fails naming the file instead of reading mismatched weights.
        """
        if storage.isdir(storage.join(output_dir, CHECKPOINTS_DIR)):
            raise ValueError(f"{output_dir} is a training workdir (it holds {CHECKPOINTS_DIR}/): an export there "
                             "would shadow its checkpoints; give another --output, e.g. a subfolder")
        storage.makedirs(output_dir)
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
        storage.write_atomically(storage.join(output_dir, PARAMS_FILE), params_bytes)
        storage.write_atomically(storage.join(output_dir, ENCODER_JSON), json.dumps(meta, indent=1).encode())
        return output_dir


def _read_exported_params(path: str, meta: dict) -> dict:
    """The params of an export folder `path`, checked against encoder.json's SHA-256 (exports since 2026-12);
    errors name the file."""
    params_path = storage.join(path, PARAMS_FILE)
    data = storage.read_bytes(params_path)
    expected = meta.get("params_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(f"{params_path} does not match {storage.join(path, ENCODER_JSON)} (its SHA-256 differs: a "
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
    from audiojepa.runtime import checkpointing

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
    path = storage.join(workdir, "run_summary.json")  # training.run_summary.SUMMARY_FILE (a layer above this one)
    try:
        summary = json.loads(storage.read_text(path))
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
    is_export = storage.exists(storage.join(path, ENCODER_JSON))
    is_workdir = storage.isdir(storage.join(path, CHECKPOINTS_DIR))
    if is_export and is_workdir:
        raise ValueError(f"{path} holds both an exported encoder ({ENCODER_JSON}) and a training workdir "
                         f"({CHECKPOINTS_DIR}/), so which to load is ambiguous; move the export to its own folder "
                         f"(or delete {ENCODER_JSON} and {PARAMS_FILE}) to load the checkpoints")
    if is_export:
        meta = json.loads(storage.read_text(storage.join(path, ENCODER_JSON)))
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
