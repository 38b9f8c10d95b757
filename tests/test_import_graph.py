"""The package's import graph (.importlinter, checked with import-linter): each layer imports only the layers
below it, and no two modules of a package import each other, even through a third. The contracts are also
shown to fail on a copy of the package with one import added against them."""

import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / ".importlinter"


def _lint(package_parent: pathlib.Path) -> subprocess.CompletedProcess:
    """lint-imports over the `audiojepa` package found in `package_parent` (a fresh process, no cache)."""
    code = textwrap.dedent(f"""
        import sys
        from importlinter.cli import lint_imports
        sys.exit(lint_imports(config_filename={str(CONFIG)!r}, no_cache=True, no_logo=True))
    """)
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([sys.executable, "-c", code], cwd=package_parent, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_package_keeps_its_import_contracts():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, added_import, broken", [
    # statistics below the pipeline: a stats -> pipeline import closes a cycle in audiojepa.data
    ("data/stats.py", "from audiojepa.data import pipeline", "No cycles are allowed in audiojepa.data"),
    # numerics are the bottom layer: they may not reach up into the trainer
    ("ops/losses.py", "from audiojepa.training import train", "audiojepa.ops.losses -> audiojepa.training.train"),
    # the evaluation library never imports the evaluate CLI
    ("evaluation/probes.py", "from audiojepa import evaluate", "audiojepa.evaluation.probes -> audiojepa.evaluate"),
])
def test_an_import_against_the_contracts_is_reported(tmp_path, module, added_import, broken):
    shutil.copytree(ROOT / "audiojepa", tmp_path / "audiojepa", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "audiojepa" / module, "a") as f:
        f.write(f"\n{added_import}  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert broken in result.stdout, result.stdout
