r"""Analytic matmul FLOPs of one training step, per method (the numerator of MFU).

Every function takes a built method object (its config and the sizes it derived from the input shape)
and the global batch size, and returns a dict of *forward* FLOPs per part of the step, plus
"forward" (their sum), "backward" and "total" = forward + backward. Only matmuls and convolutions are
counted, 2·m·n·k each; LayerNorm, softmax, activations, the loss, the EMA and the AdamW update are
not (MaxText's MFU convention). A trained part costs its forward again twice in the backward pass (the
gradients with respect to its input and to its weights); a frozen part (an EMA target encoder, the
EnCodec encoder, the self-training teacher: everything under stop_gradient) has a forward only:

    backward = 2 · Σ forward(trained parts),    total = forward + backward.

The input layers (patch embedding, EncodecMAE's input projection) count as trained parts although
their input needs no gradient: a slight overcount (for ViT-B M2D on 80x608 about 0.1% of the step).

Rematerialisation (config.model.remat) recomputes forward passes in the backward pass; those FLOPs are
not counted (they are hardware FLOPs, not model FLOPs), so MFU stays comparable across remat choices.

Building blocks, per example:

    dense(N, a, b)        = 2·N·a·b                             (N tokens, a → b features)
    block(N, D, H, A = D) = 3·2·N·D·A                           q, k, v (A = heads·head_dim)
                          + 2·N²·A + 2·N²·A                     scores and attention·V, all heads
                          + 2·N·A·D                             output projection
                          + 2·(2·N·D·H)                         MLP / feed-forward, hidden width H
    predictor(Kc, S, Q)   = dense(Kc, D, P) + p·block(S, P, 4P) + dense(Q, P, D)
        (in-projection of the Kc context tokens, a stack of depth p and width P over a sequence of S
        tokens, out-projection of the Q predicted tokens back to the encoder width D)

M2D (L patches of patch_f·patch_t bins, K = int(L·(1 - mask_ratio)) visible; ViT width D, depth d,
MLP H; predictor P, p; the predictor sequence is CLS + the whole grid):

    patch_embed     = dense(L, patch_f·patch_t, D)                       trained
    online_encoder  = d·block(1 + K, D, H)                               trained
    predictor       = predictor(1 + K, 1 + L, L - K)                     trained
    target_encoder  = d·block(1 + L - K, D, H)                           frozen (EMA, CLS + masked)

MATPAC = M2D + the classification head (MLP D → hidden → … → bottleneck, then bottleneck → K
prototypes) on the L - K predicted tokens (student, trained) and on the L - K target tokens (teacher,
frozen): head(N) = dense(N, D, h) + (layers - 2)·dense(N, h, h) + dense(N, h, b) + dense(N, b, K).

JEPA / Audio-JEPA (prefix c = 1 with use_cls, else 0; Kc context and Kt target patches as the
masking draws them, for a mask-ratio range the given bucket; Q = L with predict_all_patches, else Kt):

    patch_embed           = dense(L, patch_f·patch_t, D)                  trained
    context_encoder       = d·block(c + Kc, D, H)                         trained
    predictor             = predictor(c + Kc, S, Q),  S = c + L (full grid) or c + Kc + Q (queries)
    target_patch_embed    = dense(L, patch_f·patch_t, D)                  frozen (its own embedding)
    target_encoder        = d·block(c + N_t, D, H)                        frozen
        N_t = L for target_domain "latent" (Audio-JEPA: the whole spectrogram), Kt for "input".

EncodecMAE (T frames, M = ⌊mask_prop·T⌋ masked, Kv = T - M visible; width D, encoder/decoder depth
e/r, feed-forward F, attention width A = heads·(D // heads); n_q codebooks of 1024 codes; k clusters):

    input_proj      = dense(T, 128, D)                 trained (all frames are embedded, then gathered)
    encoder         = e·block(Kv, D, F, A)             trained
    decoder_proj    = dense(Kv, D, D)                  trained
    decoder         = r·block(T, D, F, A)              trained
    head            = dense(T, D, n_q·1024)            trained (with code targets)
    kmeans_head     = dense(T, D, k)                   trained (with k-means targets)
    encodec_convs, encodec_lstm                        frozen, when the batch holds waveforms
    rvq             = n_q·(dense(T, 128, 1024) + dense(T, 1024, 128))
                                                       frozen, when codes are not given: the distance
                                                       matmul and the one-hot lookup of every stage
    teacher         = dense(T, 128, D) + e·block(T, D, F, A) + dense(T, D, k)
                                                       frozen, k-means targets without given ids:
                                                       the stage-1 encoder on all frames + assignment
    EnCodec encoder on S samples (`encodec_encoder_flops`): each causal conv of kernel w from C_in to
    C_out channels with stride s gives ceil(length / s) outputs and costs 2·out·w·C_in·C_out:
    conv 1→32 (w 7); per stride s in (2, 4, 5, 8) at C channels a residual unit (C→C/2 w 3, C/2→C w 1,
    shortcut C→C w 1) and a downsampling conv C→2C (w 2s, stride s); then per LSTM layer on the T
    frames dense(T, 512, 2048) for the inputs and dense(T, 512, 2048) for the recurrence; last conv
    512→128 (w 7). About 3.0 GFLOP per second of audio (24,000 samples), 0.63 of it in the LSTM.
"""

