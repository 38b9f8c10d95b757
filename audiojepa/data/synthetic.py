"""Procedural sound clips: the embedded default corpus, needing no download.

Each clip is one sound event of a single class (a burst pattern or a mixture for two of the
classes) over low-level coloured background noise, then scaled to a random peak level. The main
event of every class covers 60-100 % of the clip (`_EVENT_COVER_MIN`), as in a sound-event
dataset whose clips are cut around their events, so a time-pooled clip embedding describes the
event rather than the background. Classes, in the order of `CLASS_NAMES` (clip `index` has class
`CLASS_NAMES[index % len(CLASS_NAMES)]`):

- `harmonic_tone`: one note, f0 80-1000 Hz (log-uniform), 2-12 harmonics with power-law
  rolloff k**-alpha (alpha 0.5-2.5), ADSR envelope.
- `noise_burst`: 1-4 bursts per second of clip (at least one) of band-pass noise, centre
  150-6000 Hz, bandwidth 0.1-1 octave, 0.03-0.6 s each, ADSR or exponential-decay envelope.
- `chirp_up` / `chirp_down`: a linear or exponential sweep between a low frequency of
  80-1500 Hz and 1.5-10x that, 0-3 extra harmonics.
- `am_tone`: carrier 150-3000 Hz with 1-4 harmonics, sinusoidal amplitude modulation at
  2-20 Hz with depth 0.3-1.
- `fm_tone`: carrier 150-2500 Hz with 1-5 harmonics, vibrato at 2-12 Hz with a deviation of
  2-20 % of the carrier.
- `click_train`: damped-sinusoid clicks (resonance 300-6000 Hz, decay 1-20 ms) at 2-40 Hz
  with 0-30 % timing jitter.
- `mixture`: 2 or 3 distinct classes from the above, each peak-normalized, summed with gains
  0.3-1.

Every clip: background noise with spectral tilt f**-beta (beta 0-1.5) at an SNR of 10-40 dB
against the clip's RMS, then a peak of 0.1-0.9 (log-uniform). All frequencies stay below
0.45 * sample_rate. A clip depends only on (index, sample_rate, duration_s, seed).
(`embedded.CORPUS_VERSION` 1 drew events of fixed lengths in seconds, often a tenth of a clip.)
"""

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import scipy.fft

CLASS_NAMES: tuple[str, ...] = (
    "harmonic_tone",
    "noise_burst",
    "chirp_up",
    "chirp_down",
    "am_tone",
    "fm_tone",
    "click_train",
    "mixture",
)

# Spectral content is masked above this fraction of the sample rate; drawn frequencies are
# capped lower so that a tone's fundamental never sits on the mask edge.
_MASK_FRACTION = 0.45
_DRAW_FRACTION = 0.4
_MIN_SAMPLE_RATE = 8000
_MIN_DURATION_S = 0.1
# A clip's main event covers at least this fraction of it, so a time-pooled clip embedding
# describes the event rather than the background noise around it.
_EVENT_COVER_MIN = 0.6

Params = dict[str, Any]


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _span(rng: np.random.Generator, n_samples: int, length: int) -> tuple[int, int]:
    """(start, length) in samples: `length` clipped to 1..n_samples, at a uniformly drawn start."""
    length = int(np.clip(length, 1, n_samples))
    return int(rng.integers(0, n_samples - length + 1)), length


def _event_span(rng: np.random.Generator, n_samples: int, sample_rate: int,
                min_s: float, max_s: float) -> tuple[int, int]:
    """Draws (start, length) in samples of one event of min_s..max_s seconds inside a clip of `n_samples`."""
    return _span(rng, n_samples, int(rng.uniform(min_s, max_s) * sample_rate))


def _main_event_span(rng: np.random.Generator, n_samples: int) -> tuple[int, int]:
    """Draws (start, length) in samples of a clip's main event: it covers 60-100 % of the clip."""
    return _span(rng, n_samples, round(rng.uniform(_EVENT_COVER_MIN, 1.0) * n_samples))


