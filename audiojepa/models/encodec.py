"""Frozen EnCodec 24 kHz encoder (SEANet) and residual vector quantizer, as in `encodec==0.1.1`.

EncodecMAE feeds the continuous encoder output to its transformer and predicts the RVQ codes of the
same frames. Both are frozen: the encoder is a Flax Linen module applied as a pure function of params
converted from the PyTorch state dict (`audiojepa.models.encodec_torch`), and the RVQ is a plain
function of the stacked codebooks. Nothing here updates codebooks (the torch quantizer does, through
EMA and dead-code replacement, whenever it is left in train mode).

Architecture of `EncodecModel.encodec_model_24khz` (details and line references in
shared/reference/encodecmae.md §2):
- waveform [batch, samples] at 24 kHz, mono, no normalisation;
- conv 1→32, k7; then for stride s in (2, 4, 5, 8): residual unit (ELU, conv C→C/2 k3, ELU,
  conv C/2→C k1, plus a 1×1 conv shortcut), ELU, conv C→2C with kernel 2s and stride s;
- a 2-layer LSTM (512 → 512) with a skip connection, y = LSTM(x) + x;
- ELU, conv 512→128, k7 → [batch, frames, 128] at 75 Hz (hop 320 samples).
Every conv is causal with reflect padding (`causal_padding`), so frames = ceil(samples / 320).

Batches of clips of different lengths: `EncodecEncoder(...)(waveform, num_samples)` zero-pads each row
to a common static length and redoes every conv's reflect padding at that row's own valid length
(`reflect_pad_valid`), so the first ceil(num_samples / 320) frames of a row equal encoding the clip
alone. Plain zero-padding changes the last frame whenever num_samples is not a multiple of 320 (the
right reflect padding then reads zeros); everything before it is causal and unaffected.

Parameter names carry the index of the torch module they come from (`encoder.model.{i}`):
`conv_0`, `resblock_1/{block_1, block_3, shortcut}`, `conv_3`, ..., `conv_12`, `lstm_13/layer_{l}`,
`conv_15`. Conv kernels are [kernel, in, out] (torch [out, in, kernel] transposed, weight norm
resolved); LSTM kernels are [in, 4·hidden] with torch's gate order (i, f, g, o) along the columns.

Everything is float32 and matmuls/convs run at `Precision.HIGHEST`: codes are argmins over distances
whose best and second-best values can differ by less than 1e-6, so TF32/bfloat16 passes on GPU/TPU
would flip codes.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 24000  # Hz
STRIDES = (2, 4, 5, 8)  # downsampling strides, in the order they are applied
HOP_LENGTH = math.prod(STRIDES)  # 320 samples per frame
FRAME_RATE = math.ceil(SAMPLE_RATE / HOP_LENGTH)  # 75 Hz
DIMENSION = 128  # encoder output channels = codebook vector size
CODEBOOK_SIZE = 1024  # entries per codebook
NUM_CODEBOOKS = 32  # codebooks of the 24 kHz model (24 kbps)
BITS_PER_CODE = math.log2(CODEBOOK_SIZE)
PRECISION = jax.lax.Precision.HIGHEST


def num_frames(num_samples: int) -> int:
    """Encoder frames (75 Hz) for a 24 kHz input of `num_samples`: ceil(num_samples / 320)."""
    return -(-num_samples // HOP_LENGTH)


def num_codebooks_for_bandwidth(bandwidth_kbps: float) -> int:
    """Codebooks EnCodec uses at a target bandwidth: 0.75 kbps each, e.g. 6.0 → 8, 24.0 → 32."""
    per_codebook_kbps = BITS_PER_CODE * FRAME_RATE / 1000
    n_q = max(1, math.floor(bandwidth_kbps / per_codebook_kbps))
    if n_q > NUM_CODEBOOKS:
        raise ValueError(f"bandwidth {bandwidth_kbps} kbps needs {n_q} codebooks; the 24 kHz model has "
                         f"{NUM_CODEBOOKS} (at most {NUM_CODEBOOKS * per_codebook_kbps:g} kbps).")
    return n_q


def causal_padding(length: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(left, right) padding in samples of EnCodec's causal SConv1d for an input of `length` steps.

    Left: kernel_size − stride (= (k−1)·dilation − (s−1) with dilation 1). Right: the extra samples
    that make the last window complete, so the conv yields ceil((length − k + left) / s) + 1 frames.
    """
    left = kernel_size - stride
    frames = math.ceil((length - kernel_size + left) / stride + 1)
    right = (frames - 1) * stride + kernel_size - left - length
    return left, right


