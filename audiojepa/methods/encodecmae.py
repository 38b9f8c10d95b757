"""EncodecMAE (Pepino et al.): a masked autoencoder over EnCodec frames that predicts EnCodec's RVQ codes.

Per step: a 24 kHz waveform → the frozen EnCodec encoder → continuous frames [batch, T, 128] at 75 Hz
(T = 300 for 4 s) → RVQ codes of the first n_q = 8 codebooks [batch, T, 8] (the targets). Exactly
⌊mask_prop·T⌋ frames are masked in spans of `mask_span` frames (`audiojepa.ops.masking.span_mask_1d`);
the encoder sees the visible frames only, a 2-layer decoder fills in the rest, and one classifier per
codebook predicts every frame's code. The loss is the γ_q-weighted cross-entropy with weight δ on
masked and 1 − δ on visible frames (`audiojepa.methods.encodecmae_loss`). Model pieces:
`audiojepa.models.encodecmae`. Facts and line references: shared/reference/encodecmae.md §1.

Inputs (`input_kind = "waveform"`: the trainer passes raw 24 kHz waveforms, not log-mels):
    batch["waveform"]: [batch, samples] float32 at 24 kHz, mono, not normalised. EnCodec features and
        codes are then computed on device inside the step, from the frozen params in target_params.
    Precomputed ("tool" path: tools/precompute_encodec_targets.py writes shards whose pipeline yields
    features and codes; the trainer passes them on, `precomputed_kinds`), any subset of:
    batch["features"]: [batch, T, 128] EnCodec frames (replaces the waveform);
    batch["codes"]: [batch, T, >= n_q] int codes (the first n_q are used; else RVQ of the features);
    batch["kmeans_ids"]: [batch, T] int cluster ids (self-training; else the teacher computes them).
    Both paths give the same loss for the same audio (tests/test_encodecmae.py).

Where the frozen networks live: `target_params` (never trained; `update_targets` returns it unchanged,
EncodecMAE has no EMA):
    "encodec": {"encoder": EncodecEncoder params, "codebooks": [n_q, 1024, 128]} (only the codebooks
        used), read in the constructor from `config.encodec_checkpoint` (a folder written by
        tools/convert_encodec.py, or a .npz/.th/.pt EnCodec state dict, converted by
        audiojepa.models.encodec_torch), or, when that is empty, seeded random weights (a smoke test
        only: random codebooks on a random encoder give near-constant, meaningless codes).
    Self-training only: "teacher": the frozen teacher's `input_proj`, `encoder_positions` and `encoder`
        params (the stage-1 model's, or another run's of any size: teacher_* keys below), and
        "centroids": [k, D_teacher] k-means centroids of the teacher's features.
    The EnCodec params are also kept on the method (`encodec_params`) for `encode`.

Self-training stage (§1.13), `targets` = "codes+kmeans" (v1: codes and a k-means stream whose weight
equals Σ γ_q = 1, with its own head) or "kmeans" (v2: k-means targets only, a fresh head). The reference
runs the frozen stage-1 model (the *teacher*, not the model being trained) on each crop with no
masking, takes the last encoder layer's x0 (`EncodecMAEModel.cluster_features`), fits 1024-means on
10,000 of those frames (sklearn defaults; here audiojepa.ops.kmeans.kmeans) and labels every frame with the
nearest centroid. The labels come from the frozen teacher, so they do not move while the student
trains; the reference dumps them once for a fixed set of crops (pass them as batch["kmeans_ids"]),
while computing them in the step from target_params["teacher"] labels any crop the same way at the
cost of one more unmasked encoder pass. `start_self_training` builds the stage-2 params and
target_params from stage-1 params, the centroids and optionally another run's encoder as the teacher (the
paper's large model clusters the base self-trained model, §2.3; `python -m audiojepa.selftrain
--teacher_workdir`); `cluster_features` gives the features to fit, `teacher_features` the teacher's in a step.

Model config keys (`config.model`; `default_config()` has the reference values):
    size: "micro" | "tiny" | "small" | "base" | "large" (audiojepa.models.encodecmae.VARIANTS; micro and tiny
        are for CPU tests).
    stack_type: "residual" (the reference's ResiDual stack) | "pre_ln" (vit.TransformerStack).
    share_ffn: one FFN per stack (reference code: True; the paper's parameter counts need False, one per
        layer; must be False with "pre_ln"). configs/encodecmae.py `recipe=paper|code` selects it.
    learned_mask_token: a learned mask token (paper §2.2: True; reference code: False, masked frames get zeros).
    mask_prop, mask_span, mask_clip_spans: masking.span_mask_1d's mask_prop, span and clip_spans
        (reference: 0.5, 15, False = span starts in [0, T − span], so edge frames are rarely masked).
    masked_loss_weight: δ (0.9).
    num_codebooks: n_q (8, EnCodec at 6 kbps).
    codebook_weights: γ_1..γ_{n_q} (encodecmae_loss.REFERENCE_CODEBOOK_WEIGHTS).
    targets: "codes" (stage 1) | "codes+kmeans" | "kmeans" (self-training).
    num_clusters: k of the k-means stream (1024).
    kmeans_weight: weight of the k-means stream; None: Σ γ_q with "codes+kmeans", 1.0 with "kmeans".
    kmeans_centroids: "" or a .npy file of [num_clusters, D_teacher] centroids, loaded by `init`.
    stage1_params (optional): "" or a file written by `save_params` with the stage-1 params; with k-means
        targets, `init` then builds the stage-2 state (`start_self_training`). audiojepa.selftrain sets it.
    teacher_params (optional): "" (the teacher is the stage-1 encoder) or a `save_params` file with another
        run's encoder params (TEACHER_KEYS); set by audiojepa.selftrain --teacher_workdir.
    teacher_size, teacher_stack_type, teacher_share_ffn (optional): the teacher's architecture; "" / None (or
        missing) = the student's own (`teacher_architecture`).
    encodec_checkpoint: "" (random EnCodec, smoke tests only) or a path (above).
    encodec_seed: seed of the random EnCodec weights.
    decay_all_params: weight decay on every param, LayerNorm, biases and position scales included
        (reference: True); False decays only tensors with ndim > 1.
    dtype: "float32" | "bfloat16" compute dtype of the MAE (EnCodec always runs in float32).
    attention_impl: None (XLA) or "cudnn".

Reference training recipe (§1.10-1.11; for the config): AdamW lr 1e-4 constant (no warm-up, no decay),
betas (0.9, 0.95), weight decay 0.05 on every param, batch 128, 500k steps, random 4 s crops
(96,000 samples = 300 frames) of 24 kHz mono audio; self-training 150k more steps (`REFERENCE_TRAINING`).

Param trees:
    params = EncodecMAEModel params: {"input_proj", "encoder_positions", "encoder", "decoder_proj",
        ["mask_token",] "decoder_positions", "decoder", ["head",] ["kmeans_head"]};
    target_params = {"encodec", ["teacher", "centroids"]} (above).

Parameter counts: `inference_param_count` (EnCodec's encoder + the MAE encoder, what the paper's Table 1
reports); configs/encodecmae.py's docstring has the arithmetic per size and recipe.
"""

