"""make_shards under hostile inputs and outputs (issue 22): FIFOs and other non-regular files, symlinked,
looping and unreadable folders, an unreadable or empty --input, two runs into one output, and a run killed
outright (its decoding processes die with it; the next run cleans up what it left)."""

import glob
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from audiojepa.data import shards
import process_helpers
import fault_helpers

SR = 16000
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tone(seconds, freq=440.0):
    t = np.arange(int(seconds * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _write_wavs(folder, count, seconds=0.2):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        sf.write(os.path.join(folder, f"{i:02d}_tone.wav"), _tone(seconds, 200 + 50 * i), SR, subtype="PCM_16")
    return str(folder)


def _skips(manifest):
    return {s["path"]: s["reason"] for s in manifest["skipped"]}


# -- 7: non-regular files --------------------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 1])
def test_a_fifo_among_wavs_is_skipped_not_opened(tmp_path, workers):
    audio = _write_wavs(tmp_path / "in", 3)
    os.mkfifo(os.path.join(audio, "pipe.wav"))  # opening it for reading blocks until a writer comes
    os.symlink(os.path.join(audio, "pipe.wav"), os.path.join(audio, "link_to_pipe.wav"))
    manifest = fault_helpers.within(30, shards.make_shards, audio, str(tmp_path / "out"), num_shards=1,
                                    workers=workers, progress=False)
    assert manifest["num_clips"] == 3
    assert _skips(manifest) == {"pipe.wav": "not a regular file", "link_to_pipe.wav": "not a regular file"}
    assert "FIFO" in manifest["skipped"][0]["detail"]


def test_a_fifo_listed_in_a_csv_is_skipped_not_opened(tmp_path):
    _write_wavs(tmp_path, 1)
    os.mkfifo(tmp_path / "pipe.wav")
    (tmp_path / "list.csv").write_text("path,label\n00_tone.wav,a\npipe.wav,b\n")
    manifest = fault_helpers.within(30, shards.make_shards, str(tmp_path / "list.csv"), str(tmp_path / "out"),
                                    num_shards=1, progress=False)
    assert manifest["num_clips"] == 1
    assert _skips(manifest) == {"pipe.wav": "not a regular file"}


# -- 6: symlinked, looping and unreadable folders; an unreadable or empty input ------------------------------

def test_a_symlinked_folder_is_followed_once_and_loops_end(tmp_path):
    audio = _write_wavs(tmp_path / "in", 1)
    outside = _write_wavs(tmp_path / "elsewhere" / "more", 2)
    os.symlink(outside, os.path.join(audio, "linked"))  # a folder outside the tree: its files are clips
    os.symlink(audio, os.path.join(audio, "loop"))  # the input itself: a loop
    os.symlink(os.path.dirname(outside), os.path.join(outside, "up"))  # a loop inside the linked folder
    os.makedirs(os.path.join(audio, "real"))
    os.symlink(os.path.join(audio, "real"), os.path.join(audio, "again"))  # a second path to a listed folder
    sf.write(os.path.join(audio, "real", "r.wav"), _tone(0.2), SR, subtype="PCM_16")
    manifest = fault_helpers.within(30, shards.make_shards, audio, str(tmp_path / "out"), num_shards=1, progress=False)
    assert manifest["num_clips"] == 4  # 00_tone.wav, linked/00_tone.wav, linked/01_tone.wav, real/r.wav
    assert _skips(manifest) == {"again/": "repeated folder", "loop/": "repeated folder",
                                "linked/up/": "repeated folder"}
    clip_ids = [clip_id for _, clip_id, _ in shards.list_inputs(audio).items]
    assert clip_ids == ["00_tone.wav", "linked/00_tone.wav", "linked/01_tone.wav", "real/r.wav"]


def _deny_listing(monkeypatch, denied):
    """os.scandir raises PermissionError for the folder `denied` (as chmod 000 does for a non-root user)."""
    real_scandir = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and os.path.realpath(path) == os.path.realpath(denied):  # rmtree passes fds
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_subfolder_is_listed_with_its_reason(tmp_path, monkeypatch):
    audio = _write_wavs(tmp_path / "in", 2)
    _write_wavs(tmp_path / "in" / "locked", 2)
    _deny_listing(monkeypatch, tmp_path / "in" / "locked")
    manifest = shards.make_shards(audio, str(tmp_path / "out"), num_shards=1, progress=False)
    assert manifest["num_clips"] == 2
    assert manifest["skipped"] == [{"path": "locked/", "reason": "unreadable folder",
                                    "detail": manifest["skipped"][0]["detail"]}]
    assert "Permission denied" in manifest["skipped"][0]["detail"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 folder anyway; the scandir-patched tests "
                    "cover the same code")
def test_a_chmod_000_subfolder_and_input_are_reported(tmp_path):
    audio = _write_wavs(tmp_path / "in", 2)
    locked = _write_wavs(tmp_path / "in" / "locked", 2)
    os.chmod(locked, 0)
    try:
        manifest = shards.make_shards(audio, str(tmp_path / "out"), num_shards=1, progress=False)
        assert _skips(manifest) == {"locked/": "unreadable folder"}
        with pytest.raises(PermissionError, match=f"--input {locked}"):
            shards.make_shards(locked, str(tmp_path / "out2"), num_shards=1, progress=False)
    finally:
        os.chmod(locked, 0o755)


def test_an_unreadable_input_is_an_error_naming_it(tmp_path, monkeypatch):
    audio = _write_wavs(tmp_path / "in", 2)
    _deny_listing(monkeypatch, audio)
    with pytest.raises(PermissionError, match=f"--input {audio}: cannot list it"):
        shards.make_shards(audio, str(tmp_path / "out"), num_shards=1, progress=False)
    assert not os.path.exists(tmp_path / "out")


def test_an_empty_input_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(shards.NoClipsError, match=f"--input {empty}: no audio files"):
        shards.make_shards(str(empty), str(tmp_path / "out"), num_shards=1, progress=False)
    assert not os.path.exists(tmp_path / "out")
    (tmp_path / "list.csv").write_text("path,label\n")
    with pytest.raises(shards.NoClipsError, match="list.csv: no audio files"):
        shards.make_shards(str(tmp_path / "list.csv"), str(tmp_path / "out"), num_shards=1, progress=False)


def test_a_run_whose_files_are_all_bad_fails_listing_them_and_keeps_the_old_set(tmp_path):
    out = str(tmp_path / "out")
    shards.make_shards(_write_wavs(tmp_path / "good", 2), out, num_shards=1, progress=False)
    before = shards.read_manifest(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "text.wav").write_text("not audio\n" * 50)
    sf.write(bad / "zeros.wav", np.zeros(SR, np.float32), SR, subtype="PCM_16")
    (bad / "notes.txt").write_text("not audio")
    with pytest.raises(shards.NoClipsError) as caught:
        shards.make_shards(str(bad), out, num_shards=1, overwrite=True, progress=False)
    message = str(caught.value)
    assert f"--input {bad}: 0 clips written, all 3 files skipped" in message
    for name, reason in [("text.wav", "unreadable"), ("zeros.wav", "silent"), ("notes.txt", "unsupported extension")]:
        assert f"{name}: {reason}" in message
    assert f"{out} is unchanged" in message
    assert sorted(s["path"] for s in caught.value.skipped) == ["notes.txt", "text.wav", "zeros.wav"]
    assert shards.read_manifest(out) == before


def test_cli_exits_non_zero_naming_an_empty_input(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "tools/make_shards.py", f"--input={empty}", f"--output={tmp_path / 'out'}", "--workers=0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert f"--input {empty}: no audio files" in result.stderr


# -- 5: two runs into one output ----------------------------------------------------------------------------

def _staging_leftovers(output_dir):
    """Staging, old-set or lock files a run may leave next to or inside `output_dir`."""
    name = os.path.basename(output_dir)
    return (glob.glob(os.path.join(os.path.dirname(output_dir), f".{name}.*"))
            + glob.glob(os.path.join(output_dir, f".{name}.*")))


def test_a_second_run_into_a_busy_output_fails_at_once_naming_it_and_the_holder(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    first_audio, second_audio = _write_wavs(tmp_path / "a", 3), _write_wavs(tmp_path / "b", 5)
    real_decode, second_runs = shards._decode_one, []

    def decode_and_start_a_second_run(item, **kwargs):
        if not second_runs:  # while the first run decodes its first file
            for overwrite in (False, True):
                with pytest.raises(shards.OutputLockedError) as caught:
                    fault_helpers.within(10, shards.make_shards, second_audio, out, num_shards=1,
                                         overwrite=overwrite, progress=False)
                second_runs.append(str(caught.value))
        return real_decode(item, **kwargs)

    monkeypatch.setattr(shards, "_decode_one", decode_and_start_a_second_run)
    manifest = shards.make_shards(first_audio, out, num_shards=1, progress=False)
    assert len(second_runs) == 2
    for message in second_runs:
        assert f"{out} is being written by another run (pid {os.getpid()};" in message
    assert manifest["num_clips"] == 3 and shards.read_manifest(out) == manifest  # the first run's set, whole
    assert _staging_leftovers(out) == []  # the lock file goes with the run
    monkeypatch.setattr(shards, "_decode_one", real_decode)
    with pytest.raises(FileExistsError, match=f"{out} already holds a shard set; pass --overwrite"):
        shards.make_shards(second_audio, out, num_shards=1, progress=False)  # lock released: the usual check


HOLD_LOCK = """
import sys, time
from audiojepa.data import shards
with shards.output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_lock_held_by_another_process_stops_the_cli_at_once(tmp_path):
    out = str(tmp_path / "out")
    audio = _write_wavs(tmp_path / "a", 2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, out], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = subprocess.run([sys.executable, "tools/make_shards.py", f"--input={audio}", f"--output={out}",
                                 "--workers=0"], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert f"{out} is being written by another run (pid {holder.pid};" in result.stderr
    assert not os.path.exists(out)
    manifest = shards.make_shards(audio, out, num_shards=1, progress=False)  # a dead holder's lock is free
    assert manifest["num_clips"] == 2 and _staging_leftovers(out) == []


# -- 8: a killed run leaves no process behind, and the next run cleans up after it ------------------------

REAL_DECODE = shards._decode_one


def slow_decode(item, **kwargs):
    """shards._decode_one, 0.3 s slower: keeps a run busy long enough to be killed. Importable by workers."""
    time.sleep(0.3)
    return REAL_DECODE(item, **kwargs)


# The CLI, its decoding slowed down (the spawned workers import slow_decode from this file).
SLOW_CLI = """
import runpy, sys
sys.path.insert(0, {tests!r})
import test_faults_shards
from audiojepa.data import shards
shards._decode_one = test_faults_shards.slow_decode
sys.argv = ["make_shards.py", "--input={input}", "--output={output}", "--workers=2", "--num_shards=1"]
runpy.run_path("tools/make_shards.py", run_name="__main__")
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree from Linux's /proc")
@pytest.mark.parametrize("signal_number", [signal.SIGKILL, signal.SIGTERM])
def test_a_killed_run_leaves_no_worker_and_the_next_run_cleans_its_staging(tmp_path, caplog, signal_number):
    audio, out = _write_wavs(tmp_path / "in", 40), str(tmp_path / "out")
    script = SLOW_CLI.format(tests=os.path.dirname(os.path.abspath(__file__)), input=audio, output=out)
    run = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        workers = set()

        def decoding():  # two workers up and the staging folder made: the run is busy
            workers.update(process_helpers.descendants(run.pid))
            return len(workers) >= 2 and glob.glob(os.path.join(str(tmp_path), ".out.tmp-*"))

        process_helpers.wait_for(decoding, 60, "the run never got busy")
        os.kill(run.pid, signal_number)
        run.wait(timeout=30)
        workers.update(process_helpers.descendants(run.pid))
        process_helpers.wait_for(lambda: not process_helpers.alive(workers), 5,
                                 f"processes of the killed run still alive: {process_helpers.alive(workers)}")
    finally:
        run.kill()
        run.wait()
    staging = glob.glob(os.path.join(str(tmp_path), ".out.tmp-*"))
    if signal_number == signal.SIGTERM:  # a polite stop cleans up after itself
        assert run.returncode == 128 + signal.SIGTERM and staging == [] and _staging_leftovers(out) == []
        return
    assert len(staging) == 1 and not os.path.exists(out)
    with caplog.at_level(logging.WARNING):
        manifest = shards.make_shards(audio, out, num_shards=1, progress=False)
    assert f"removed {staging[0]}" in caplog.text
    assert manifest["num_clips"] == 40 and _staging_leftovers(out) == []


def test_a_run_killed_while_swapping_sets_is_undone_by_the_next(tmp_path, caplog):
    """Killed between moving the old set aside and moving the new one in: the next run puts the old back."""
    out = str(tmp_path / "out")
    shards.make_shards(_write_wavs(tmp_path / "old", 2), out, num_shards=1, progress=False)
    with open(os.path.join(out, "NOTES.txt"), "w") as f:
        f.write("kept")
    before = fault_helpers.snapshot(out)
    os.rename(out, str(tmp_path / ".out.old-dead0001"))
    os.mkdir(tmp_path / ".out.tmp-dead0002")  # the new set, never swapped in
    with caplog.at_level(logging.WARNING), pytest.raises(FileExistsError, match="already holds a shard set"):
        shards.make_shards(_write_wavs(tmp_path / "new", 3), out, num_shards=1, progress=False)
    assert f"restored the previous shard set of {out} from {tmp_path / '.out.old-dead0001'}" in caplog.text
    assert fault_helpers.snapshot(out) == before
    assert _staging_leftovers(out) == []
    # Killed after the swap, while moving the old folder's other files into the new one.
    os.mkdir(tmp_path / ".out.old-dead0003")
    os.rename(os.path.join(out, "NOTES.txt"), tmp_path / ".out.old-dead0003" / "NOTES.txt")
    manifest = shards.make_shards(str(tmp_path / "new"), out, num_shards=1, overwrite=True, progress=False)
    assert manifest["num_clips"] == 3 and fault_helpers.snapshot(out)["NOTES.txt"] == b"kept"
    assert _staging_leftovers(out) == []


def test_float_audio_beyond_full_scale_is_listed_as_clipped_with_a_warning(tmp_path, caplog):
    """Issue 22 item 10: a float64 WAV peaking at 5.0 was hard-clipped to 16-bit (5.7% of its samples) without a
    word. It is still stored (clipped), but the manifest lists it with the clipped fraction and a warning says so."""
    folder = tmp_path / "in"
    folder.mkdir()
    t = np.arange(SR) / SR
    loud = 5.0 * np.sin(2 * np.pi * 440 * t)
    sf.write(str(folder / "loud.wav"), loud, SR, subtype="DOUBLE")
    sf.write(str(folder / "fine.wav"), 0.5 * np.sin(2 * np.pi * 440 * t), SR, subtype="DOUBLE")
    with caplog.at_level(logging.WARNING):
        manifest = shards.make_shards(str(folder), str(tmp_path / "out"), num_shards=1, progress=False)
    expected = float(np.mean(np.abs(loud) >= 1.0))  # the samples 16-bit PCM cannot hold
    assert manifest["num_clips"] == 2
    assert [c["path"] for c in manifest["clipped"]] == ["loud.wav"]
    assert manifest["clipped"][0]["fraction"] == pytest.approx(expected, abs=1e-4)
    assert manifest["clipped"][0]["peak"] == pytest.approx(5.0, rel=1e-3)
    assert any("clipped" in r.getMessage() and "loud.wav" in r.getMessage() for r in caplog.records)