def reflect_pad(x: jax.Array, left: int, right: int) -> jax.Array:
    """Reflect-pads x [batch, time, channels] along time, as encodec's `pad1d(mode='reflect')`.

    Reflection needs more input steps than the pad; when the input is not longer than the larger pad,
    zeros are appended first and cut off after padding (what encodec does), so short inputs work.
    """
    length = x.shape[1]
    zeros_appended = max(0, max(left, right) - length + 1)
    if zeros_appended:
        x = jnp.pad(x, ((0, 0), (0, zeros_appended), (0, 0)))
    x = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")
    return x[:, :x.shape[1] - zeros_appended]


def reflect_pad_valid(x: jax.Array, lengths: jax.Array, left: int, right: int, stride: int) -> jax.Array:
    """`reflect_pad` of each row's first `lengths[b]` steps, inside a buffer of static length.

    Row b of the result starts with exactly what `reflect_pad(x[b:b+1, :lengths[b]], left, right_b)` gives
    (short rows included: zeros appended before reflecting, as encodec does), where right_b =
    ceil(lengths[b] / stride)·stride − lengths[b] is the causal right pad of that length (`causal_padding`
    with left = kernel − stride). The rest of the row is zeros and only feeds outputs past the row's
    ceil(lengths[b] / stride) valid ones.

    Args:
        x: [batch, time, channels]; steps at and after lengths[b] are ignored.
        lengths: [batch] int valid steps per row, 0 <= lengths[b] <= time (dynamic).
        left: left pad in steps (kernel − stride).
        right: right pad of the full buffer (`causal_padding(time, ...)[1]`), static.
        stride: the conv's stride.

    Returns:
        [batch, left + time + right, channels].
    """
    time = x.shape[1]
    position = jnp.arange(-left, time + right)[None, :]  # padded step p ↔ input step p (negative: left pad)
    length = lengths.astype(jnp.int32)[:, None]
    right_b = -(-length // stride) * stride - length
    # encodec's short-input rule: append zeros until the reflection fits, pad, cut them off again.
    appended = jnp.maximum(0, jnp.maximum(left, right_b) - length + 1)
    extended = length + appended  # the reflected sequence: the row, then `appended` zeros
    source = jnp.where(position < 0, -position, jnp.where(position < extended, position,
                                                          2 * extended - 2 - position))
    keep = (source >= 0) & (source < length) & (position < length + right_b)
    gathered = jnp.take_along_axis(x, jnp.clip(source, 0, time - 1)[..., None], axis=1)
    return jnp.where(keep[..., None], gathered, jnp.zeros((), x.dtype))


class CausalConv1d(nn.Module):
    """EnCodec's causal SConv1d: reflect padding (`causal_padding`), then a VALID strided conv.

    Attributes:
        features: output channels.
        kernel_size: kernel width in time steps.
        stride: time stride.
    """
    features: int
    kernel_size: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """x: [batch, time, in_channels] → [batch, ceil(time / stride), features].

        With `lengths` ([batch] valid steps per row), each row is padded at its own length
        (`reflect_pad_valid`): output steps < ceil(lengths[b] / stride) equal the conv of that row alone.
        """
        in_channels = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.kernel_size, in_channels, self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        left, right = causal_padding(x.shape[1], self.kernel_size, self.stride)
        if lengths is None:
            x = reflect_pad(x, left, right)
        else:
            x = reflect_pad_valid(x, lengths, left, right, self.stride)
        y = jax.lax.conv_general_dilated(x, kernel, window_strides=(self.stride,), padding="VALID",
                                         dimension_numbers=("NWC", "WIO", "NWC"), precision=PRECISION)
        return y + bias


class ResidualUnit(nn.Module):
    """SEANet residual block: shortcut(x) + conv_k1(ELU(conv_k3(ELU(x)))), the inner width halved.

    The shortcut is a 1×1 conv (encodec's `true_skip=False`). Names follow torch: `block_1`, `block_3`
    (indices in `block`), `shortcut`.
    """
    channels: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
        """x: [batch, time, channels] → [batch, time, channels]; `lengths` as in CausalConv1d."""
        hidden = self.channels // 2
        y = CausalConv1d(hidden, self.kernel_size, name="block_1")(nn.elu(x), lengths)
        y = CausalConv1d(self.channels, 1, name="block_3")(nn.elu(y), lengths)
        return CausalConv1d(self.channels, 1, name="shortcut")(x, lengths) + y


def _torch_lstm_init(hidden: int):
    """U(−1/√hidden, 1/√hidden), torch's LSTM init; only for `init` (the encoder is always converted)."""
    bound = 1.0 / math.sqrt(hidden)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class LSTMLayer(nn.Module):
    """One unidirectional LSTM layer with torch.nn.LSTM's equations and parameter layout.

    Params: `kernel_ih` [in, 4·hidden], `kernel_hh` [hidden, 4·hidden] (torch weight_ih / weight_hh
    transposed), `bias_ih`, `bias_hh` [4·hidden]; gate columns in torch order (input, forget, cell, output).
    The state starts at zero. The input projection runs for all steps at once; only the recurrent
    matmul is inside the `lax.scan` over time.
    """
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, time, in] → hidden states [batch, time, hidden]."""
        init = _torch_lstm_init(self.hidden)
        kernel_ih = self.param("kernel_ih", init, (x.shape[-1], 4 * self.hidden))
        kernel_hh = self.param("kernel_hh", init, (self.hidden, 4 * self.hidden))
        bias_ih = self.param("bias_ih", init, (4 * self.hidden,))
        bias_hh = self.param("bias_hh", init, (4 * self.hidden,))
        input_gates = jnp.matmul(x, kernel_ih, precision=PRECISION) + bias_ih + bias_hh

        def step(carry, gates_t):
            h, c = carry
            gates = gates_t + jnp.matmul(h, kernel_hh, precision=PRECISION)
            i, f, g, o = jnp.split(gates, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        # Sliced from the inputs so that the carry keeps their batch sharding under an Explicit mesh (scan
        # requires the carry's type, sharding included, to be the same in and out).
        zeros = jnp.zeros_like(input_gates[:, 0, :self.hidden])
        _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(input_gates, 0, 1))
        return jnp.swapaxes(hs, 0, 1)


class LSTM(nn.Module):
    """Stacked LSTM (`layer_0`, `layer_1`, ...) with the same width throughout; no skip (see EncodecEncoder)."""
    hidden: int
    num_layers: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, time, in] → [batch, time, hidden]."""
        for layer in range(self.num_layers):
            x = LSTMLayer(self.hidden, name=f"layer_{layer}")(x)
        return x