import functools
import logging
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from ml_collections import config_dict

from audiojepa import config_utils
from audiojepa.methods import encodecmae_loss
from audiojepa.models import encodec, encodec_torch, encoder_layers
from audiojepa.models import encodecmae as mae
from audiojepa.models.vit import per_block_ndim, performance_options
from audiojepa.ops import kmeans as kmeans_lib
from audiojepa.ops import masking

Params = dict[str, Any]

CONFIG_KEYS = ("size", "stack_type", "share_ffn", "learned_mask_token", "mask_prop", "mask_span", "mask_clip_spans",
               "masked_loss_weight", "num_codebooks", "codebook_weights", "targets", "num_clusters", "kmeans_weight",
               "kmeans_centroids", "encodec_checkpoint", "encodec_seed", "decay_all_params", "dtype", "attention_impl")
TARGETS = ("codes", "codes+kmeans", "kmeans")
TEACHER_KEYS = ("input_proj", "encoder_positions", "encoder")  # the part of params that computes features
RANDOM_CODEBOOK_STD = 0.01  # random-EnCodec smoke tests only

REFERENCE_TRAINING = dict(
    learning_rate=1e-4, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95, weight_decay=0.05,
    batch_size=128, total_steps=500_000, self_training_steps=150_000, crop_seconds=4.0,
    sample_rate=encodec.SAMPLE_RATE, kmeans_fit_frames=10_000,
)


def default_config(size: str = "base") -> ml_collections.ConfigDict:
    """The reference settings (encodecmae.gin, v1 scripts) for a model size."""
    return ml_collections.ConfigDict(dict(
        size=size,
        stack_type="residual",
        share_ffn=True,
        learned_mask_token=False,
        mask_prop=0.5,
        mask_span=15,
        mask_clip_spans=False,
        masked_loss_weight=encodecmae_loss.MASKED_LOSS_WEIGHT,
        num_codebooks=8,
        codebook_weights=encodecmae_loss.REFERENCE_CODEBOOK_WEIGHTS,
        targets="codes",
        num_clusters=1024,
        kmeans_weight=None,
        kmeans_centroids="",
        teacher_params="",
        teacher_size="",
        teacher_stack_type="",
        teacher_share_ffn=config_dict.placeholder(bool),
        encodec_checkpoint="",
        encodec_seed=0,
        decay_all_params=True,
        dtype="float32",
        attention_impl=None,
    ))