def _adsr(rng: np.random.Generator, length: int, sample_rate: int) -> np.ndarray:
    """Attack-decay-sustain-release envelope: [length], peak 1."""
    attack_s, decay_s = rng.uniform(0.005, 0.2), rng.uniform(0.02, 0.4)
    release_s, sustain = rng.uniform(0.02, 0.6), rng.uniform(0.2, 1.0)
    attack, decay, release = np.array([attack_s, decay_s, release_s]) * sample_rate
    # Short events keep the envelope's shape, squeezed into 90 % of the event.
    squeeze = min(1.0, 0.9 * length / (attack + decay + release))
    attack, decay, release = attack * squeeze, decay * squeeze, release * squeeze
    knots = [0.0, attack, attack + decay, length - release, length]
    return np.interp(np.arange(length), knots, [0.0, 1.0, sustain, sustain, 0.0])


def _fade(length: int, sample_rate: int, fade_s: float = 0.01) -> np.ndarray:
    """Raised-cosine fade in and out: [length], avoiding broadband clicks at event edges."""
    n_fade = max(1, min(int(fade_s * sample_rate), length // 2))
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_fade) / n_fade)
    envelope = np.ones(length)
    envelope[:n_fade] = ramp
    envelope[length - n_fade:] = np.minimum(envelope[length - n_fade:], ramp[::-1])
    return envelope


def _harmonic_stack(rng: np.random.Generator, phase: np.ndarray, freq_hz: np.ndarray | float,
                    amplitudes: np.ndarray, sample_rate: int) -> np.ndarray:
    """Sum of harmonics k = 1..K of a fundamental.

    Args:
        phase: [length] fundamental phase in radians.
        freq_hz: fundamental frequency in Hz, scalar or [length] (instantaneous).
        amplitudes: [K] amplitude of harmonic k = 1..K.

    Returns:
        [length]; harmonics whose frequency reaches 0.45 * sample_rate are muted there.
    """
    k = np.arange(1, len(amplitudes) + 1, dtype=np.float32)[:, None]
    offsets = rng.uniform(0, 2 * np.pi, size=k.shape).astype(np.float32)
    audible = k * np.asarray(freq_hz, np.float32) < _MASK_FRACTION * sample_rate
    gains = amplitudes.astype(np.float32)[:, None] * audible
    # float32 sine is several times faster; wrapping first keeps k * phase small enough
    # (< 2 pi * K) that float32 rounding stays far below audibility.
    wrapped = np.mod(phase, 2 * np.pi).astype(np.float32)
    return np.sum(gains * np.sin(k * wrapped + offsets), axis=0)


def _rolloff(rng: np.random.Generator, n_harmonics: int) -> tuple[np.ndarray, float]:
    """[n_harmonics] amplitudes k**-alpha with jitter on the overtones; returns (amps, alpha)."""
    alpha = rng.uniform(0.5, 2.5)
    amplitudes = np.arange(1, n_harmonics + 1, dtype=np.float64) ** -alpha
    amplitudes[1:] *= rng.uniform(0.5, 1.0, size=n_harmonics - 1)
    return amplitudes, float(alpha)


def _passband(freqs_hz: np.ndarray, sample_rate: int) -> np.ndarray:
    """Boolean mask of the FFT bins that synthesized sound may occupy: 20 Hz to 0.45 * sr."""
    return (freqs_hz >= 20.0) & (freqs_hz < _MASK_FRACTION * sample_rate)