from __future__ import annotations

import math

import jax

from audiojepa.methods import JEPA, M2D, MATPAC, EncodecMAE
from audiojepa.models import encodec
from audiojepa.models import encodecmae as encodecmae_models
from audiojepa.models.vit import model_size

BATCH_KEYS_WAVEFORM = ("waveform",)  # EncodecMAE on device: EnCodec, RVQ (and the teacher) inside the step
BATCH_KEYS_PRECOMPUTED = ("features", "codes", "kmeans_ids")  # everything precomputed


# -- building blocks (per example) ---------------------------------------------------------------------


def dense_flops(tokens: int, in_features: int, out_features: int) -> int:
    """2·N·a·b: a Dense layer (or any matmul) on `tokens` rows."""
    return 2 * tokens * in_features * out_features


def block_flops(tokens: int, width: int, mlp_dim: int, attention_dim: int | None = None) -> int:
    """Forward matmul FLOPs of one transformer block on one example of `tokens` tokens.

    Args:
        tokens: N.
        width: D, the residual stream's width.
        mlp_dim: H, the MLP (feed-forward) hidden width.
        attention_dim: A = heads · head_dim, the width of q, k and v (default D; EncodecMAE's attention
            has heads·(D // heads), e.g. 1020 for D = 1024 and 12 heads).
    """
    n, d, h = tokens, width, mlp_dim
    a = width if attention_dim is None else attention_dim
    qkv = 3 * (2 * n * d * a)
    attention = 2 * n * n * a + 2 * n * n * a  # scores q·kᵀ, then weights·v, summed over heads
    proj = 2 * n * a * d
    mlp = 2 * (2 * n * d * h)
    return qkv + attention + proj + mlp


def predictor_flops(context_tokens: int, sequence: int, queries: int, encoder_width: int, width: int, depth: int,
                    mlp_dim: int | None = None) -> int:
    """audiojepa.models.Predictor on one example: in-projection of the context tokens, `depth` blocks
    over `sequence` tokens and out-projection of the `queries` predicted tokens (MLP default 4·width)."""
    mlp_dim = mlp_dim or 4 * width
    return (dense_flops(context_tokens, encoder_width, width) + depth * block_flops(sequence, width, mlp_dim)
            + dense_flops(queries, width, encoder_width))


def conv1d_flops(out_length: int, kernel_size: int, in_channels: int, out_channels: int) -> int:
    """2·out·w·C_in·C_out: a 1-D convolution producing `out_length` steps."""
    return 2 * out_length * kernel_size * in_channels * out_channels


def encodec_encoder_flops(num_samples: int, encoder: encodec.EncodecEncoder | None = None) -> dict[str, int]:
    """Forward FLOPs of the EnCodec encoder on one example of `num_samples` samples (module docstring).

    Args:
        num_samples: waveform length S.
        encoder: the module whose sizes to use (default EncodecEncoder(), the released 24 kHz model).

    Returns:
        {"convs": every convolution, "lstm_input": the LSTM's input projections,
        "lstm_recurrent": its recurrent matmuls (inside a lax.scan over the frames)}.
    """
    enc = encoder or encodec.EncodecEncoder()
    length, channels = num_samples, enc.n_filters
    convs = conv1d_flops(length, enc.kernel_size, 1, channels)
    for stride in enc.strides:
        hidden = channels // 2
        convs += (conv1d_flops(length, enc.residual_kernel_size, channels, hidden)
                  + conv1d_flops(length, 1, hidden, channels) + conv1d_flops(length, 1, channels, channels))
        length = math.ceil(length / stride)  # a causal conv of stride s (causal_padding)
        convs += conv1d_flops(length, 2 * stride, channels, 2 * channels)
        channels *= 2
    convs += conv1d_flops(length, enc.last_kernel_size, channels, enc.dimension)
    lstm = enc.lstm_layers * dense_flops(length, channels, 4 * channels)  # 4 gates; the width stays `channels`
    return {"convs": convs, "lstm_input": lstm, "lstm_recurrent": lstm}


