"""A recipe summarised over its pretraining runs (audiojepa.evaluation.seed_summary, tools/summarise_seeds.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from audiojepa.evaluation import seed_summary
from task_helpers import tone_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _result(linear, knn):
    return {"metric": "accuracy", "linear": {"metric": "accuracy", "mean": linear, "ci95": 0.01},
            "knn": None if knn is None else {"metric": "accuracy", "mean": knn, "test_interval95": [0.0, 1.0]}}


def _write_report(folder, encoder_scores, floors=None, row="/runs/a", majority=0.5):
    """An evaluate output folder: `encoder_scores` {task: (linear, knn)}; `floors` {row: {task: (linear, knn)}}."""
    os.makedirs(folder)
    results = {row: {t: _result(*s) for t, s in encoder_scores.items()}}
    for name, scores in (floors or {}).items():
        results[name] = {t: _result(*s) for t, s in scores.items()}
    with open(os.path.join(folder, "all_results.json"), "w") as f:
        json.dump({"results": results, "majority_class": {
            t: {"label": None, "accuracy": majority, "test_clips": 100} for t in encoder_scores}}, f)
    return str(folder)


def test_mean_and_interval_over_runs_match_a_student_t_interval_and_runs_above_floors_are_counted(tmp_path):
    floors = {"logmel": {"a": (0.40, 0.30)}, "random init": {"a": (0.50, 0.35)}}
    linear, knn = [0.62, 0.48, 0.71], [0.47, 0.33, 0.52]
    folders = [_write_report(tmp_path / f"s{i}", {"a": (linear[i], knn[i])}, floors if i == 1 else None)
               for i in range(3)]
    reports = [seed_summary.read_report(f) for f in folders]
    summary = seed_summary.summarise(reports)["a"]
    for probe, values in (("linear", linear), ("knn", knn)):
        low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
        assert summary[probe].mean == pytest.approx(np.mean(values), abs=1e-12)
        assert summary[probe].ci95 == pytest.approx((high - low) / 2, rel=1e-9)
        assert summary[probe].per_run == tuple(values)
    # Floors come from the one report that has them (the second run's).
    assert seed_summary.recipe_floors(reports) == {"logmel": {"a": {"linear": 0.40, "knn": 0.30}},
                                                   "random init": {"a": {"linear": 0.50, "knn": 0.35}}}
    # linear: 0.62, 0.71 beat 0.50 and 0.40, 0.48 does not; kNN: 0.47, 0.52 beat 0.35 and 0.30, 0.33 does not.
    table = seed_summary.markdown_table({"M2D": reports})
    row = next(line for line in table.splitlines() if line.startswith("| M2D | a |"))
    assert "| 3 | 60.3 ± " in row and "(62.0, 48.0, 71.0)" in row
    assert "| 40.0 / 30.0 | 50.0 / 35.0 | 50.0 | 2/3, 2/3 |" in row


def test_one_run_has_no_interval_and_a_probe_without_scores_is_a_dash(tmp_path):
    folder = _write_report(tmp_path / "s0", {"tags": (0.3, None)}, {"logmel": {"tags": (0.2, None)}})
    reports = [seed_summary.read_report(folder)]
    summary = seed_summary.summarise(reports)["tags"]
    assert summary["knn"] is None and np.isnan(summary["linear"].ci95)
    row = seed_summary.markdown_table({"r": reports}).splitlines()[-1]
    # No random-init floor was evaluated: shown as a dash and the count uses log-mel alone.
    assert row == "| r | tags | 1 | 30.0 (1 run) | – | 20.0 / – | – / – | 50.0 | 1/1, – |"
    # A report evaluated without --baselines has no floors: no count, not a vacuous "1/1".
    bare = seed_summary.read_report(_write_report(tmp_path / "bare", {"tags": (0.3, 0.2)}))
    assert seed_summary.markdown_table({"r": [bare]}).splitlines()[-1].endswith("| no floors, no floors |")


def test_a_task_missing_from_one_run_or_an_ambiguous_row_is_an_error_naming_the_folder(tmp_path):
    full = _write_report(tmp_path / "s0", {"a": (0.5, 0.5), "b": (0.5, 0.5)})
    short = _write_report(tmp_path / "s1", {"a": (0.6, 0.6)})
    reports = [seed_summary.read_report(full), seed_summary.read_report(short)]
    with pytest.raises(ValueError, match=r"s1 has no result for task\(s\) \['b'\]"):
        seed_summary.summarise(reports)
    assert seed_summary.summarise(reports, ["a"])["a"]["linear"].per_run == (0.5, 0.6)

    layers = _write_report(tmp_path / "layers", {"a": (0.5, 0.5)}, {"/runs/a (layer 0)": {"a": (0.4, 0.4)}})
    with pytest.raises(ValueError, match=r"holds 2 encoder rows .*layers#ROW"):
        seed_summary.read_report(layers)
    assert seed_summary.read_report(f"{layers}#/runs/a (layer 0)").scores == {"a": {"linear": 0.4, "knn": 0.4}}
    with pytest.raises(ValueError, match=r"no row 'nope'"):
        seed_summary.read_report(f"{layers}#nope")
    with pytest.raises(FileNotFoundError, match=r"nothing.all_results.json does not exist"):
        seed_summary.read_report(str(tmp_path / "nothing"))


def test_a_layer_report_takes_random_init_at_the_same_layer_as_its_floor(tmp_path):
    """`evaluate --layer=k` names rows "NAME (layer k)" and "random init (layer k)"; --layer=all writes every k."""
    rows = {"/runs/a (layer 0)": {"t": (0.7, 0.6)}, "random init (layer 0)": {"t": (0.5, 0.4)},
            "/runs/a (layer 1)": {"t": (0.8, 0.7)}, "random init (layer 1)": {"t": (0.3, 0.2)},
            "logmel": {"t": (0.1, 0.1)}}
    single = _write_report(tmp_path / "one", {"t": (0.7, 0.6)}, {"random init (layer 0)": {"t": (0.5, 0.4)}},
                           row="/runs/a (layer 0)")
    report = seed_summary.read_report(single)
    assert report.row == "/runs/a (layer 0)" and report.floors == {"random init": {"t": {"linear": 0.5, "knn": 0.4}}}
    every = _write_report(tmp_path / "all", rows.pop("/runs/a (layer 0)"), rows, row="/runs/a (layer 0)")
    with pytest.raises(ValueError, match=r"holds 2 encoder rows"):
        seed_summary.read_report(every)
    at_1 = seed_summary.read_report(f"{every}#/runs/a (layer 1)")
    assert at_1.floors["random init"] == {"t": {"linear": 0.3, "knn": 0.2}}
    assert at_1.floors["logmel"] == {"t": {"linear": 0.1, "knn": 0.1}}


def test_reads_what_evaluate_writes_and_the_tool_prints_the_table(tmp_path):
    from audiojepa import evaluate

    task = tone_task(tmp_path / "tones")
    outputs = []
    for seed in (0, 1):  # two "runs": the log-mel encoder with two probe seeds
        out = tmp_path / f"eval{seed}"
        evaluate.run("logmel", [str(task)], str(out), baselines=False, seeds=(seed,), embedding_cache_dir=None)
        outputs.append(f"{out}#logmel")
    reports = [seed_summary.read_report(o) for o in outputs]
    written = [json.load(open(tmp_path / f"eval{s}" / "all_results.json"))["results"]["logmel"]["tones"]
               for s in (0, 1)]
    summary = seed_summary.summarise(reports)["tones"]
    assert summary["linear"].per_run == tuple(w["linear"]["mean"] for w in written)
    assert summary["knn"].per_run == tuple(w["knn"]["mean"] for w in written)
    assert reports[0].majority["tones"] == pytest.approx(0.5)  # 8 low / 8 high training clips: the first, 'high'

    table_file = tmp_path / "seeds.md"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "summarise_seeds.py"),
                             f"--recipe=log-mel={','.join(outputs)}", "--task=tones", f"--output={table_file}"],
                            capture_output=True, text=True, check=True)
    assert result.stdout == table_file.read_text() == seed_summary.markdown_table({"log-mel": reports})
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "summarise_seeds.py"), "--recipe=nodirs="],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--recipe='nodirs=': expected NAME=DIR[,DIR...]" in bad.stderr
