"""Clip embedders for evaluation: trained encoders and the two floors every report shows.

An embedder has `name`, `sample_rate` (Hz) and `embed_batch(waveform [batch, samples]) -> [batch, dim]`; one
that can batch clips of different lengths also has `embed_stream` (EncoderEmbedder), which `embed_task` uses.

- `EncoderEmbedder`: a frozen encoder (export or training workdir); clip embedding = time mean of
  its chunked frame features at the encoder's `layer` (audiojepa.models.encoder_layers). With layer="all"
  every layer comes from one pass: `embed_batch` gives [batch, depth, dim]. Its `embed_stream` shares
  batches of padded, masked chunks between clips of any lengths, so a task compiles a few fixed shapes
  (audiojepa.adapters.encoder, "Fixed shapes").
- `LogMelEmbedder` (`--encoder=logmel`): the mean and the std over time of the normalised log-mel,
  concatenated: [2 x n_mels].
- `random:<config>`: the config's encoder at random initialisation (seeded), through
  `EncoderEmbedder`: what the architecture gives before any training.

`embed_task` embeds every clip of a task with one of them, streaming; `fit_to_unit` and
`evar_crop_start` cut or pad a clip to a fixed duration first, as EVAR does (`unit_sec`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from audiojepa.adapters import encoder as encoder_lib
from audiojepa.data import audio_io, stats
from audiojepa.models import encoder_layers
from audiojepa.ops import frontend as frontend_lib

# Decoded clips held at once while embedding, beyond one batch per length: bounds memory on large tasks
# (FSD50K decoded whole would be ~25 GB of float32 at 16 kHz). With `embed_stream`, the chunk rows waiting.
MAX_BUFFERED_CLIPS = 2048


class EncoderEmbedder:
    def __init__(self, audio_encoder: encoder_lib.AudioEncoder, name: str):
        self.encoder = audio_encoder
        self.name = name
        self.sample_rate = audio_encoder.frontend.sample_rate

    @property
    def layer(self) -> int | str | None:
        """The encoder's `layer`: None (final output), its index, or "all"."""
        return self.encoder.layer

    def embed_batch(self, waveform: np.ndarray) -> np.ndarray:
        """[batch, samples] -> [batch, dim], or [batch, depth, dim] with layer="all"."""
        clips = self.encoder.embed_waveform(waveform)[1]
        return np.moveaxis(clips, 0, 1) if self.layer == encoder_layers.ALL else clips

    def embed_stream(self, clips: Iterable[tuple[Hashable, np.ndarray]], *, batch_size: int = 32,
                    max_buffered: int = MAX_BUFFERED_CLIPS) -> Iterator[tuple[Hashable, np.ndarray]]:
        """(key, waveform [samples]) pairs of any lengths -> (key, [dim] or [depth, dim]) pairs, as `embed_batch`
        of each clip alone gives them (to float32 rounding), in completion order: the encoder's streaming
        `clip_embeddings` (`batch_size` chunk rows per call, at most `max_buffered` rows waiting)."""
        return self.encoder.clip_embeddings(clips, batch_size=batch_size, max_waiting_rows=max_buffered)


class LogMelEmbedder:
    def __init__(self, params: frontend_lib.LogMelParams, norm_stats=stats.M2D_DEFAULT_STATS, name: str = "logmel"):
        self.params = params
        self.norm_stats = tuple(norm_stats)
        self.name = name
        self.sample_rate = params.sample_rate

    def embed_batch(self, waveform: np.ndarray) -> np.ndarray:
        lms = stats.normalize(frontend_lib.logmel_host(np.asarray(waveform, np.float32), self.params),
                              *self.norm_stats)
        return np.concatenate([lms.mean(axis=-1), lms.std(axis=-1)], axis=-1)


def random_encoder(config_arg: str, *, seed: int = 0) -> encoder_lib.AudioEncoder:
    """`configs/m2d.py:runlocal` -> that config's encoder with seeded random parameters."""
    import jax

    from audiojepa import config_utils, methods
    from audiojepa.data import resolve

    config = config_utils.load_config(config_arg)
    spec = resolve.resolve_data_spec(config.data)
    method_cls = methods.get_method(config.method)
    input_shape = methods.input_shape(method_cls, spec.frontend, spec.crop_frames)
    method = method_cls(config.model, input_shape=input_shape)
    return encoder_lib.AudioEncoder(config.method, config.model, input_shape, spec.frontend,
                                    (spec.norm_mean, spec.norm_std),
                                    methods.random_encoder_params(method, jax.random.key(seed)))


def make_embedder(spec: str, *, frontend: str = "m2d") -> EncoderEmbedder | LogMelEmbedder:
    """`--encoder` value -> embedder: a path (export or workdir), `logmel`, or `random:<config>`."""
    if spec == "logmel":
        return LogMelEmbedder(frontend_lib.get_preset(frontend))
    if spec.startswith("random:"):
        return EncoderEmbedder(random_encoder(spec[len("random:"):]), name=spec)
    return EncoderEmbedder(encoder_lib.load_encoder(spec), name=spec)


# -- fixed-duration clips (EVAR's unit_sec) -------------------------------------------------------------


