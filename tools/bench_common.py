"""Shared by the tools/bench_*.py scripts: the machine's name, appending a result section to BENCHMARKS.md,
JSON-object flags."""

import json
import os
import platform

from absl import app, flags


def append_markdown(path: str, section: str) -> None:
    """Appends `section` to the markdown file `path`, creating it with a title if missing."""
    if not path:
        return
    new_file = not os.path.exists(path)
    with open(path, "a") as f:
        f.write("# Benchmarks\n\n" if new_file else "\n")
        f.write(section if section.endswith("\n") else section + "\n")


def cpu_name() -> str:
    """platform.processor(), or the model name from /proc/cpuinfo where that is empty (Linux)."""
    name = platform.processor()
    if not name or name == platform.machine():
        try:
            with open("/proc/cpuinfo") as f:
                models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            name = f"{models[0]} ({platform.machine()})" if models else name
        except OSError:
            pass
    return name or platform.machine()


def json_dict_flag(name: str) -> dict:
    """The absl flag --`name`, a JSON object, parsed; a UsageError naming the flag if it is not one."""
    text = flags.FLAGS[name].value
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise app.UsageError(f"--{name} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise app.UsageError(f"--{name} must be a JSON object, got {text!r}")
    return value
