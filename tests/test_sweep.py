"""launch/sweep.py: expanding get_sweep() into runs and collecting their evaluations into one table."""

import json
import os
import sys

from launch import sweep


def test_jepa_sweep_expands_the_table3_grid():
    cmds = sweep.commands("configs/jepa.py:runlocal", "/tmp/root", ["--config.total_steps=5"])
    grid = [[a for a in c if a.startswith("--config.model.")] for c in cmds[:4]]
    assert grid == [
        ["--config.model.masking=unstructured", "--config.model.target_domain=input"],
        ["--config.model.masking=unstructured", "--config.model.target_domain=latent"],
        ["--config.model.masking=multiblock", "--config.model.target_domain=input"],
        ["--config.model.masking=multiblock", "--config.model.target_domain=latent"],
    ]
    assert all(c[:3] == [sys.executable, "-m", "audiojepa.main"] and c[-1] == "--config.total_steps=5" for c in cmds)
    assert len({next(a for a in c if a.startswith("--workdir=")) for c in cmds}) == len(cmds)


def test_evaluate_runs_writes_one_comparison_table(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, check):  # stands in for `python -m audiojepa.evaluate`, which has its own tests
        calls.append(cmd)
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--output="))
        os.makedirs(out)
        score = 0.5 + 0.1 * len(calls)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump({"embedded": {"linear": {"mean": score, "ci95": 0.02, "metric": "accuracy"},
                                    "knn": {"mean": score - 0.1, "metric": "accuracy"}}}, f)

    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    workdirs = [str(tmp_path / "a"), str(tmp_path / "b")]
    table = sweep.evaluate_runs(workdirs, ["embedded"], str(tmp_path))
    assert [c[3] for c in calls] == [f"--encoder={w}" for w in workdirs]
    assert table.splitlines()[2:] == ["| a | embedded | 60.0 ± 2.0 | 50.0 |", "| b | embedded | 70.0 ± 2.0 | 60.0 |"]
    assert (tmp_path / "sweep_results.md").read_text() == table


def test_evaluate_only_lists_unfinished_runs_and_trains_nothing(tmp_path, monkeypatch, capsys):
    import pytest

    cmds = sweep.commands("configs/jepa.py:runlocal", str(tmp_path), [])[:3]
    workdirs = [next(a.split("=", 1)[1] for a in c if a.startswith("--workdir=")) for c in cmds]
    for workdir, summary in zip(workdirs[:2], ({"step": 300, "total_steps": 300, "finished": True},
                                               {"step": 120, "total_steps": 300, "finished": False, "preempted": True})):
        os.makedirs(workdir)
        with open(os.path.join(workdir, "run_summary.json"), "w") as f:
            json.dump(summary, f)
    assert sweep.unfinished_runs(workdirs) == [f"{workdirs[1]} (step 120 of 300, preempted)",
                                               f"{workdirs[2]} (no run_summary.json: never started?)"]

    ran = []
    monkeypatch.setattr(sweep.subprocess, "run", lambda cmd, check: ran.append(cmd))
    argv = ["sweep.py", "--config=configs/jepa.py:runlocal", f"--workdir_root={tmp_path}", "--limit=3",
            "--evaluate_only", "--evaluate_task=embedded"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        sweep.main()
    assert exit_info.value.code == 1 and ran == []  # nothing trained, nothing evaluated
    assert workdirs[1] in capsys.readouterr().err
