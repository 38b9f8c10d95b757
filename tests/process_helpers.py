"""The process tree from Linux's /proc, for tests that kill runs and look for what they left running."""

import glob
import time


def processes():
    """{pid: (parent pid, state letter)} of every process, from /proc."""
    table = {}
    for stat_path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat_path) as f:
                text = f.read()
        except OSError:  # it ended meanwhile
            continue
        fields = text.rsplit(")", 1)[1].split()
        table[int(stat_path.split("/")[2])] = (int(fields[1]), fields[0])
    return table


def descendants(pid):
    table, found, frontier = processes(), set(), {pid}
    while frontier:
        frontier = {child for child, (parent, _) in table.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids):
    """Those of `pids` still running (a zombie, dead but not yet reaped by its new parent, is not)."""
    table = processes()
    return {pid for pid in pids if pid in table and table[pid][1] not in ("Z", "X")}


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"after {seconds} s: {what}"
        time.sleep(0.05)