def load_encodec_params(path: str, num_codebooks: int) -> dict:
    """Frozen EnCodec params {"encoder", "codebooks" [num_codebooks, 1024, 128]} (NumPy) from a converted
    folder (tools/convert_encodec.py) or an EnCodec 24 kHz state dict (.npz, or .th/.pt/.pth with torch)."""
    if os.path.isdir(path):
        params = encodec_torch.load_params(path)
    elif os.path.exists(path):
        params = encodec_torch.convert(encodec_torch.load_state_dict(path))
    else:
        raise FileNotFoundError(f"config.model.encodec_checkpoint={path!r} does not exist; give a folder written by "
                                "tools/convert_encodec.py or an EnCodec 24 kHz state dict (.npz/.th/.pt).")
    available = params["codebooks"].shape[0]
    if num_codebooks > available:
        raise ValueError(f"config.model.num_codebooks={num_codebooks} but {path} has {available} codebooks.")
    return {"encoder": params["encoder"], "codebooks": np.asarray(params["codebooks"][:num_codebooks], np.float32)}


@functools.cache
def _encoder_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flattened param path → shape of EncodecEncoder() (traced once, nothing computed)."""
    shapes = jax.eval_shape(encodec.EncodecEncoder().init, jax.random.key(0),
                            jnp.zeros((1, encodec.HOP_LENGTH), jnp.float32))["params"]
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(shapes).items()}


def random_encodec_params(seed: int, num_codebooks: int) -> dict:
    """Seeded random EnCodec params (NumPy), for smoke tests without a checkpoint.

    Drawn with NumPy on the param shapes (no EnCodec init is run, which takes tens of seconds op by op
    on a CPU): kernels N(0, 1/fan_in) with fan_in = the product of all but the last kernel axis, biases
    zero, codebooks N(0, RANDOM_CODEBOOK_STD²).
    """
    generator = np.random.default_rng(seed)
    flat = _encoder_param_shapes()
    encoder = {}
    for path in sorted(flat):
        shape = flat[path]
        if path[-1].startswith("bias"):
            encoder[path] = np.zeros(shape, np.float32)
        else:
            encoder[path] = (generator.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    codebooks = RANDOM_CODEBOOK_STD * generator.standard_normal(
        (num_codebooks, encodec.CODEBOOK_SIZE, encodec.DIMENSION))
    return {"encoder": traverse_util.unflatten_dict(encoder), "codebooks": codebooks.astype(np.float32)}


def teacher_architecture(model_config) -> dict[str, Any]:
    """The self-training teacher's encoder architecture, dict(size=, stack_type=, share_ffn=): config.model's
    teacher_size / teacher_stack_type / teacher_share_ffn, each unset ("" / None, or missing in configs written
    before they existed) meaning the student's own value (the teacher is then the run's stage 1)."""
    c = model_config
    arch = dict(size=c.get("teacher_size") or c.size, stack_type=c.get("teacher_stack_type") or c.stack_type,
                share_ffn=c.get("teacher_share_ffn"))
    arch["share_ffn"] = bool(c.share_ffn if arch["share_ffn"] is None else arch["share_ffn"])
    mae.decode_variant(arch["size"])  # raises on an unknown size
    if arch["stack_type"] not in mae.STACK_TYPES:
        raise ValueError(f"config.model.teacher_stack_type={arch['stack_type']!r}; valid: {mae.STACK_TYPES}.")
    if arch["stack_type"] == "pre_ln" and arch["share_ffn"]:
        raise ValueError("config.model.teacher_share_ffn=True needs teacher_stack_type='residual'.")
    return arch


def encodec_encoder_param_count() -> int:
    """Parameters of the frozen EnCodec 24 kHz encoder as stored here (weight norm resolved): 7,423,472 (torch's
    7,425,792 counts weight norm's g, one per output channel, separately; the paper's "EC" row says 7.4M)."""
    return int(sum(np.prod(shape, dtype=np.int64) for shape in _encoder_param_shapes().values()))


def inference_param_count(params: Params) -> int:
    """The parameter count the paper's Table 1 reports (#Par): the feature extractor a downstream task runs,
    i.e. the frozen EnCodec encoder plus the MAE encoder (`TEACHER_KEYS`: input projection, position scale,
    encoder stack); not the decoder, the mask token or the heads, which only pre-training uses.

    params: a params tree (arrays or jax.ShapeDtypeStruct, e.g. from jax.eval_shape of `init`).
    Base: 7,423,472 + 30,020,609 = 37.4M with the code's shared FFN, 7,423,472 + 86,687,489 = 94.1M with one
    FFN per layer (configs/encodecmae.py's docstring has the arithmetic for every size).
    """
    encoder = sum(int(np.prod(leaf.shape, dtype=np.int64)) for key in TEACHER_KEYS
                  for leaf in jax.tree.leaves(params[key]))
    return encodec_encoder_param_count() + encoder


def save_params(path: str, params: Params) -> str:
    """Writes a params tree (e.g. stage-1 params for self-training) as msgpack; returns the path."""
    with open(path, "wb") as f:
        f.write(flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, params)))
    return path


def load_params(path: str, key: str = "config.model.stage1_params") -> Params:
    """Reads `save_params`' file (config.model.stage1_params or teacher_params; `key` names it in errors)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}={path!r} does not exist (audiojepa.selftrain writes it).")
    with open(path, "rb") as f:
        return flax.serialization.msgpack_restore(f.read())


def _same_shapes(tree, expected) -> bool:
    """Same structure and leaf shapes (arrays against jax.ShapeDtypeStruct)."""
    def shapes(t):
        return jax.tree.map(lambda a: tuple(a.shape), t)
    return jax.tree.structure(tree) == jax.tree.structure(expected) and shapes(tree) == shapes(expected)


class EncodecMAE:
    """The EncodecMAE method: params, loss, (no) target update, weight-decay mask, encoder.

    Built as `EncodecMAE(config.model, input_shape=(num_samples,))`: the training crop in 24 kHz samples
    (96,000 for 4 s → T = 300 frames). `steps_per_epoch` is accepted and unused.
    """

    input_kind = "waveform"  # the trainer feeds batch["waveform"] [batch, samples] at 24 kHz, no log-mel
    jit_init = False  # init embeds the frozen EnCodec (and stage-1) arrays: run it eagerly, not as jit constants
    num_prefix_tokens = 0  # `encode` returns frame tokens only
    frame_hop_samples = encodec.HOP_LENGTH  # one output frame per 320 samples (75 Hz)
    precomputed_kinds = ("encodec_targets",)  # also trains on tools/precompute_encodec_targets.py shards

    def __init__(self, model_config, *, input_shape, steps_per_epoch: int | None = None):
        model_config = config_utils.model_config_with_keys(model_config, CONFIG_KEYS, method="EncodecMAE",
                                                           values="audiojepa.methods.encodecmae.default_config()")
        c = model_config
        self.config = c
        self.steps_per_epoch = steps_per_epoch
        shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
        if len(shape) != 1 or int(shape[0]) < encodec.HOP_LENGTH:
            raise ValueError(f"input_shape={input_shape!r}: EncodecMAE takes (num_samples,) of 24 kHz audio, at least "
                             f"{encodec.HOP_LENGTH} samples (one frame); 4 s = (96000,).")
        self.num_samples = int(shape[0])
        self.num_frames = encodec.num_frames(self.num_samples)
        if c.targets not in TARGETS:
            raise ValueError(f"config.model.targets={c.targets!r}; valid: {TARGETS}.")
        self.uses_codes = c.targets in ("codes", "codes+kmeans")
        self.uses_kmeans = c.targets in ("codes+kmeans", "kmeans")
        self.num_codebooks = int(c.num_codebooks)
        if not 1 <= self.num_codebooks <= encodec.NUM_CODEBOOKS:
            raise ValueError(f"config.model.num_codebooks={c.num_codebooks}; valid: 1..{encodec.NUM_CODEBOOKS}.")
        self.codebook_weights = np.asarray(c.codebook_weights, np.float32)
        if self.codebook_weights.shape != (self.num_codebooks,):
            raise ValueError(f"config.model.codebook_weights has {self.codebook_weights.size} values for "
                             f"num_codebooks={self.num_codebooks}; give one γ_q per codebook.")
        if not 0.0 <= float(c.masked_loss_weight) <= 1.0:
            raise ValueError(f"config.model.masked_loss_weight={c.masked_loss_weight}; expected δ in [0, 1].")
        if c.kmeans_weight is not None:
            self.kmeans_weight = float(c.kmeans_weight)
        else:
            self.kmeans_weight = float(self.codebook_weights.sum()) if self.uses_codes else 1.0
        # Fail at construction, not in the first step: span_mask_1d's own checks for this crop length
        # (traced only, nothing is compiled).
        jax.eval_shape(lambda: self.sample_mask(jax.random.key(0), 1, self.num_frames))
        if c.stack_type not in mae.STACK_TYPES:
            raise ValueError(f"config.model.stack_type={c.stack_type!r}; valid: {mae.STACK_TYPES}.")
        if c.stack_type == "pre_ln" and c.share_ffn:
            raise ValueError("config.model.share_ffn=True needs stack_type='residual'; "
                             "set share_ffn=False for 'pre_ln'.")

        size = mae.decode_variant(c.size)
        self.width = size["width"]
        self.encoder_depth = size["encoder_depth"]  # the layers `encode` can return
        self.model = mae.EncodecMAEModel(
            **size, num_codebooks=self.num_codebooks if self.uses_codes else 0,
            codebook_size=encodec.CODEBOOK_SIZE, num_clusters=int(c.num_clusters) if self.uses_kmeans else 0,
            stack_type=c.stack_type, share_ffn=bool(c.share_ffn), learned_mask_token=bool(c.learned_mask_token),
            **performance_options(c))
        # The frozen self-training teacher: this model's encoder, or another run's of any size (teacher_*).
        self.teacher_architecture = teacher_architecture(c)
        teacher_size = mae.decode_variant(self.teacher_architecture["size"])
        self.teacher_width = teacher_size["width"]
        self.teacher_model = mae.EncodecMAEModel(
            **teacher_size, num_codebooks=0, stack_type=self.teacher_architecture["stack_type"],
            share_ffn=self.teacher_architecture["share_ffn"], **performance_options(c))

        self._encodec_params = None  # read on first use: an exported encoder carries its own copy

    def set_encodec_params(self, encodec_params: Params) -> None:
        """Use these frozen EnCodec params (e.g. an exported encoder's copy) instead of reading the checkpoint."""
        self._encodec_params = jax.tree.map(np.asarray, encodec_params)

    @property
    def encodec_params(self) -> Params:
        """The frozen EnCodec params from config.model.encodec_checkpoint (or seeded random ones), NumPy."""
        if self._encodec_params is None:
            c = self.config
            if c.encodec_checkpoint:
                self._encodec_params = load_encodec_params(os.fspath(c.encodec_checkpoint), self.num_codebooks)
            else:
                logging.warning("config.model.encodec_checkpoint is empty: EncodecMAE uses seeded RANDOM EnCodec "
                                "weights (seed %d). Only for smoke tests; the codes are meaningless.",
                                int(c.encodec_seed))
                self._encodec_params = random_encodec_params(int(c.encodec_seed), self.num_codebooks)
        return self._encodec_params

    # -- params ---------------------------------------------------------------------------------------

    def _init_model(self, rng: jax.Array) -> Params:
        """Fresh EncodecMAEModel params (jitted: run op by op, the init takes many seconds on a CPU)."""
        num_masked = int(self.num_frames * float(self.config.mask_prop))  # which frames does not matter here
        visible_idx = jnp.arange(self.num_frames - num_masked, dtype=jnp.int32)[None]
        masked_idx = jnp.arange(self.num_frames - num_masked, self.num_frames, dtype=jnp.int32)[None]
        features = jnp.zeros((1, self.num_frames, encodec.DIMENSION), jnp.float32)
        return jax.jit(self.model.init)(rng, features, visible_idx, masked_idx)["params"]

    def _init_teacher(self, rng: jax.Array) -> Params:
        """Fresh teacher-encoder params ({key: ...} for TEACHER_KEYS) of the teacher's architecture."""
        features = jnp.zeros((1, self.num_frames, encodec.DIMENSION), jnp.float32)
        return jax.jit(functools.partial(self.teacher_model.init, method=mae.EncodecMAEModel.encode))(
            rng, features)["params"]

    def init(self, rng: jax.Array) -> tuple[Params, Params]:
        """(params, target_params) (module docstring). The EnCodec params are the constructor's.

        Self-training: the centroids come from config.kmeans_centroids when set, the teacher from
        config.teacher_params when set (else from the stage-1 params); without config.stage1_params the
        teacher is a placeholder (a copy of the fresh encoder, or a fresh encoder of the teacher's size)
        that `start_self_training`, or restoring a checkpoint, must replace. A warning says so.
        """
        stage1_path = self.config.get("stage1_params", "")
        if self.uses_kmeans and stage1_path:
            teacher_path = self.config.get("teacher_params", "")
            teacher = load_params(teacher_path, "config.model.teacher_params") if teacher_path else None
            return self.start_self_training(load_params(stage1_path), self._load_centroids(), rng,
                                            teacher_params=teacher)
        params = self._init_model(rng)
        target_params = {"encodec": jax.tree.map(jnp.asarray, self.encodec_params)}
        if self.uses_kmeans:
            logging.warning("EncodecMAE self-training init: target_params['teacher'] is a placeholder (a freshly "
                            "initialised encoder); build the stage-2 state with start_self_training(stage-1 "
                            "params, centroids) or restore it from a checkpoint.")
            if self._teacher_is_own_encoder():
                target_params["teacher"] = {key: jax.tree.map(jnp.copy, params[key]) for key in TEACHER_KEYS}
            else:
                target_params["teacher"] = self._init_teacher(rng)
            target_params["centroids"] = self._load_centroids()
        return params, target_params

    def _teacher_is_own_encoder(self) -> bool:
        c = self.config
        return self.teacher_architecture == dict(size=c.size, stack_type=c.stack_type, share_ffn=bool(c.share_ffn))

    def _load_centroids(self) -> jax.Array:
        shape = (int(self.config.num_clusters), self.teacher_width)
        path = self.config.kmeans_centroids
        if not path:
            logging.warning("config.model.kmeans_centroids is empty: target_params['centroids'] are zeros (a "
                            "placeholder; every frame would get cluster 0).")
            return jnp.zeros(shape, jnp.float32)
        centroids = np.load(os.fspath(path))
        if centroids.shape != shape:
            raise ValueError(f"config.model.kmeans_centroids={path!r} holds {centroids.shape}, expected {shape} "
                             "(num_clusters, the teacher's width).")
        return jnp.asarray(centroids, jnp.float32)

    def start_self_training(self, stage1_params: Params, centroids, rng: jax.Array,
                            teacher_params: Params | None = None) -> tuple[Params, Params]:
        """Stage-2 (params, target_params) from a stage-1 model of the same size (§1.13).

        The student starts as the stage-1 model: its encoder, decoder and, with "codes+kmeans", its codebook
        head are copied; the k-means head is fresh (from rng). The teacher is a frozen copy of the input
        projection, positions and encoder of `teacher_params` (another run's params, any size: the paper's
        large model clusters the base self-trained model; config.model.teacher_size etc. must describe it),
        or of the stage-1 params when None; centroids [num_clusters, teacher width] are the k-means of its
        cluster features.
        """
        if not self.uses_kmeans:
            raise ValueError("start_self_training needs config.model.targets='codes+kmeans' or 'kmeans'.")
        centroids = jnp.asarray(centroids, jnp.float32)
        expected_centroids = (int(self.config.num_clusters), self.teacher_width)
        if centroids.shape != expected_centroids:
            raise ValueError(f"centroids {centroids.shape}, expected {expected_centroids} (num_clusters, the "
                             f"teacher's width; teacher {self.teacher_architecture}).")
        teacher_source = stage1_params if teacher_params is None else teacher_params
        missing = [key for key in TEACHER_KEYS if key not in teacher_source]
        if missing:
            raise ValueError(f"the teacher params lack {missing}; they need {list(TEACHER_KEYS)}.")
        teacher = {key: jax.tree.map(jnp.copy, teacher_source[key]) for key in TEACHER_KEYS}
        expected_teacher = jax.eval_shape(self._init_teacher, rng)  # traced only
        if not _same_shapes(teacher, expected_teacher):
            raise ValueError(f"the teacher params do not match the teacher architecture {self.teacher_architecture} "
                             "(config.model.teacher_size, teacher_stack_type and teacher_share_ffn must be the "
                             "teacher run's size, stack_type and share_ffn; unset, the student's).")
        expected = jax.eval_shape(self._init_model, rng)  # traced only
        kmeans_head = mae.linear(int(self.config.num_clusters), jnp.float32).init(
            rng, jnp.zeros((1, self.width), jnp.float32))["params"]
        params = {key: kmeans_head if key == "kmeans_head" else jax.tree.map(jnp.copy, stage1_params[key])
                  for key in expected if key == "kmeans_head" or key in stage1_params}
        if not _same_shapes(params, expected):
            raise ValueError("stage-1 params do not match this model (size, stack_type, share_ffn and "
                             "learned_mask_token must be the stage-1 values).")
        target_params = {"encodec": jax.tree.map(jnp.asarray, self.encodec_params), "teacher": teacher,
                         "centroids": centroids}
        return params, target_params

    def weight_decay_mask(self, params: Params) -> Params:
        """All True with decay_all_params (the reference decays every param); else True for ndim > 1 per block
        (vit.per_block_ndim)."""
        if self.config.decay_all_params:
            return jax.tree.map(lambda p: True, params)
        return jax.tree.map(lambda ndim: ndim > 1, per_block_ndim(params))

    def update_targets(self, params: Params, target_params: Params, step, total_steps: int, **unused) -> Params:
        """The frozen EnCodec, teacher and centroids do not move: target_params unchanged."""
        del params, step, total_steps, unused
        return target_params

    def check_precomputed(self, manifest: dict, where: str) -> None:
        """Raises unless the precomputed targets of `manifest` (at `where`) fit this config: at least
        config.model.num_codebooks stored, made by this run's EnCodec (encodec_targets.check_compatible)."""
        from audiojepa.data import (
            encodec_targets,  # the precompute tool's library; only needed here
        )

        encodec_targets.check_compatible(manifest, where, num_codebooks=self.num_codebooks,
                                         encodec_checkpoint=os.fspath(self.config.encodec_checkpoint or ""),
                                         encodec_seed=int(self.config.encodec_seed))

    # -- targets --------------------------------------------------------------------------------------

    def encodec_features(self, encodec_params: Params, waveform: jax.Array,
                         num_samples: jax.Array | None = None) -> jax.Array:
        """waveform [batch, samples] at 24 kHz → EnCodec frames [batch, ceil(samples / 320), 128] float32;
        num_samples: None, or [batch] int valid samples per row (encodec.EncodecEncoder)."""
        return encodec.EncodecEncoder().apply({"params": encodec_params["encoder"]}, waveform, num_samples)

    def cluster_features(self, model_params: Params, features: jax.Array) -> jax.Array:
        """The features a self-training stage clusters when this run is the teacher: features [batch, T, 128] →
        [batch, T, D], computed by `model_params` (this model's params tree, or its encoder part) on all
        frames, no mask."""
        encoder = {key: model_params[key] for key in TEACHER_KEYS}
        return self.model.apply({"params": encoder}, features, method=mae.EncodecMAEModel.cluster_features)

    def teacher_features(self, teacher_params: Params, features: jax.Array) -> jax.Array:
        """`cluster_features` of the frozen teacher (target_params["teacher"], the teacher's architecture):
        features [batch, T, 128] → [batch, T, teacher width]."""
        return self.teacher_model.apply({"params": teacher_params}, features,
                                        method=mae.EncodecMAEModel.cluster_features)

    def make_targets(self, target_params: Params, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Input frames and class targets of a batch, without gradient (module docstring, "Inputs").

        Returns:
            {"features": [batch, T, 128] float32, "codes": [batch, T, n_q] int32 (when codes are targets),
            "kmeans_ids": [batch, T] int32 (when k-means ids are targets)}.
        """
        frozen = jax.lax.stop_gradient(target_params)
        if "features" in batch:
            features = batch["features"].astype(jnp.float32)
        elif "waveform" in batch:
            features = self.encodec_features(frozen["encodec"], batch["waveform"])
        else:
            raise KeyError(f"EncodecMAE needs batch['waveform'] or batch['features']; got keys {sorted(batch)}.")
        out = {"features": jax.lax.stop_gradient(features)}
        if self.uses_codes:
            if "codes" in batch:
                if batch["codes"].shape[-1] < self.num_codebooks:
                    raise ValueError(f"batch['codes'] has {batch['codes'].shape[-1]} codebooks, "
                                     f"config.model.num_codebooks={self.num_codebooks}.")
                codes = batch["codes"][..., :self.num_codebooks]
            else:
                codes, _ = encodec.rvq_encode(frozen["encodec"]["codebooks"], out["features"], self.num_codebooks)
            out["codes"] = codes.astype(jnp.int32)
        if self.uses_kmeans:
            if "kmeans_ids" in batch:
                ids = batch["kmeans_ids"]
            else:
                ids = kmeans_lib.assign(frozen["centroids"], self.teacher_features(frozen["teacher"], out["features"]))
            out["kmeans_ids"] = ids.astype(jnp.int32)
        return out

    # -- loss -----------------------------------------------------------------------------------------

    def sample_mask(self, rng: jax.Array, batch_size: int, num_frames: int) -> tuple[jax.Array, jax.Array]:
        """(visible_idx [batch, T − M], masked_idx [batch, M]) int32, ascending; M = ⌊mask_prop·T⌋."""
        c = self.config
        return masking.span_mask_1d(rng, batch_size, num_frames, mask_prop=float(c.mask_prop), span=int(c.mask_span),
                                    clip_spans=bool(c.mask_clip_spans))

    def loss_from_indices(self, params: Params, targets: dict[str, jax.Array], visible_idx: jax.Array,
                          masked_idx: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) for given targets (`make_targets`) and mask.

        Metrics: "loss", "loss_masked", "loss_visible" (the two terms, all streams), "accuracy_masked"
        (codes, mean over codebooks), with k-means "loss_kmeans", "accuracy_kmeans_masked".
        """
        c = self.config
        out = self.model.apply({"params": params}, targets["features"], visible_idx, masked_idx)
        is_masked = mae.frame_mask(masked_idx, targets["features"].shape[1])
        delta = float(c.masked_loss_weight)
        loss = masked = visible = 0.0
        metrics = {}
        if self.uses_codes:
            code_loss, terms = encodecmae_loss.weighted_stream_loss(out["codes"], targets["codes"], is_masked,
                                                                    self.codebook_weights, delta)
            loss, masked, visible = loss + code_loss, masked + terms["masked"], visible + terms["visible"]
            metrics.update(loss_codes=code_loss, accuracy_masked=terms["accuracy_masked"])
        if self.uses_kmeans:
            kmeans_loss, terms = encodecmae_loss.weighted_stream_loss(
                out["kmeans"][:, :, None], targets["kmeans_ids"][:, :, None], is_masked, [self.kmeans_weight], delta)
            loss, masked, visible = loss + kmeans_loss, masked + terms["masked"], visible + terms["visible"]
            metrics.update(loss_kmeans=kmeans_loss, accuracy_kmeans_masked=terms["accuracy_masked"])
        return loss, {"loss": loss, "loss_masked": masked, "loss_visible": visible, **metrics}

    def loss(self, params: Params, target_params: Params, batch: dict[str, jax.Array], rng: jax.Array,
             step) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) on a batch (module docstring, "Inputs") with a span mask drawn from rng.
        `step` is unused."""
        del step
        targets = self.make_targets(target_params, batch)
        batch_size, num_frames = targets["features"].shape[:2]
        visible_idx, masked_idx = self.sample_mask(rng, batch_size, num_frames)
        return self.loss_from_indices(params, targets, visible_idx, masked_idx)

    # -- evaluation -----------------------------------------------------------------------------------

    def random_encoder_params(self, rng: jax.Array) -> Params:
        """`encoder_params` of a freshly initialised model with this EnCodec: never the stage-1 weights, nor a
        read of config.stage1_params or kmeans_centroids (see methods.random_encoder_params)."""
        return self.encoder_params(self._init_model(rng), {"encodec": jax.tree.map(jnp.asarray, self.encodec_params)})

    def encoder_params(self, params: Params, target_params: Params | None = None) -> Params:
        """What `encode` needs, as an exported encoder stores it: the input projection, positions and
        encoder, plus the frozen EnCodec ("encodec") so the export runs without the EnCodec checkpoint."""
        out = {key: params[key] for key in TEACHER_KEYS}
        if target_params is not None and "encodec" in target_params:
            out["encodec"] = target_params["encodec"]
        return out

    def encode(self, params: Params, x: jax.Array, encodec_params: Params | None = None, *,
               layer: int | None = None, valid: jax.Array | None = None) -> jax.Array:
        """Frame features for evaluation: EnCodec → the MAE encoder on all frames, no masking.

        Args:
            params: the trained params (or `encoder_params`; its "encodec" entry, if any, is the EnCodec
                used).
            x: [batch, samples] 24 kHz waveform, or [batch, frames, 128] precomputed EnCodec frames.
            encodec_params: the frozen EnCodec params (default: the constructor's, `encodec_params`).
            layer: None, the final output (the reference's layer −1); k in [-encoder_depth, encoder_depth),
                encoder layer k's output (audiojepa.models.encoder_layers: ResiDual layers' x0, the last
                one the final output).
            valid: None, or [batch, frames] bool over the output frames, True for a prefix of each row: the
                frames after it are padding (audiojepa.adapters.encoder pads chunks to a few fixed lengths). EnCodec
                then treats each waveform row as its first valid·320 samples (its convs' reflect padding at
                that length) and no frame attends to the padding, so the valid frames are those of the row
                alone; the padding frames' outputs are meaningless.

        Returns:
            [batch, frames, D] float32 at 75 Hz. The reference encodes long audio in independent 4 s chunks
            and concatenates them; that is the caller's choice.
        """
        params, features = self._encoder_input(params, x, encodec_params, valid)
        return encoder_layers.encode_at(
            layer, self.encoder_depth,
            lambda: self.model.apply({"params": params}, features, valid, method=mae.EncodecMAEModel.encode),
            lambda: self.model.apply({"params": params}, features, valid,
                                     method=mae.EncodecMAEModel.encode_layers))

    def encode_layers(self, params: Params, x: jax.Array, encodec_params: Params | None = None, *,
                      valid: jax.Array | None = None) -> jax.Array:
        """Every layer of `encode` from one pass: [encoder_depth, batch, frames, D] float32."""
        params, features = self._encoder_input(params, x, encodec_params, valid)
        return self.model.apply({"params": params}, features, valid, method=mae.EncodecMAEModel.encode_layers)

    def _encoder_input(self, params: Params, x: jax.Array, encodec_params: Params | None,
                       valid: jax.Array | None = None):
        """(params without "encodec", EnCodec frames [batch, frames, 128]) for `encode`'s arguments; with `valid`
        [batch, frames], each waveform row is its first (valid frames x 320) samples to EnCodec."""
        params = dict(params)
        encodec_params = params.pop("encodec", None) or encodec_params
        if x.ndim == 2:
            num_samples = None if valid is None else valid.sum(axis=1).astype(jnp.int32) * self.frame_hop_samples
            x = self.encodec_features(encodec_params or self.encodec_params, x, num_samples)
        return params, x
