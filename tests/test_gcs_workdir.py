"""A training workdir and shards at gs:// URLs, against a local Cloud Storage emulator (tests/gcs_emulator.py).

Every client reaches the emulator, none is faked with local paths: gcsfs (etils.epath: run files, metrics and
TensorBoard copies, Orbax's folders and metadata, Grain's iterator state, exports), TensorStore (Orbax's arrays)
and ArrayRecord's reader (shards). The slow sequence runs the tiny config with its workdir and shards in the
bucket through SIGKILL -> restart -> SIGKILL -> restart -> SIGTERM (exit 143, a checkpoint at the step it stopped)
-> a planted half-written later checkpoint -> restart to the end, and compares it bitwise with an uninterrupted
run in a local workdir on the same shards.
"""

import json
import os
import random
import signal
import time

import gcs_emulator
import jax
import numpy as np
import pytest
import run_helpers as rh
from tensorboardX.proto import event_pb2

from audiojepa.adapters import encoder
from audiojepa.config_utils import set_by_path
from audiojepa.data import resolve
from audiojepa.data import shards as shards_lib
from audiojepa.runtime import checkpointing, metrics, storage
from audiojepa.training import run_summary, train

BUCKET = "audiojepa-test"
TOTAL = 16
SETTINGS = {"total_steps": TOTAL, "checkpoint_every_steps": 2, "async_checkpoints": True}
ENV = {"JAX_NUM_CPU_DEVICES": 1}


@pytest.fixture(scope="module")
def emulator():
    """The emulator, with this process's environment (and so its training subprocesses') pointing at it."""
    with gcs_emulator.running(BUCKET) as emu, pytest.MonkeyPatch.context() as mp:
        for key, value in emu.env.items():
            mp.setenv(key, value)
        yield emu


@pytest.fixture(scope="module")
def bucket_shards(emulator):
    """The tiny config's embedded corpus copied into the bucket: (gs:// folder, local folder, norm_stats value)."""
    spec = resolve.resolve_data_spec(rh.tiny_config().data)
    local = os.path.dirname(spec.shard_paths[0])
    remote = f"gs://{BUCKET}/shards"
    for name in [*spec.manifest["shards"], shards_lib.MANIFEST]:
        storage.copy_file(os.path.join(local, name), f"{remote}/{name}")
    return remote, local, f"{spec.norm_mean!r},{spec.norm_std!r}"


def test_unsupported_urls_are_refused_naming_the_flag_or_key():
    with pytest.raises(ValueError, match=r"--workdir=s3://b/run: s3:// is not supported"):
        train.train_and_evaluate(rh.tiny_config(), "s3://b/run")
    with pytest.raises(ValueError, match=r"config.data.shards=hf://x/y: hf:// is not supported"):
        shards_lib.resolve_shards("hf://x/y")


def test_a_bucket_workdir_takes_no_lock_and_says_so(caplog):
    with caplog.at_level("WARNING"), train.workdir_lock(f"gs://{BUCKET}/locked"):
        pass
    assert "no run lock is taken there" in caplog.text