class EncodecEncoder(nn.Module):
    """SEANet encoder of EnCodec 24 kHz (defaults = the released model).

    7,423,472 params: torch's 7,425,792 less the 2,320 weight-norm gains folded into the kernels.

    Attributes:
        n_filters: channels after the first conv; doubled at every downsampling.
        dimension: output channels.
        strides: downsampling strides in order of application (the torch `ratios` reversed).
        kernel_size, last_kernel_size, residual_kernel_size: conv widths in time steps.
        lstm_layers: LSTM layers on the downsampled sequence (0 for none).
    """
    n_filters: int = 32
    dimension: int = DIMENSION
    strides: tuple[int, ...] = STRIDES
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    lstm_layers: int = 2

    @nn.compact
    def __call__(self, waveform: jax.Array, num_samples: jax.Array | None = None) -> jax.Array:
        """waveform: [batch, samples] float32 at 24 kHz → embeddings [batch, frames, dimension] at 75 Hz,
        frames = ceil(samples / 320) (`num_frames`).

        num_samples: optional [batch] int valid samples per row (the rest is padding): row b's first
        ceil(num_samples[b] / 320) frames then equal encoding waveform[b, :num_samples[b]] alone (module
        docstring); later frames are meaningless. The LSTM is causal, so it needs no lengths.
        """
        lengths = num_samples
        x = CausalConv1d(self.n_filters, self.kernel_size, name="conv_0")(
            waveform.astype(jnp.float32)[..., None], lengths)
        channels, index = self.n_filters, 1
        for stride in self.strides:
            x = ResidualUnit(channels, self.residual_kernel_size, name=f"resblock_{index}")(x, lengths)
            x = CausalConv1d(2 * channels, 2 * stride, stride, name=f"conv_{index + 2}")(nn.elu(x), lengths)
            if lengths is not None:
                lengths = -(-lengths // stride)
            channels, index = 2 * channels, index + 3
        if self.lstm_layers:
            x = LSTM(channels, self.lstm_layers, name=f"lstm_{index}")(x) + x
            index += 1
        return CausalConv1d(self.dimension, self.last_kernel_size, name=f"conv_{index + 1}")(nn.elu(x), lengths)


def _check_num_codebooks(codebooks: jax.Array, num_codebooks: int) -> None:
    if not isinstance(num_codebooks, (int, np.integer)) or not 1 <= num_codebooks <= codebooks.shape[0]:
        raise ValueError(f"num_codebooks must be a Python int in [1, {codebooks.shape[0]}] (a static value: "
                         f"the codebooks given are {tuple(codebooks.shape)}), got {num_codebooks!r}.")


def squared_distances(vectors: jax.Array, codebook: jax.Array) -> jax.Array:
    """‖v‖² − 2 v·e + ‖e‖², in encodec's order of operations. vectors [..., D], codebook [K, D] → [..., K]."""
    cross = jnp.matmul(vectors, codebook.T, precision=PRECISION)
    return (jnp.sum(vectors ** 2, axis=-1, keepdims=True) - 2 * cross) + jnp.sum(codebook ** 2, axis=-1)


def _lookup(codebook: jax.Array, codes: jax.Array) -> jax.Array:
    """codebook[codes] as a one-hot matmul, exact in float32 at HIGHEST precision: [K, D], [...] int → [..., D].

    A gather of a replicated codebook with batch-sharded indices has no unambiguous output sharding
    under an Explicit mesh (the trainer's); a matmul with the one-hot codes inherits the batch sharding.
    """
    one_hot = jax.nn.one_hot(codes, codebook.shape[0], dtype=codebook.dtype)
    return jnp.matmul(one_hot, codebook, precision=PRECISION)


def rvq_encode(codebooks: jax.Array, embeddings: jax.Array, num_codebooks: int) -> tuple[jax.Array, jax.Array]:
    """Residual vector quantization with the first `num_codebooks` codebooks (frozen, no updates).

    Stage q picks the codebook-q entry nearest (squared L2; first index on exact ties) to the
    residual, subtracts it, and passes the rest on.

    Args:
        codebooks: [n_codebooks_total, codebook_size, dim], e.g. [32, 1024, 128].
        embeddings: [batch, frames, dim] continuous encoder output.
        num_codebooks: n_q (static), e.g. 8 for EnCodec's 6 kbps (`num_codebooks_for_bandwidth`).

    Returns:
        codes [batch, frames, n_q] int32 and the reconstruction Σ_q codebooks[q][codes[..., q]]
        [batch, frames, dim].
    """
    _check_num_codebooks(codebooks, num_codebooks)

    def stage(carry, codebook):
        residual, quantized = carry
        codes = jnp.argmin(squared_distances(residual, codebook), axis=-1).astype(jnp.int32)
        chosen = _lookup(codebook, codes)
        return (residual - chosen, quantized + chosen), codes

    embeddings = embeddings.astype(jnp.float32)
    (_, quantized), codes = jax.lax.scan(stage, (embeddings, jnp.zeros_like(embeddings)),
                                         codebooks[:num_codebooks])
    return jnp.moveaxis(codes, 0, -1), quantized


def rvq_decode(codebooks: jax.Array, codes: jax.Array) -> jax.Array:
    """Σ_q codebooks[q][codes[..., q]]. codebooks [n_total, K, D], codes [..., n_q] int → [..., D]."""
    num_codebooks = codes.shape[-1]
    _check_num_codebooks(codebooks, num_codebooks)
    picked = jax.vmap(_lookup, in_axes=(0, -1), out_axes=0)(
        codebooks[:num_codebooks], codes)
    return jnp.sum(picked, axis=0)


def encode(params: dict, waveform: jax.Array, num_codebooks: int) -> tuple[jax.Array, jax.Array]:
    """Continuous embeddings and RVQ codes of a 24 kHz waveform, from converted params.

    Args:
        params: {"encoder": EncodecEncoder params, "codebooks": [n_total, 1024, 128]}, as
            `audiojepa.models.encodec_torch.convert` returns.
        waveform: [batch, samples] float32 at 24 kHz.
        num_codebooks: n_q (static).

    Returns:
        embeddings [batch, frames, 128] and codes [batch, frames, n_q] int32 (frames at 75 Hz).
    """
    embeddings = EncodecEncoder().apply({"params": params["encoder"]}, waveform)
    codes, _ = rvq_encode(params["codebooks"], embeddings, num_codebooks)
    return embeddings, codes
