"""audiojepa.data.gus_patch: GF1 patches written field by field (tests/patch_helpers.py) read back sample for
sample; notes rendered as held keys; bad files named."""

import numpy as np
import pytest

from audiojepa.data import gus_patch
from patch_helpers import patch_bytes


def test_reads_every_sample_format_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    pcm16 = rng.integers(-32768, 32768, 300)
    pcm8 = rng.integers(-128, 128, 120)
    notes = [dict(pcm=pcm16, rate=44100, bits=16, unsigned=False, loop=(100, 250), root_hz=261.626, name="c4"),
             dict(pcm=pcm8, rate=22050, bits=8, unsigned=True),
             dict(pcm=pcm16[:50], rate=30000, bits=16, unsigned=True, reverse=True),
             dict(pcm=pcm8[:40], rate=8000, bits=8, unsigned=False)]
    path = tmp_path / "test.pat"
    path.write_bytes(patch_bytes(notes))
    samples = gus_patch.read_patch(str(path))
    assert len(samples) == 4
    np.testing.assert_array_equal(samples[0].wave, (pcm16 / 32768).astype(np.float32))
    np.testing.assert_array_equal(samples[1].wave, (pcm8 / 128).astype(np.float32))
    np.testing.assert_array_equal(samples[2].wave, (pcm16[:50][::-1] / 32768).astype(np.float32))
    np.testing.assert_array_equal(samples[3].wave, (pcm8[:40] / 128).astype(np.float32))
    first = samples[0]
    assert (first.name, first.sample_rate, first.looping, first.loop_start, first.loop_end) == ("c4", 44100, True, 100,
                                                                                               250)
    assert first.root_hz == pytest.approx(261.626) and (first.low_hz, first.high_hz) == (20.0, 2000.0)
    assert [s.sample_rate for s in samples[1:]] == [22050, 30000, 8000]
    assert not any(s.looping for s in samples[1:]) and samples[1].loop_end == 0


def test_a_loop_that_lies_past_the_data_is_no_loop(tmp_path):
    """Loop points beyond the sample's data (a damaged or odd patch) must not give an empty loop to repeat."""
    path = tmp_path / "odd.pat"
    path.write_bytes(patch_bytes([dict(pcm=np.arange(50), rate=1000, bits=16, unsigned=False, loop=(60, 80)),
                                  dict(pcm=np.arange(50), rate=1000, bits=16, unsigned=False, loop=(30, 80))]))
    past, partly = gus_patch.read_patch(str(path))
    assert not past.looping and (past.loop_start, past.loop_end) == (0, 0)
    assert len(gus_patch.render_note(past, seconds=0.2)) == 50
    assert partly.looping and (partly.loop_start, partly.loop_end) == (30, 50)
    assert len(gus_patch.render_note(partly, seconds=0.2)) == 200


def test_a_held_note_repeats_its_loop_and_fades_out():
    wave = np.arange(1, 11, dtype=np.float32) / 10  # 10 samples at 10 Hz; loop [6, 9)
    note = gus_patch.PatchSample("n", wave, 10, 6, 9, True, 0.0, 0.0, 0.0)
    held = gus_patch.render_note(note, seconds=2.0, fade_seconds=0.3)
    expected = np.concatenate([wave[:9], np.tile(wave[6:9], 4)])[:20]
    expected[-3:] *= np.array([1.0, 0.5, 0.0], np.float32)
    np.testing.assert_allclose(held, expected, atol=1e-7)
    # longer than the key is held: cut and faded; no loop and shorter: as recorded
    np.testing.assert_allclose(gus_patch.render_note(note, seconds=0.5, fade_seconds=0.2),
                               wave[:5] * np.array([1, 1, 1, 1, 0], np.float32), atol=1e-7)
    one_shot = gus_patch.PatchSample("n", wave, 10, 0, 0, False, 0.0, 0.0, 0.0)
    np.testing.assert_array_equal(gus_patch.render_note(one_shot, seconds=2.0), wave)


def test_bad_and_truncated_patches_are_named(tmp_path):
    good = patch_bytes([dict(pcm=np.zeros(100), rate=8000, bits=16, unsigned=False)])
    for name, data, message in (("wav.pat", b"RIFF" + bytes(300), r"wav.pat: not a GF1 patch"),
                                ("cut_data.pat", good[:-10], r"cut_data.pat: truncated in sample 0's data"),
                                ("cut_header.pat", good[:129 + 63 + 47 + 20],
                                 r"cut_header.pat: truncated in sample 0's header"),
                                ("short.pat", good[:100], r"short.pat: truncated")):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(gus_patch.PatchError, match=message):
            gus_patch.read_patch(str(path))
    old = tmp_path / "old.pat"
    old.write_bytes(patch_bytes([dict(pcm=np.ones(4), rate=8000, bits=8, unsigned=False)], magic=b"GF1PATCH100\x00"))
    assert len(gus_patch.read_patch(str(old))) == 1