def test_bucket_metrics_reach_the_bucket_on_flush_and_a_resumed_writer_logs_each_step_once(emulator):
    workdir = f"gs://{BUCKET}/metrics-only"
    first = metrics.MetricWriter(workdir, tensorboard=True, sync_secs=3600)
    for step in range(1, 6):  # the first attempt logged steps 1-5, then died; its last checkpoint was step 3
        first.write(step, {"loss": 10.0 + step})
        if step == 3:
            assert not storage.exists(f"{workdir}/metrics.jsonl")  # not copied yet (sync_secs)
            first.flush()  # what the trainer does before each checkpoint
            assert [r["step"] for r in metrics.read_metrics(workdir)] == [1, 2, 3]
    first.close()
    time.sleep(1.1)  # a later event file (tensorboardX names files by the second)
    resumed = metrics.MetricWriter(workdir, tensorboard=True, start_step=3)
    for step in (4, 6):
        resumed.write(step, {"loss": 20.0 + step})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in metrics.read_metrics(workdir)] == [
        (1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (6, 26.0)]
    names = emulator.objects(BUCKET, "metrics-only/")
    assert sum(name.startswith("metrics-only/tb/events.out.tfevents.") for name in names) == 2, names


def test_norm_stats_from_bucket_shards_is_an_error_naming_the_key(bucket_shards):
    config = rh.tiny_config()
    set_by_path(config, "data.shards", bucket_shards[0])
    with pytest.raises(ValueError, match=r"config.data.norm_stats='shards' .* not supported for shards at a URL"):
        resolve.resolve_data_spec(config.data)
    set_by_path(config, "data.norm_stats", bucket_shards[2])
    spec = resolve.resolve_data_spec(config.data)  # the manifest and shards read from the bucket
    assert spec.num_clips == 64 and spec.shard_paths[0].startswith(f"gs://{BUCKET}/shards/shard-")
    paths, manifest = shards_lib.resolve_shards(f"{bucket_shards[0]}/shard-*.array_record")  # a glob in the bucket
    assert paths == list(spec.shard_paths) and manifest == spec.manifest


def bucket_steps(workdir: str) -> list[int]:
    gcs_emulator.forget_listings()  # a training subprocess writes the bucket
    try:
        return [row["step"] for row in metrics.read_metrics(workdir)]
    except FileNotFoundError:
        return []


def wait_for_step(proc, workdir: str, step: int, *, rows_before: int, timeout_s: float = 300) -> int:
    """rh.wait_for_step for a bucket workdir, whose metrics.jsonl the run copies there before each checkpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = bucket_steps(workdir)[rows_before:]
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (status {proc.returncode}) before step {step}; logged {steps}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def committed_step(workdir: str) -> int | None:
    gcs_emulator.forget_listings()
    return rh.committed_step(workdir)


def plant_half_written_checkpoint(emulator, workdir: str, committed: int, step: int) -> None:
    """What a save killed half-way leaves on GCS, where Orbax writes into `<step>/` and commits it with
    commit_success.txt: a copy of checkpoint `committed` as `step`, its state files cut in half, no commit mark."""
    prefix = workdir.removeprefix(f"gs://{BUCKET}/") + "/checkpoints/"
    for name in emulator.objects(BUCKET, f"{prefix}{committed}/"):
        relative = name.removeprefix(f"{prefix}{committed}/")
        if relative == checkpointing.GCS_COMMIT_FILE:
            continue
        data = storage.read_bytes(f"gs://{BUCKET}/{name}")
        if relative.startswith("state/"):
            data = data[:len(data) // 2]
        storage.write_atomically(f"gs://{BUCKET}/{prefix}{step}/{relative}", data)


@pytest.fixture(scope="module")
def interrupted(emulator, bucket_shards, tmp_path_factory):
    seed = int(os.environ.get("AUDIOJEPA_TEST_SEED") or random.SystemRandom().randrange(10**6))
    print(f"gcs workdir test seed: AUDIOJEPA_TEST_SEED={seed}")
    rng = random.Random(seed)
    remote_shards, local_shards, norm_stats = bucket_shards
    root = tmp_path_factory.mktemp("gcs")
    workdir, log = f"gs://{BUCKET}/run", str(root / "run.log")
    cmd = rh.main_command(workdir, **SETTINGS, tensorboard=True, **{"data.shards": remote_shards,
                                                                    "data.norm_stats": norm_stats})
    seen = {"seed": seed, "kills": [], "workdir": workdir}
    # The uninterrupted run, in a local workdir on the local copy of the shards, compiles the step for the others.
    reference = str(root / "uninterrupted")
    ref_cmd = rh.main_command(reference, **SETTINGS, **{"data.shards": local_shards, "data.norm_stats": norm_stats})
    assert rh.start(ref_cmd, str(root / "uninterrupted.log"), **ENV).wait(600) == 0
    seen["reference"] = reference
    for last in (4, 9):  # SIGKILL twice, each time a few steps past the committed checkpoint
        committed = committed_step(workdir) or 0
        rows = len(bucket_steps(workdir))
        proc = rh.start(cmd, log, **ENV)
        target = rng.randint(committed + 1, max(committed + 1, last))
        seen["kills"].append((target, wait_for_step(proc, workdir, target, rows_before=rows)))
        assert rh.kill(proc, signal.SIGKILL) == -signal.SIGKILL
    committed = committed_step(workdir) or 0
    rows = len(bucket_steps(workdir))
    proc = rh.start(cmd, log, **ENV)
    wait_for_step(proc, workdir, rng.randint(committed + 1, max(committed + 1, TOTAL - 5)), rows_before=rows)
    seen["sigterm_status"] = rh.kill(proc, signal.SIGTERM)
    seen["sigterm_logged"] = max(bucket_steps(workdir)[rows:])
    seen["sigterm_committed"] = committed_step(workdir)
    seen["sigterm_summary"] = json.loads(storage.read_text(f"{workdir}/{run_summary.SUMMARY_FILE}"))
    plant_half_written_checkpoint(emulator, workdir, seen["sigterm_committed"], TOTAL - 1)
    proc = rh.start(cmd, log, **ENV)
    seen["final_status"] = proc.wait(600)
    with open(log, errors="replace") as f:
        seen["log"] = f.read()
    gcs_emulator.forget_listings()  # the tests below read what the runs wrote
    return seen


@pytest.mark.slow
def test_sigterm_in_a_bucket_workdir_commits_a_checkpoint_at_the_step_it_stops(interrupted):
    assert interrupted["sigterm_status"] == 143, interrupted  # audiojepa.training.process.EXIT_PREEMPTED
    step = interrupted["sigterm_committed"]
    assert step == interrupted["sigterm_logged"] < TOTAL, interrupted
    assert interrupted["sigterm_summary"]["preempted"] and interrupted["sigterm_summary"]["step"] == step


@pytest.mark.slow
def test_a_half_written_checkpoint_in_the_bucket_is_never_picked(interrupted):
    assert f"resumed from step {interrupted['sigterm_committed']} " in interrupted["log"], interrupted["log"][-3000:]


@pytest.mark.slow
def test_a_killed_and_resumed_bucket_run_equals_an_uninterrupted_local_one_bitwise(interrupted):
    assert interrupted["final_status"] == 0, interrupted["log"][-3000:]
    (step_a, a), (step_b, b) = rh.latest_state(interrupted["workdir"]), rh.latest_state(interrupted["reference"])
    assert step_a == step_b == TOTAL
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y, err_msg=f"seed {interrupted['seed']}, kills {interrupted['kills']}")
    # Every step's loss, including those re-run after a kill, equals the uninterrupted run's.
    assert rh.losses(interrupted["workdir"]) == rh.losses(interrupted["reference"])


@pytest.mark.slow
def test_every_run_file_is_an_object_in_the_emulator_and_nothing_went_to_a_local_path(interrupted, emulator, tmp_path):
    names = emulator.objects(BUCKET, "run/")
    for name in ("metrics.jsonl", "config.json", run_summary.SUMMARY_FILE, f"checkpoints/{TOTAL}/commit_success.txt",
                 f"checkpoints/{TOTAL}/state/_METADATA", f"checkpoints/{TOTAL}/data/process_0-of-1.json"):
        assert f"run/{name}" in names, sorted(names)
    summary = json.loads(storage.read_text(f"{interrupted['workdir']}/{run_summary.SUMMARY_FILE}"))
    assert summary["status"] == "finished" and summary["step"] == TOTAL
    assert "no run lock is taken there" in interrupted["log"]
    assert not os.path.exists(os.path.join(rh.REPO, "gs:"))  # os.path calls on a URL would have made ./gs:/...
    # TensorBoard, as it shows the event files (a later file's START purges the steps it resumes from):
    # each step once, with the loss the metrics say.
    events = sorted(name for name in names if name.startswith("run/tb/events.out.tfevents."))
    assert len(events) == 4  # one per attempt
    shown = {}
    for name in events:  # named by the second the attempt started
        data, offset = storage.read_bytes(f"gs://{BUCKET}/{name}"), 0
        while offset < len(data):
            length = int.from_bytes(data[offset:offset + 8], "little")
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                shown = {step: v for step, v in shown.items() if step < event.step}
            for value in event.summary.value:
                if value.tag == "loss":
                    shown[event.step] = value.simple_value
    assert shown == pytest.approx(rh.losses(interrupted["workdir"]))


@pytest.mark.slow
def test_an_encoder_exported_to_the_bucket_loads_back(interrupted, emulator):
    from_workdir = encoder.load_encoder(interrupted["workdir"])
    export = f"gs://{BUCKET}/export"
    assert from_workdir.save(export, source=interrupted["workdir"]) == export
    assert {"export/encoder.json", "export/params.msgpack"} <= set(emulator.objects(BUCKET, "export/"))
    loaded = encoder.load_encoder(export)
    for x, y in zip(jax.tree.leaves(from_workdir.params), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(x, y)
