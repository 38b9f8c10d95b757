"""The `small` preset of every ViT method (issue 23): a few hours of real audio, <= 30 minutes on 2 CPU cores.
Each config builds it, and documents the command and what to expect (the habit of every config docstring)."""

import importlib.util
import os

import pytest

from audiojepa.config_utils import SMALL_STEPS, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CONFIGS = ("m2d", "matpac", "jepa", "audio_jepa")


def _docstring(name: str) -> str:
    spec = importlib.util.spec_from_file_location(f"config_{name}", os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.__doc__


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_small_preset_builds_the_tiny_model_for_the_step_budget(name):
    small = load_config(f"configs/{name}.py:small")
    runlocal = load_config(f"configs/{name}.py:runlocal")
    assert small.total_steps == SMALL_STEPS
    assert small.model.variant == runlocal.model.variant == "tiny"
    assert (small.batch_size, small.optim.lr) == (runlocal.batch_size, runlocal.optim.lr)
    if name == "audio_jepa":  # M2D's front end and crop at this scale (below)
        return
    assert small.data.crop_frames == runlocal.data.crop_frames


def test_audio_jepa_small_reads_m2d_front_end_and_crop():
    """At this scale the paper's 32 kHz front end (39 ms hop: 8 x 4 patches per crop) learnt nothing its floors do
    not; M2D's 16 kHz, 10 ms-hop one at 80 x 208 did (docs/dev_benchmark.md, session 17). The shards, statistics
    and embedded corpus are then M2D's."""
    small, m2d_small = load_config("configs/audio_jepa.py:small"), load_config("configs/m2d.py:small")
    for key in ("frontend", "crop_frames"):
        assert small.data[key] == m2d_small.data[key], key
    assert tuple(small.data.embedded.stats_frontends) == ("m2d",)
    assert load_config("configs/audio_jepa.py:runlocal").data.frontend == "audiojepa_paper"
    assert load_config("configs/audio_jepa.py").data.frontend == "audiojepa_paper"


@pytest.mark.parametrize("name", SMALL_CONFIGS)
def test_small_preset_is_documented_with_its_command_and_numbers(name):
    doc = _docstring(name)
    command = f"python -m audiojepa.main --config=configs/{name}.py:small"
    assert command in doc, f"configs/{name}.py's docstring lacks `{command} ...`"
    after = doc[doc.index(command):]
    assert "--config.data.shards=" in after.split("\n\n")[0], "the small command must name the real-audio shards"
    assert "dev benchmark" in after.lower(), "the docstring must say what the small run gives on the dev benchmark"