def _shaped_noise(rng: np.random.Generator, length: int, sample_rate: int,
                  gain_of_hz: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Gaussian noise [length] whose amplitude spectrum is `gain_of_hz(freqs_hz)`.

    The spectrum is drawn directly in the frequency domain (one inverse FFT); content below
    20 Hz and from 0.45 * sample_rate up is removed.
    """
    freqs = np.fft.rfftfreq(length, 1.0 / sample_rate)
    n_bins = len(freqs)
    # Complex Gaussian bins by Box-Muller in float32: much faster than standard_normal.
    u = rng.random((2, n_bins), dtype=np.float32)
    radius = np.sqrt(-2.0 * np.log1p(-u[0]))
    angle = np.float32(2 * np.pi) * u[1]
    keep = _passband(freqs, sample_rate)
    gains = np.zeros(n_bins, np.float32)
    gains[keep] = gain_of_hz(freqs[keep])
    radius *= gains
    spectrum = radius * np.cos(angle) + 1j * (radius * np.sin(angle))
    return scipy.fft.irfft(spectrum, n=length)


def _place(n_samples: int, start: int, event: np.ndarray) -> np.ndarray:
    out = np.zeros(n_samples)
    out[start:start + len(event)] = event
    return out


# One synthesizer per class: (rng, n_samples, sample_rate) -> (signal [n_samples] float64 at an
# arbitrary scale, params dict of what was drawn). Event onsets and lengths are drawn inside.


def _harmonic_tone(rng, n_samples, sample_rate):
    start, length = _main_event_span(rng, n_samples)
    f0 = _log_uniform(rng, 80.0, min(1000.0, _DRAW_FRACTION * sample_rate))
    amplitudes, alpha = _rolloff(rng, int(rng.integers(2, 13)))
    phase = 2 * np.pi * f0 * np.arange(length) / sample_rate
    tone = _harmonic_stack(rng, phase, f0, amplitudes, sample_rate)
    tone *= _adsr(rng, length, sample_rate)
    params = dict(f0_hz=f0, n_harmonics=len(amplitudes), rolloff=alpha,
                  start_s=start / sample_rate, length_s=length / sample_rate)
    return _place(n_samples, start, tone), params


def _noise_burst(rng, n_samples, sample_rate):
    out = np.zeros(n_samples)
    bursts = []
    # 1-4 bursts per second of clip, at least one.
    n_bursts = max(1, round(rng.uniform(1.0, 4.0) * n_samples / sample_rate))
    for _ in range(n_bursts):
        start, length = _event_span(rng, n_samples, sample_rate, 0.03, 0.6)
        centre_hz = _log_uniform(rng, 150.0, min(6000.0, _DRAW_FRACTION * sample_rate))
        bandwidth_oct = rng.uniform(0.1, 1.0)
        band = lambda f, c=centre_hz, b=bandwidth_oct: np.exp(-0.5 * (np.log2(f / c) / b) ** 2)
        burst = _shaped_noise(rng, length, sample_rate, band)
        burst /= np.max(np.abs(burst)) + 1e-12
        if rng.random() < 0.5:
            decay_s = rng.uniform(0.01, 0.2)
            decay = np.exp(-np.arange(length) / (decay_s * sample_rate))
            burst *= decay * _fade(length, sample_rate, 0.002)
            shape = "exp_decay"
        else:
            burst *= _adsr(rng, length, sample_rate)
            shape = "adsr"
        out[start:start + length] += rng.uniform(0.3, 1.0) * burst
        bursts.append(dict(centre_hz=centre_hz, bandwidth_oct=float(bandwidth_oct), envelope=shape,
                           start_s=start / sample_rate, length_s=length / sample_rate))
    return out, dict(bursts=bursts)


def _chirp(rng, n_samples, sample_rate, upward: bool):
    start, length = _main_event_span(rng, n_samples)
    f_max = _DRAW_FRACTION * sample_rate
    f_low = _log_uniform(rng, 80.0, 1500.0)
    f_high = min(f_low * rng.uniform(1.5, 10.0), f_max)
    f_start, f_end = (f_low, f_high) if upward else (f_high, f_low)
    progress = np.arange(length) / length
    sweep = "exponential" if rng.random() < 0.5 else "linear"
    if sweep == "exponential":
        freq = f_start * (f_end / f_start) ** progress
    else:
        freq = f_start + (f_end - f_start) * progress
    phase = 2 * np.pi * np.cumsum(freq) / sample_rate
    amplitudes, alpha = _rolloff(rng, int(rng.integers(1, 5)))
    chirp = _harmonic_stack(rng, phase, freq, amplitudes, sample_rate)
    chirp *= _fade(length, sample_rate, rng.uniform(0.005, 0.05))
    params = dict(f_start_hz=f_start, f_end_hz=f_end, sweep=sweep, n_harmonics=len(amplitudes),
                  rolloff=alpha, start_s=start / sample_rate, length_s=length / sample_rate)
    return _place(n_samples, start, chirp), params


def _am_tone(rng, n_samples, sample_rate):
    start, length = _main_event_span(rng, n_samples)
    carrier_hz = _log_uniform(rng, 150.0, min(3000.0, _DRAW_FRACTION * sample_rate))
    rate_hz, depth = _log_uniform(rng, 2.0, 20.0), rng.uniform(0.3, 1.0)
    t = np.arange(length) / sample_rate
    amplitudes, alpha = _rolloff(rng, int(rng.integers(1, 5)))
    tone = _harmonic_stack(rng, 2 * np.pi * carrier_hz * t, carrier_hz, amplitudes, sample_rate)
    mod_phase = 2 * np.pi * rate_hz * t + rng.uniform(0, 2 * np.pi)
    modulator = 1.0 - depth * 0.5 * (1.0 - np.cos(mod_phase))
    tone *= modulator * _adsr(rng, length, sample_rate)
    params = dict(carrier_hz=carrier_hz, mod_rate_hz=rate_hz, mod_depth=float(depth),
                  n_harmonics=len(amplitudes), rolloff=alpha,
                  start_s=start / sample_rate, length_s=length / sample_rate)
    return _place(n_samples, start, tone), params


def _fm_tone(rng, n_samples, sample_rate):
    start, length = _main_event_span(rng, n_samples)
    carrier_hz = _log_uniform(rng, 150.0, min(2500.0, _DRAW_FRACTION * sample_rate / 1.2))
    rate_hz, deviation = _log_uniform(rng, 2.0, 12.0), rng.uniform(0.02, 0.2)
    t = np.arange(length) / sample_rate
    vibrato_phase = 2 * np.pi * rate_hz * t + rng.uniform(0, 2 * np.pi)
    freq = carrier_hz * (1.0 + deviation * np.sin(vibrato_phase))
    phase = 2 * np.pi * np.cumsum(freq) / sample_rate
    amplitudes, alpha = _rolloff(rng, int(rng.integers(1, 6)))
    tone = _harmonic_stack(rng, phase, freq, amplitudes, sample_rate)
    tone *= _adsr(rng, length, sample_rate)
    params = dict(carrier_hz=carrier_hz, vibrato_rate_hz=rate_hz, deviation=float(deviation),
                  n_harmonics=len(amplitudes), rolloff=alpha,
                  start_s=start / sample_rate, length_s=length / sample_rate)
    return _place(n_samples, start, tone), params


def _click_train(rng, n_samples, sample_rate):
    start, length = _main_event_span(rng, n_samples)
    rate_hz, jitter = _log_uniform(rng, 2.0, 40.0), rng.uniform(0.0, 0.3)
    resonance_hz = _log_uniform(rng, 300.0, min(6000.0, _DRAW_FRACTION * sample_rate))
    decay_s = _log_uniform(rng, 0.001, 0.02)
    period = sample_rate / rate_hz
    n_clicks = max(1, int(length / period))
    times = (np.arange(n_clicks) + 0.5) * period
    times += rng.uniform(-0.5, 0.5, n_clicks) * jitter * period
    impulses = np.zeros(length)
    impulses[np.clip(times.astype(int), 0, length - 1)] = rng.uniform(0.5, 1.0, n_clicks)
    t = np.arange(int(5 * decay_s * sample_rate) + 1) / sample_rate
    click = np.exp(-t / decay_s) * np.sin(2 * np.pi * resonance_hz * t)
    # Convolution by FFT, masked to the passband: short clicks have wide spectral skirts.
    n_fft = scipy.fft.next_fast_len(length + len(click) - 1, real=True)
    spectrum = scipy.fft.rfft(impulses, n_fft) * scipy.fft.rfft(click, n_fft)
    spectrum *= _passband(np.fft.rfftfreq(n_fft, 1.0 / sample_rate), sample_rate)
    train = scipy.fft.irfft(spectrum, n_fft)[:length]
    params = dict(rate_hz=rate_hz, jitter=float(jitter), resonance_hz=resonance_hz,
                  decay_s=decay_s, n_clicks=n_clicks,
                  start_s=start / sample_rate, length_s=length / sample_rate)
    return _place(n_samples, start, train), params


def _mixture(rng, n_samples, sample_rate):
    base = CLASS_NAMES[:-1]
    picks = rng.choice(len(base), size=int(rng.integers(2, 4)), replace=False)
    out = np.zeros(n_samples)
    components = []
    for pick in picks:
        name = base[int(pick)]
        part, part_params = _SYNTHS[name](rng, n_samples, sample_rate)
        gain = rng.uniform(0.3, 1.0)
        out += gain * part / (np.max(np.abs(part)) + 1e-12)
        components.append(dict(class_name=name, gain=float(gain), **part_params))
    return out, dict(components=components)


_SYNTHS = {
    "harmonic_tone": _harmonic_tone,
    "noise_burst": _noise_burst,
    "chirp_up": lambda rng, n, sr: _chirp(rng, n, sr, upward=True),
    "chirp_down": lambda rng, n, sr: _chirp(rng, n, sr, upward=False),
    "am_tone": _am_tone,
    "fm_tone": _fm_tone,
    "click_train": _click_train,
    "mixture": _mixture,
}
assert tuple(_SYNTHS) == CLASS_NAMES


def _render(index: int, sample_rate: int, duration_s: float, seed: int
            ) -> tuple[np.ndarray, Params]:
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    if sample_rate < _MIN_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be >= {_MIN_SAMPLE_RATE} Hz, got {sample_rate}")
    if duration_s < _MIN_DURATION_S:
        raise ValueError(f"duration_s must be >= {_MIN_DURATION_S} s, got {duration_s}")
    n_samples = round(duration_s * sample_rate)
    class_name = CLASS_NAMES[index % len(CLASS_NAMES)]
    rng = np.random.default_rng([seed, index])

    signal, params = _SYNTHS[class_name](rng, n_samples, sample_rate)
    signal /= np.max(np.abs(signal)) + 1e-12

    snr_db, tilt = rng.uniform(10.0, 40.0), rng.uniform(0.0, 1.5)
    noise = _shaped_noise(rng, n_samples, sample_rate, lambda f: f ** (-tilt / 2))
    signal_rms = np.sqrt(np.mean(signal ** 2))
    noise *= signal_rms / (np.sqrt(np.mean(noise ** 2)) + 1e-12) * 10 ** (-snr_db / 20)
    mixed = signal + noise

    peak = _log_uniform(rng, 0.1, 0.9)
    waveform = (mixed * (peak / np.max(np.abs(mixed)))).astype(np.float32)
    params = dict(class_name=class_name, peak=peak, snr_db=float(snr_db), noise_tilt=float(tilt),
                  **params)
    return waveform, params


def synthesize_clip(index: int, *, sample_rate: int = 16000, duration_s: float = 3.0,
                    seed: int = 0) -> tuple[np.ndarray, str]:
    """One procedural clip.

    Args:
        index: clip number >= 0; its class is `CLASS_NAMES[index % len(CLASS_NAMES)]`.
        sample_rate: Hz, >= 8000.
        duration_s: clip length in seconds, >= 0.1.
        seed: corpus seed >= 0; the clip depends only on (index, sample_rate, duration_s, seed).

    Returns:
        (waveform, class_name): waveform is float32 mono [round(duration_s * sample_rate)] with
        peak |amplitude| in [0.1, 0.9].
    """
    waveform, params = _render(index, sample_rate, duration_s, seed)
    return waveform, params["class_name"]


def describe_clip(index: int, *, sample_rate: int = 16000, duration_s: float = 3.0,
                  seed: int = 0) -> Params:
    """The parameters drawn for `synthesize_clip` with the same arguments (it synthesizes the clip).

    Returns:
        dict with `class_name`, `peak`, `snr_db`, `noise_tilt` and class-specific entries:
        frequencies in Hz (`*_hz`), times in seconds (`start_s`, `length_s`, `decay_s`);
        `noise_burst` lists `bursts`, `mixture` lists `components` (each with its `class_name`).
    """
    return _render(index, sample_rate, duration_s, seed)[1]


def synthesize_clips(num_clips: int, *, sample_rate: int = 16000, duration_s: float = 3.0,
                     seed: int = 0) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yields (clip_id, waveform [n_samples] float32, class_name) for indices 0..num_clips-1.

    clip_id is `synth_{index:06d}`; see `synthesize_clip` for the waveform.
    """
    for index in range(num_clips):
        waveform, class_name = synthesize_clip(index, sample_rate=sample_rate,
                                               duration_s=duration_s, seed=seed)
        yield f"synth_{index:06d}", waveform, class_name