def evar_crop_start(num_samples: int, unit_samples: int, *, random_crop: bool, rng: np.random.Generator) -> int:
    """First sample of a clip's `unit_samples` crop, as EVAR's `BaseRawAudioDataset.__getitem__` picks it.

    0 when the clip is not longer than the unit (it is padded instead) or without `random_crop` (EVAR's
    test split); else uniform in [0, num_samples - unit_samples), EVAR's `np.random.randint(l - unit)`
    (the last possible start is never drawn).
    """
    if num_samples <= unit_samples or not random_crop:
        return 0
    return int(rng.integers(0, num_samples - unit_samples))


def fit_to_unit(waveform: np.ndarray, unit_samples: int, *, start: int = 0) -> np.ndarray:
    """waveform [samples] -> [unit_samples]: `waveform[start:start + unit_samples]` when longer, else the
    clip followed by zeros (EVAR pads at the end)."""
    if unit_samples < 1:
        raise ValueError(f"unit_samples must be >= 1; got {unit_samples}")
    if len(waveform) >= unit_samples:
        if not 0 <= start <= len(waveform) - unit_samples:
            raise ValueError(f"crop start {start} leaves fewer than {unit_samples} of {len(waveform)} samples")
        return waveform[start:start + unit_samples]
    return np.concatenate([waveform, np.zeros(unit_samples - len(waveform), waveform.dtype)])


# -- embedding a task -----------------------------------------------------------------------------------


def embed_task(embedder, task, *, batch_size: int = 32, max_buffered_clips: int = MAX_BUFFERED_CLIPS,
               prepare: Callable[[int, np.ndarray], np.ndarray] | None = None,
               clip_indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Clip embeddings [n_kept, dim] (an every-layer embedder's: [n_kept, depth, dim]) of every clip of `task` (a
    tasks.Task), and the indices of the clips kept.

    One streaming pass. An embedder with `embed_stream` (EncoderEmbedder) batches clips of any lengths together:
    their chunks, padded to a few widths and masked, fill batches of `batch_size` chunk rows, so the encoder
    compiles a few fixed shapes however many lengths the task has (logged with the number of compiles), and
    at most `max_buffered_clips` chunk rows wait. Other embedders get clips batched by length (no padding:
    padding would change the time mean): a length's batch is embedded when it holds `batch_size` clips, and
    when more than `max_buffered_clips` are waiting, the fullest waiting batch goes early. Either way
    embeddings do not depend on batch composition (beyond float rounding). A clip that fails to load is
    skipped, counted in `task.skipped` (once) and left out of scoring, never given a fake value.

    Args:
      prepare: `prepare(clip index, waveform [samples]) -> waveform` applied to each decoded clip before
        embedding (e.g. a crop to a fixed duration); None leaves clips whole.
      clip_indices: embed only these clips (default: all).
    """
    indices = range(len(task.clip_ids)) if clip_indices is None else [int(i) for i in clip_indices]

    def loaded() -> Iterator[tuple[int, np.ndarray]]:
        for i in tqdm(indices, desc=f"{task.name}: embedding ({embedder.name})", unit="clip"):
            try:
                waveform = task.load_audio(i, embedder.sample_rate)
            except audio_io.BadAudioError as e:
                entry = {"path": task.clip_ids[i], "reason": e.reason}
                if entry not in task.skipped:  # once per clip, however many embedders or evaluations read it
                    task.skipped.append(entry)
                continue
            yield i, (waveform if prepare is None else prepare(i, waveform))

    audio_encoder = getattr(embedder, "encoder", None)
    compiles_before = getattr(audio_encoder, "compile_count", None)
    if hasattr(embedder, "embed_stream"):
        out = dict(embedder.embed_stream(loaded(), batch_size=batch_size, max_buffered=max_buffered_clips))
    else:
        out = _embed_by_length(embedder, loaded(), batch_size, max_buffered_clips)
    if compiles_before is not None:
        logging.info("%s: %d clips embedded by %s, %d encoder compiles (input shapes: %d so far)", task.name,
                     len(out), embedder.name, audio_encoder.compile_count - compiles_before,
                     audio_encoder.compile_count)
    kept = np.array(sorted(out), dtype=np.int64)
    if not len(kept):
        raise ValueError(f"{task.name}: no clip could be loaded ({len(task.skipped)} skipped)")
    return np.stack([out[i] for i in kept]), kept


def _embed_by_length(embedder, clips: Iterable[tuple[int, np.ndarray]], batch_size: int,
                     max_buffered_clips: int) -> dict[int, np.ndarray]:
    """{clip index: embedding} of (index, waveform) pairs through `embed_batch`, batched by length (embed_task)."""
    waiting: dict[int, list[tuple[int, np.ndarray]]] = {}  # length -> [(clip index, waveform)]
    out: dict[int, np.ndarray] = {}
    num_waiting = 0

    def embed(length: int) -> None:
        nonlocal num_waiting
        batch = waiting.pop(length)
        num_waiting -= len(batch)
        emb = embedder.embed_batch(np.stack([w for _, w in batch]))
        out.update(zip((i for i, _ in batch), np.asarray(emb, np.float32)))

    for i, waveform in clips:
        waiting.setdefault(waveform.shape[0], []).append((i, waveform))
        num_waiting += 1
        if len(waiting[waveform.shape[0]]) == batch_size:
            embed(waveform.shape[0])
        elif num_waiting > max_buffered_clips:
            embed(max(waiting, key=lambda length: len(waiting[length])))
    for length in sorted(waiting):  # the partial batches left
        embed(length)
    return out
