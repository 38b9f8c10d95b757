"""Metrics: JSON lines + TensorBoard from process 0, and a progress/ETA clock.

`MetricWriter.write(step, {...})` appends `{"step": step, ...}` to `workdir/metrics.jsonl` and
adds the same scalars to TensorBoard (`workdir/tb/`). Other processes write nothing.

A workdir at a URL (`gs://...`, audiojepa.runtime.storage) cannot be appended to (an object is written whole), so
the writer keeps both files in a local folder of its own and copies the changed ones to the workdir:
on `flush()` (the trainer calls it before each checkpoint, so the rows up to a committed checkpoint are
always there), at most every `sync_secs` otherwise, and on `close()`. A killed run loses only rows after its
last flush, which a resumed run logs again anyway (they come after its checkpoint).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time

from audiojepa.runtime import storage

JSONL_FILE = "metrics.jsonl"
TB_DIR = "tb"


class MetricWriter:
    """Scalar metrics to `metrics.jsonl` and TensorBoard; a no-op when `enabled` is False.

    `start_step`: the step the run starts (or resumes) from. Rows logged after it by an earlier attempt
    (one killed after its last checkpoint) are dropped from `metrics.jsonl`, and TensorBoard purges its
    events after it, so a resumed run's log holds each step once.
    `sync_secs`: for a URL workdir, the longest time between copies of the files to it (see the module doc).
    """

    def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True, start_step: int = 0,
                 sync_secs: float = 30.0):
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        self._workdir = workdir
        self._staging = tempfile.mkdtemp(prefix="audiojepa-metrics-") if storage.is_url(workdir) else None
        self._sync_secs, self._last_sync, self._synced = sync_secs, time.monotonic(), {}
        local_dir = self._staging or workdir
        storage.makedirs(workdir)
        path = os.path.join(local_dir, JSONL_FILE)
        if self._staging and storage.exists(storage.join(workdir, JSONL_FILE)):
            storage.copy_file(storage.join(workdir, JSONL_FILE), path)
        if drop_rows_after(path, start_step) and self._staging:
            self.flush()
        self._jsonl = open(path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(local_dir, TB_DIR), flush_secs=30, purge_step=start_step + 1)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                if math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._staging and time.monotonic() - self._last_sync >= self._sync_secs:
            self.flush()

    def flush(self) -> None:
        """Makes every row written so far reach the workdir (local files already have them: a no-op there).

        A copy that fails (the store unreachable after the client's own retries) is logged and tried again at
        the next flush: losing metrics rows must not end a training run, whose checkpoints report their own
        write errors.
        """
        if not self.enabled or self._staging is None:
            return
        self._last_sync = time.monotonic()
        if self._tb is not None:
            self._tb.flush()
        files = [os.path.join(dirpath, name) for dirpath, _, names in os.walk(self._staging) for name in names]
        # metrics.jsonl last: whoever sees its rows also finds the TensorBoard events up to them.
        for local in sorted(files, key=lambda path: os.path.basename(path) == JSONL_FILE):
            stat = os.stat(local)
            if self._synced.get(local) == (stat.st_size, stat.st_mtime_ns):
                continue
            remote = storage.join(self._workdir, *os.path.relpath(local, self._staging).split(os.sep))
            try:
                storage.copy_file(local, remote)
            except Exception:  # noqa: BLE001 - any client error; retried at the next flush
                logging.exception("could not copy %s to %s; trying again at the next flush", local, remote)
                continue
            self._synced[local] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            if self._staging is not None:
                try:
                    self.flush()
                finally:
                    shutil.rmtree(self._staging, ignore_errors=True)


def drop_rows_after(path: str, step: int) -> int:
    """Rewrites the JSON-lines file `path` (atomically) without its rows whose "step" is > `step`;
    returns how many were dropped (0, file untouched, when none or no file). A torn last line (a kill
    mid-write) is dropped too."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if int(row.get("step", 0)) > step:
                dropped += 1
            else:
                kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        logging.info("%s: dropped %d rows logged after step %d by an earlier attempt (resuming from %d)",
                     path, dropped, step, step)
    return dropped


def read_metrics(workdir: str) -> list[dict]:
    """All rows of `workdir/metrics.jsonl` (a local path or a URL)."""
    text = storage.read_text(storage.join(workdir, JSONL_FILE))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Steps/s, clips/s and ETA over the steps run in this process (compile time excluded).

    The clock starts at the first `update` after `warmup_steps` steps, so the first steps'
    compilation does not distort the rate.
    """

    def __init__(self, *, first_step: int, total_steps: int, global_batch_size: int, warmup_steps: int = 1):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self._warmup_until = first_step + warmup_steps
        self._t0 = None
        self._step0 = None

    def update(self, step: int) -> dict[str, float]:
        """Call after finishing `step`; returns rate metrics (empty until the clock starts)."""
        now = time.perf_counter()
        if self._t0 is None:
            if step >= self._warmup_until:
                self._t0, self._step0 = now, step
            return {}
        elapsed = now - self._t0
        steps = step - self._step0
        if steps <= 0 or elapsed <= 0:
            return {}
        rate = steps / elapsed
        return {"steps_per_s": rate, "clips_per_s": rate * self.global_batch_size,
                "eta_s": (self.total_steps - step) / rate}

    def line(self, step: int, metrics: dict[str, float]) -> str:
        pct = 100.0 * step / max(self.total_steps, 1)
        parts = [f"step {step}/{self.total_steps} ({pct:.1f}%)"]
        for key in ("loss", "lr", "grad_norm"):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.4g}")
        if "clips_per_s" in metrics:
            parts.append(f"{metrics['clips_per_s']:.1f} clips/s")
        if "eta_s" in metrics:
            parts.append(f"ETA {format_duration(metrics['eta_s'])}")
        return " | ".join(parts)


def log_progress(progress: Progress, step: int, metrics: dict[str, float]) -> None:
    logging.info("%s", progress.line(step, metrics))
