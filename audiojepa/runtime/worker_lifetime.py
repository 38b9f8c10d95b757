"""Worker processes that do not outlive the process that started them.

A run killed outright (SIGKILL, the OOM killer) runs no cleanup, so its worker processes (make_shards'
decoders, Grain's data workers, ~250 MB each) would otherwise live on, waiting on queues nobody reads.

- `die_with_parent(parent_pid)`: a worker initialiser that asks Linux to SIGKILL the worker when its parent
  dies (prctl PR_SET_PDEATHSIG). The kernel ties the signal to the parent *thread* that started the worker,
  so use it only for workers started from a thread that lives as long as the parent (a pool made by the main
  thread).
- `exit_when_orphaned(parent_pid, ...)`: for workers started by library code from any thread (Grain): a daemon
  thread in the worker that exits it within `interval_s` once its parent is gone (it has been re-parented).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the kernel SIGKILLs this worker when the process that started it dies (Linux).

    Without it, workers of a killed run (SIGKILL, or SIGTERM without a handler) wait forever on their task
    queue, whose other end they hold themselves. Elsewhere this does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def exit_when_orphaned(parent_pid: int, *_worker_args, interval_s: float = 1.0) -> None:
    """Starts a daemon thread in this (worker) process that ends the process, without cleanup, within
    `interval_s` once `parent_pid` is no longer its parent. Extra positional arguments are ignored, so it
    serves as Grain's `worker_init_fn(worker_index, worker_count)` through functools.partial."""
    def watch():
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="exit-when-orphaned", daemon=True).start()