def rvq_flops(num_frames: int, num_codebooks: int) -> int:
    """Forward FLOPs of encodec.rvq_encode on one example: per stage the distance matmul [T, 128]·[128, 1024]
    and the codebook lookup as a one-hot matmul [T, 1024]·[1024, 128]."""
    per_stage = (dense_flops(num_frames, encodec.DIMENSION, encodec.CODEBOOK_SIZE)
                 + dense_flops(num_frames, encodec.CODEBOOK_SIZE, encodec.DIMENSION))
    return num_codebooks * per_stage


def classification_head_flops(tokens: int, width: int, head) -> int:
    """audiojepa.models.cls_head.ClassificationHead (a module instance) on `tokens` tokens of `width`."""
    widths = [width] + [head.hidden_dim] * (head.num_layers - 1) + [head.bottleneck_dim]
    mlp = sum(dense_flops(tokens, a, b) for a, b in zip(widths[:-1], widths[1:]))
    return mlp + dense_flops(tokens, head.bottleneck_dim, head.num_prototypes)


def _step(per_example: dict[str, int], frozen: tuple[str, ...], batch_size: int) -> dict[str, int]:
    """Scales per-example forward FLOPs to the batch and adds "forward", "backward" (2× the trained
    parts) and "total"."""
    flops = {name: batch_size * value for name, value in per_example.items()}
    trained = sum(value for name, value in flops.items() if name not in frozen)
    flops["forward"] = sum(flops.values())
    flops["backward"] = 2 * trained
    flops["total"] = flops["forward"] + flops["backward"]
    return flops


# -- methods -------------------------------------------------------------------------------------------


def _m2d_per_example(method) -> dict[str, int]:
    size = model_size(method.config)
    width, depth, mlp_dim = size["width"], size["depth"], size["mlp_dim"]
    num_patches, num_visible = method.num_patches, method.num_visible
    num_masked = num_patches - num_visible
    return {
        "patch_embed": dense_flops(num_patches, method.patch_size[0] * method.patch_size[1], width),
        "online_encoder": depth * block_flops(1 + num_visible, width, mlp_dim),
        "predictor": predictor_flops(1 + num_visible, 1 + num_patches, num_masked, width,
                                     int(method.config.predictor_width), int(method.config.predictor_depth),
                                     method.config.get("predictor_mlp_dim")),
        "target_encoder": depth * block_flops(1 + num_masked, width, mlp_dim),
    }


def m2d_step_flops(method, batch_size: int) -> dict[str, int]:
    """One M2D step (module docstring).

    Args:
        method: an audiojepa.methods.M2D (its config, patch grid and number of visible patches).
        batch_size: global batch.

    Returns:
        Forward FLOPs of "patch_embed", "online_encoder", "predictor", "target_encoder" (frozen), and
        "forward", "backward", "total".
    """
    return _step(_m2d_per_example(method), ("target_encoder",), batch_size)


def matpac_step_flops(method, batch_size: int) -> dict[str, int]:
    """One MATPAC step: M2D's parts plus "student_head" (trained) and "teacher_head" (frozen), each on
    the L - K masked tokens (module docstring)."""
    per_example = _m2d_per_example(method)
    num_masked = method.num_patches - method.num_visible
    head = classification_head_flops(num_masked, method.width, method.head)
    per_example.update(student_head=head, teacher_head=head)
    return _step(per_example, ("target_encoder", "teacher_head"), batch_size)


def jepa_mask_counts(method, mask_variant: int | None = None) -> tuple[int, int]:
    """(Kc, Kt): the context and target patch counts of the masks `method.sample_mask` draws (for a
    mask-ratio range with buckets, of bucket `mask_variant`; None is the middle bucket). For variable-size masks
    (multi-block/time with mask_counts="variable", a continuous ratio range) these are the padded capacities,
    which is what the step computes: padding tokens cost FLOPs like any other."""
    context_idx, target_idx = jax.eval_shape(lambda: method.sample_mask(jax.random.key(0), 1, mask_variant))
    return context_idx.shape[1], target_idx.shape[1]


def jepa_step_flops(method, batch_size: int, mask_variant: int | None = None) -> dict[str, int]:
    """One JEPA / Audio-JEPA step (module docstring).

    Args:
        method: an audiojepa.methods.JEPA.
        batch_size: global batch.
        mask_variant: the ratio bucket of the step (configs with mask_ratio_range; None: the middle one).

    Returns:
        Forward FLOPs of "patch_embed", "context_encoder", "predictor", "target_patch_embed" and
        "target_encoder" (both frozen), and "forward", "backward", "total".
    """
    c = method.config
    size = model_size(c)
    width, depth, mlp_dim = size["width"], size["depth"], size["mlp_dim"]
    prefix, num_patches = method.num_prefix_tokens, method.num_patches
    num_context, num_target = jepa_mask_counts(method, mask_variant)
    queries = num_patches if method.predict_all_patches else num_target
    sequence = prefix + (num_patches if c.predictor_full_grid else num_context + queries)
    target_tokens = num_patches if method.target_domain == "latent" else num_target
    patch_embed = dense_flops(num_patches, method.patch_size[0] * method.patch_size[1], width)
    per_example = {
        "patch_embed": patch_embed,
        "context_encoder": depth * block_flops(prefix + num_context, width, mlp_dim),
        "predictor": predictor_flops(prefix + num_context, sequence, queries, width, int(c.predictor_width),
                                     int(c.predictor_depth), c.get("predictor_mlp_dim")),
        "target_patch_embed": patch_embed,
        "target_encoder": depth * block_flops(prefix + target_tokens, width, mlp_dim),
    }
    return _step(per_example, ("target_patch_embed", "target_encoder"), batch_size)


