"""Gravis UltraSound patch files (`.pat`, "GF1PATCH110"): the recorded note samples inside, as waveforms.

Sound banks such as Debian's `freepats` ship one patch per General MIDI instrument; each holds a few recorded
notes (one per key range) as raw PCM with a loop region that a synthesiser repeats while the key is held. The
dev benchmark (audiojepa.data.dev_benchmark) lists a patch's samples like archive members and renders each as a
held note with `render_note`.

Layout (all little-endian; the format of the GF1 patch, as TiMidity reads it): a 129-byte header
("GF1PATCH110\\0" or "GF1PATCH100\\0", "ID#000002\\0", a 60-byte description, instruments u8, voices u8,
channels u8, waveforms u16, master volume u16, data size u32, 36 reserved), a 63-byte instrument header (id u16,
name[16], size u32, layers u8, 40 reserved), a 47-byte layer header (duplicate u8, layer u8, size u32, samples u8,
40 reserved), then per sample a 96-byte header followed by its data: name[7], fractions u8, data size u32 (bytes),
loop start u32, loop end u32 (bytes), sample rate u16 (Hz), low / high / root frequency u32 (milli-Hz), tune
i16, balance u8, envelope rates[6], offsets[6], tremolo and vibrato sweep/rate/depth (6 x u8), modes u8 (bit 0:
16-bit, bit 1: unsigned, bit 2: looping, bit 3: ping-pong, bit 4: reverse), scale frequency u16, scale factor
u16, 36 reserved.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

MAGICS = (b"GF1PATCH110\x00", b"GF1PATCH100\x00")
HEADER_BYTES, INSTRUMENT_BYTES, LAYER_BYTES, SAMPLE_HEADER_BYTES = 129, 63, 47, 96
MODE_16BIT, MODE_UNSIGNED, MODE_LOOPING, MODE_PINGPONG, MODE_REVERSE = 1, 2, 4, 8, 16
# name, fractions, size, loop start, loop end, rate, low, high, root, tune, balance, 6 rates, 6 offsets,
# tremolo x3, vibrato x3, modes, scale frequency, scale factor, 36 reserved.
_SAMPLE_HEADER = struct.Struct("<7sBIIIHIIIhB6s6s6sBHH36s")
assert _SAMPLE_HEADER.size == SAMPLE_HEADER_BYTES


class PatchError(ValueError):
    """A file that is not a GF1 patch, or one cut short; the message names the file."""


@dataclasses.dataclass(frozen=True)
class PatchSample:
    """One recorded note: `wave` float32 in [-1, 1) at `sample_rate` Hz; loop bounds in samples (end exclusive;
    0, 0 without a loop); frequencies in Hz (the key range it plays and the pitch it was recorded at)."""
    name: str
    wave: np.ndarray
    sample_rate: int
    loop_start: int
    loop_end: int
    looping: bool
    low_hz: float
    high_hz: float
    root_hz: float


def read_patch(path: str) -> list[PatchSample]:
    """Every sample of the patch at `path`, in file order. PatchError naming the file if it is not a GF1 patch or
    ends early."""
    with open(path, "rb") as f:
        data = f.read()
    return parse_patch(data, where=path)


def parse_patch(data: bytes, *, where: str = "<bytes>") -> list[PatchSample]:
    """`read_patch` on the file's bytes; `where` names it in errors."""
    if data[:12] not in MAGICS:
        raise PatchError(f"{where}: not a GF1 patch (starts {data[:12]!r}, expected {MAGICS[0]!r})")
    if len(data) < HEADER_BYTES + INSTRUMENT_BYTES + LAYER_BYTES:
        raise PatchError(f"{where}: truncated: {len(data)} bytes, shorter than the patch headers")
    instruments = data[82]
    if instruments != 1:
        raise PatchError(f"{where}: {instruments} instruments; only single-instrument patches are read")
    layer = HEADER_BYTES + INSTRUMENT_BYTES
    count = data[layer + 6]
    samples, pos = [], layer + LAYER_BYTES
    for index in range(count):
        if pos + SAMPLE_HEADER_BYTES > len(data):
            raise PatchError(f"{where}: truncated in sample {index}'s header (of {count})")
        (name, _fractions, size, loop_start, loop_end, rate, low, high, root, _tune, _balance, _rates, _offsets,
         _modulation, modes, _scale_freq, _scale_factor, _reserved) = _SAMPLE_HEADER.unpack_from(data, pos)
        pos += SAMPLE_HEADER_BYTES
        if pos + size > len(data):
            raise PatchError(f"{where}: truncated in sample {index}'s data ({size} bytes announced, "
                             f"{len(data) - pos} left)")
        if rate <= 0:
            raise PatchError(f"{where}: sample {index} has sample rate 0")
        raw = data[pos:pos + size]
        pos += size
        width = 2 if modes & MODE_16BIT else 1
        if modes & MODE_UNSIGNED:
            ints = np.frombuffer(raw[:size - size % width], "<u2" if width == 2 else "u1").astype(np.int32)
            ints -= 1 << (8 * width - 1)
        else:
            ints = np.frombuffer(raw[:size - size % width], "<i2" if width == 2 else "i1").astype(np.int32)
        wave = (ints / float(1 << (8 * width - 1))).astype(np.float32)
        if modes & MODE_REVERSE:
            wave = wave[::-1].copy()
        # Loop points in samples, within the data; a loop left empty by that (points past the data) is no loop.
        start, end = min(loop_start // width, len(wave)), min(loop_end // width, len(wave))
        looping = bool(modes & MODE_LOOPING) and end > start
        samples.append(PatchSample(
            name=name.split(b"\x00", 1)[0].decode("latin-1"), wave=wave, sample_rate=int(rate),
            loop_start=start if looping else 0, loop_end=end if looping else 0, looping=looping,
            low_hz=low / 1000.0, high_hz=high / 1000.0, root_hz=root / 1000.0))
    return samples


def render_note(sample: PatchSample, seconds: float, fade_seconds: float = 0.05) -> np.ndarray:
    """The note as a synthesiser plays it held for `seconds`: the recorded data up to the loop's end, then the
    loop repeated, cut at `seconds` with a linear fade-out over the last `fade_seconds`. A sample without a loop
    is its data as recorded (cut at `seconds` if longer), with the same fade where it is cut. Ping-pong loops are
    played forwards (the loop's pitch and timbre are what matter here). float32 [samples] at sample.sample_rate."""
    target = max(1, int(round(seconds * sample.sample_rate)))
    wave = sample.wave
    if sample.looping and len(wave) < target:
        head, loop = wave[:sample.loop_end], wave[sample.loop_start:sample.loop_end]
        repeats = -(-(target - len(head)) // len(loop))
        wave = np.concatenate([head, np.tile(loop, repeats)])
    cut = len(wave) > target
    wave = wave[:target].copy()
    if cut or sample.looping:
        fade = min(len(wave), int(round(fade_seconds * sample.sample_rate)))
        if fade > 0:
            wave[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
    return wave
