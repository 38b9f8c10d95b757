"""What a run has done, as `WORKDIR/run_summary.json` says it: the run's data and stability counts
(`RunCounters`, carried across restarts in checkpoint meta) and its progress (`RunProgress`, kept up to date by the
trainer so that the summary is true however the run ends: a return, a preemption, an exception)."""

from __future__ import annotations

import dataclasses
import json
import logging

from audiojepa.data import records
from audiojepa.runtime import checkpointing, storage

SUMMARY_FILE = "run_summary.json"


class RunCounters:
    """Data and stability counts over the whole run (carried across restarts in checkpoint meta).

    `skipped_records`: unusable records stepped over (a record is counted each time a read steps over
    it), split by reason in `skipped_by_reason` (records.SKIP_REASONS); `nonfinite_skipped_batches`:
    batches dropped under `config.nonfinite_policy="skip"`.
    """

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.skipped_records = int(saved.get("skipped_records", 0))
        self.skipped_by_reason = {r: int(saved.get("skipped_by_reason", {}).get(r, 0)) for r in records.SKIP_REASONS}
        self.nonfinite_skipped_batches = int(saved.get("nonfinite_skipped_batches", 0))

    def add(self, row: dict) -> None:
        """Adds one logged row's counts (its `skipped_records`, `skipped/<reason>`, `nonfinite_skipped`)."""
        self.skipped_records += int(row.get("skipped_records", 0))
        for r in records.SKIP_REASONS:
            self.skipped_by_reason[r] += int(row.get(f"skipped/{r}", 0))
        self.nonfinite_skipped_batches += int(row.get("nonfinite_skipped", 0))

    def as_dict(self) -> dict:
        return {"skipped_records": self.skipped_records, "skipped_by_reason": dict(self.skipped_by_reason),
                "nonfinite_skipped_batches": self.nonfinite_skipped_batches}

    def describe(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in self.skipped_by_reason.items() if n)
        return (f"{self.skipped_records} records skipped{f' ({reasons})' if reasons else ''}, "
                f"{self.nonfinite_skipped_batches} non-finite batches skipped")


RUN_STATUSES = ("finished", "stopped", "preempted", "failed")


@dataclasses.dataclass
class RunProgress:
    """What a run has done so far, kept up to date by the trainer so that `run_summary.json` says what is true
    however the run ends (a return, a preemption, an exception)."""
    global_batch_size: int
    total_steps: int | None = None
    trained_step: int | None = None  # the loop's step: trained in memory, maybe never saved
    committed_step: int | None = None  # the latest checkpoint on disk
    preempted: bool = False
    counters: RunCounters | None = None

    def status(self, error: BaseException | None) -> str:
        """One of RUN_STATUSES: failed (an exception), preempted, finished (the last step is committed) or
        stopped (left early on purpose, e.g. `stop_after`)."""
        if error is not None:
            return "failed"
        if self.preempted:
            return "preempted"
        done = self.total_steps is not None and (self.committed_step or 0) >= self.total_steps
        return "finished" if done else "stopped"


def committed_step_on_disk(workdir: str) -> int | None:
    """The latest checkpoint of `workdir` that is committed on disk (None if none, or unreadable)."""
    if not storage.isdir(checkpointing.checkpoint_dir(workdir)):
        return None
    try:
        manager = checkpointing.make_manager(workdir, every_steps=1, read_only=True)
        try:
            return manager.latest_step()
        finally:
            manager.close()
    except Exception:  # noqa: BLE001 - a summary must still be written; the step is then unknown
        logging.exception("could not list the checkpoints of %s", workdir)
        return None


def write_run_summary(workdir: str, progress: RunProgress, error: BaseException | None) -> dict:
    """Writes `workdir/run_summary.json` (atomically) and logs it in one line.

    Fields: "status" (RUN_STATUSES), "finished" (status == "finished"), "step" (the last committed
    checkpoint, 0 if none: what a resume starts from and an export holds), "trained_step" (the loop's last
    step), "total_steps", "preempted", "error" ("Type: message" or None), "examples_seen" (committed step x
    global batch) and the data counts (RunCounters; None when the run failed before reading its checkpoint).
    """
    status = progress.status(error)
    step = progress.committed_step or 0
    counters = progress.counters.as_dict() if progress.counters is not None else {
        "skipped_records": None, "skipped_by_reason": None, "nonfinite_skipped_batches": None}
    summary = {"status": status, "finished": status == "finished", "step": step,
               "trained_step": progress.trained_step, "total_steps": progress.total_steps,
               "preempted": progress.preempted,
               "error": None if error is None else f"{type(error).__name__}: {error}",
               "examples_seen": step * progress.global_batch_size, **counters}
    storage.write_atomically(storage.join(workdir, SUMMARY_FILE), json.dumps(summary, indent=1))
    log = logging.error if status == "failed" else logging.info
    log("run %s at committed step %d/%s%s%s (%s)", status, step, progress.total_steps,
        f"; {progress.counters.describe()}" if progress.counters is not None else "",
        f"; {summary['error']}" if error is not None else "", storage.join(workdir, SUMMARY_FILE))
    return summary
