"""audiojepa.runtime.metrics.MetricWriter with TensorBoard on (the trainer's default; the training tests turn it
off), and what a resumed run's writer does to the rows an earlier attempt logged after the checkpoint."""

import glob
import os
import struct

from tensorboardX.proto import event_pb2

from audiojepa.runtime import metrics


def read_event_file(path):
    """Events of one TFRecord event file (8-byte length, 4-byte CRC, payload, 4-byte CRC per record)."""
    events = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            payload = f.read(length)
            f.read(4)
            events.append(event_pb2.Event.FromString(payload))
    return events


def scalars_as_tensorboard_shows_them(logdir, tag):
    """{step: value} of `tag` over the event files in time order, with TensorBoard's purge rule: a
    SessionLog START at step s discards the earlier files' events at steps >= s."""
    shown = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")), key=os.path.getmtime):
        for event in read_event_file(path):
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                shown = {step: v for step, v in shown.items() if step < event.step}
            for value in event.summary.value:
                if value.tag == tag:
                    shown[event.step] = value.simple_value
    return shown


def test_a_resumed_writer_logs_each_step_once_in_jsonl_and_tensorboard(tmp_path):
    workdir = str(tmp_path)
    first = metrics.MetricWriter(workdir, tensorboard=True)
    for step in range(1, 6):  # the first attempt logged steps 1-5, then died; its last checkpoint was step 3
        first.write(step, {"loss": 10.0 + step})
    first.close()
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "lo')  # torn by the kill
    import time
    time.sleep(1.1)  # a later event file (tensorboardX names files by the second)

    resumed = metrics.MetricWriter(workdir, tensorboard=True, start_step=3)
    for step in (4, 6):  # logging every 2 steps now: step 5 of the dead attempt must not show
        resumed.write(step, {"loss": 20.0 + step})
    resumed.close()

    rows = metrics.read_metrics(workdir)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (6, 26.0)]
    assert scalars_as_tensorboard_shows_them(os.path.join(workdir, "tb"), "loss") == {
        1: 11.0, 2: 12.0, 3: 13.0, 4: 24.0, 6: 26.0}


def test_drop_rows_after_leaves_a_clean_log_untouched(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    assert metrics.drop_rows_after(path, 3) == 0  # no file yet
    with open(path, "w") as f:
        f.write('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n')
    before = os.stat(path).st_mtime_ns
    assert metrics.drop_rows_after(path, 2) == 0 and os.stat(path).st_mtime_ns == before
    assert metrics.drop_rows_after(path, 1) == 1
    assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1]
