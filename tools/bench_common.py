"""Shared by the tools/bench_*.py scripts: appending a result section to BENCHMARKS.md."""

import os


def append_markdown(path: str, section: str) -> None:
    """Appends `section` to the markdown file `path`, creating it with a title if missing."""
    if not path:
        return
    new_file = not os.path.exists(path)
    with open(path, "a") as f:
        f.write("# Benchmarks\n\n" if new_file else "\n")
        f.write(section if section.endswith("\n") else section + "\n")