def encodecmae_step_flops(method, batch_size: int, batch_keys=BATCH_KEYS_WAVEFORM) -> dict[str, int]:
    """One EncodecMAE step (module docstring).

    Args:
        method: an audiojepa.methods.EncodecMAE.
        batch_size: global batch.
        batch_keys: what the batch holds, as EncodecMAE.make_targets reads it: ("waveform",) computes
            the EnCodec features, the RVQ codes and (self-training) the teacher's k-means ids in the
            step; "features", "codes" and "kmeans_ids" skip the corresponding frozen pass.

    Returns:
        Forward FLOPs of the trained parts "input_proj", "encoder", "decoder_proj", "decoder", "head"
        (code targets), "kmeans_head" (k-means targets), of the frozen parts computed in the step
        ("encodec_convs", "encodec_lstm", "rvq", "teacher"), and "forward", "backward", "total".
    """
    size = encodecmae_models.decode_variant(method.config.size)
    width, ff_dim, heads = size["width"], size["ff_dim"], size["num_heads"]
    attention_dim = heads * (width // heads)
    frames = method.num_frames
    _, masked_idx = jax.eval_shape(lambda: method.sample_mask(jax.random.key(0), 1, frames))
    visible = frames - masked_idx.shape[1]
    per_example = {
        "input_proj": dense_flops(frames, encodec.DIMENSION, width),
        "encoder": size["encoder_depth"] * block_flops(visible, width, ff_dim, attention_dim),
        "decoder_proj": dense_flops(visible, width, width),
        "decoder": size["decoder_depth"] * block_flops(frames, width, ff_dim, attention_dim),
    }
    if method.uses_codes:
        per_example["head"] = dense_flops(frames, width, method.num_codebooks * encodec.CODEBOOK_SIZE)
    if method.uses_kmeans:
        per_example["kmeans_head"] = dense_flops(frames, width, int(method.config.num_clusters))
    keys = set(batch_keys)
    if "features" not in keys:
        if "waveform" not in keys:
            raise ValueError(f"batch_keys={tuple(batch_keys)}: EncodecMAE needs 'waveform' or 'features'.")
        encoder = encodec_encoder_flops(method.num_samples)
        per_example["encodec_convs"] = encoder["convs"]
        per_example["encodec_lstm"] = encoder["lstm_input"] + encoder["lstm_recurrent"]
    if method.uses_codes and "codes" not in keys:
        per_example["rvq"] = rvq_flops(frames, method.num_codebooks)
    if method.uses_kmeans and "kmeans_ids" not in keys:
        num_clusters = int(method.config.num_clusters)
        per_example["teacher"] = (dense_flops(frames, encodec.DIMENSION, width)
                                  + size["encoder_depth"] * block_flops(frames, width, ff_dim, attention_dim)
                                  + dense_flops(frames, width, num_clusters))
    return _step(per_example, ("encodec_convs", "encodec_lstm", "rvq", "teacher"), batch_size)


def step_flops(method, batch_size: int, **kwargs) -> dict[str, int]:
    """Analytic FLOPs of one training step of any method (dispatch on the method's class).

    Args:
        method: a built audiojepa.methods method (M2D, MATPAC, JEPA, EncodecMAE).
        batch_size: global batch.
        **kwargs: for JEPA `mask_variant`; for EncodecMAE `batch_keys` (see their functions).
    """
    if isinstance(method, MATPAC):  # before M2D: MATPAC is an M2D subclass
        return matpac_step_flops(method, batch_size, **kwargs)
    if isinstance(method, M2D):
        return m2d_step_flops(method, batch_size, **kwargs)
    if isinstance(method, JEPA):
        return jepa_step_flops(method, batch_size, **kwargs)
    if isinstance(method, EncodecMAE):
        return encodecmae_step_flops(method, batch_size, **kwargs)
    raise TypeError(f"no FLOP formula for {type(method).__name__}; add one to audiojepa/training/flops.py.")
