"""Shared by the fault tests: a call that must not hang, and a folder's bytes to compare before and after."""

import os
import threading


def within(seconds, fn, *args, **kwargs):
    """fn(*args, **kwargs), failing the test if it has not returned after `seconds` (it hangs)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} still running after {seconds} s: it hangs"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def snapshot(folder):
    """{file name: bytes} of every file in `folder`."""
    out = {}
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            out[name] = f.read()
    return out
