"""A recipe's scores over several pretraining runs, against its floors: the comparison one run cannot make.

A pretraining run is one draw. On the real-audio dev benchmark the seed alone moves a `:small` preset's kNN score
by up to 30 points on a 64-clip test split (docs/dev_benchmark.md), more than the probe seeds' interval or the test
clips' interval of any single report. This module reads the `python -m audiojepa.evaluate --output=DIR` folders of
runs that differ only in their pretraining seed and, per task and probe, gives the mean over runs with its Student-t
95% half-width (`probes.confidence_interval_95`; none for one run), each run's score, and in how many runs the
encoder scored above both floors: the log-mel baseline and the same architecture at random init (at the encoder
row's layer), taken from the reports that evaluated them. The majority class is shown, not counted.

    read_report(dir) -> Report                       one evaluate output folder
    summarise(reports) -> {task: {probe: Summary}}   over the runs of one recipe
    markdown_table({recipe: [Report, ...]}) -> str   the table tools/summarise_seeds.py prints

Scores are fractions (0-1) as in results.json; the table prints percentages.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import numpy as np

from audiojepa.evaluation import probes

RESULTS_FILE = "all_results.json"
PROBES = ("linear", "knn")
BASELINE_ROWS = ("logmel", "random init")


@dataclasses.dataclass(frozen=True)
class Report:
    """One evaluate output folder: the encoder's scores and the floors it was reported with.

    scores: {task: {"linear": float | None, "knn": float | None}} of the encoder row;
    floors: {"logmel" | "random init": {task: {probe: float | None}}}, the baseline rows the report holds;
    majority: {task: float | None}, the majority-class score (None for multi-label tasks)."""
    path: str
    row: str
    scores: dict[str, dict[str, float | None]]
    floors: dict[str, dict[str, dict[str, float | None]]]
    majority: dict[str, float | None]


@dataclasses.dataclass(frozen=True)
class Summary:
    """One probe of one task over a recipe's runs: mean, Student-t 95% half-width (NaN for one run), per-run scores."""
    mean: float
    ci95: float
    per_run: tuple[float, ...]


def _probe_scores(task_result: dict) -> dict[str, float | None]:
    out = {}
    for probe in PROBES:
        entry = task_result.get(probe)
        mean = entry.get("mean") if entry else None
        out[probe] = float(mean) if isinstance(mean, (int, float)) and math.isfinite(mean) else None
    return out


def _baseline_of(row: str) -> str | None:
    """"logmel" or "random init" for a baseline row of a report ("random init (layer 3)" too), else None."""
    if row == "logmel":
        return row
    return "random init" if re.fullmatch(r"random init(?: \(layer -?\d+\))?", row) else None


def read_report(spec: str) -> Report:
    """`DIR` or `DIR#ROW` (an evaluate --output folder; ROW picks the encoder row where the report has several,
    e.g. with --layer=all) -> Report. Errors name the folder and the rows it holds."""
    path, _, row = spec.partition("#")
    results_path = os.path.join(path, RESULTS_FILE)
    if not os.path.exists(results_path):
        raise FileNotFoundError(f"{results_path} does not exist: pass the --output folder of "
                                "`python -m audiojepa.evaluate`")
    with open(results_path) as f:
        data = json.load(f)
    rows = data.get("results") or {}
    encoders = [name for name in rows if _baseline_of(name) is None]
    if row:
        if row not in rows:
            raise ValueError(f"{results_path} has no row {row!r}; its rows: {sorted(rows)}")
    elif len(encoders) == 1:
        row = encoders[0]
    else:
        raise ValueError(f"{results_path} holds {len(encoders)} encoder rows {sorted(encoders)}; pick one with "
                         f"{path}#ROW")
    scores = {task: _probe_scores(result) for task, result in rows[row].items()}
    # The random-init floor at the encoder row's layer (`evaluate --layer=k` rows end in " (layer k)").
    layer = re.search(r" \(layer -?\d+\)$", row)
    wanted = {"logmel": "logmel", "random init": "random init" + (layer.group(0) if layer else "")}
    floors = {floor: {task: _probe_scores(result) for task, result in rows[name].items()}
              for floor, name in wanted.items() if name in rows}
    majority = {task: None if m is None else float(m["accuracy"])
                for task, m in (data.get("majority_class") or {}).items()}
    return Report(path=path, row=row, scores=scores, floors=floors, majority=majority)


def summarise(reports: list[Report], tasks: list[str] | None = None) -> dict[str, dict[str, Summary | None]]:
    """{task: {probe: Summary | None}} over `reports` (runs of one recipe), for `tasks` (default: the first
    report's). A task missing from one run is an error naming that run's folder, not a silently shorter mean.
    None where a probe has no score in some run (e.g. kNN on a multi-label task)."""
    if not reports:
        raise ValueError("no reports to summarise")
    tasks = list(reports[0].scores) if tasks is None else list(tasks)
    for report in reports:
        missing = [t for t in tasks if t not in report.scores]
        if missing:
            raise ValueError(f"{report.path} has no result for task(s) {missing} (it has {sorted(report.scores)}); "
                             "evaluate every run on the same tasks, or choose the tasks to summarise")
    out = {}
    for task in tasks:
        out[task] = {}
        for probe in PROBES:
            values = [r.scores[task][probe] for r in reports]
            if any(v is None for v in values):
                out[task][probe] = None
                continue
            out[task][probe] = Summary(mean=float(np.mean(values)), ci95=probes.confidence_interval_95(values),
                                       per_run=tuple(values))
    return out


def recipe_floors(reports: list[Report]) -> dict[str, dict[str, dict[str, float | None]]]:
    """The baseline rows of the first report that has each (runs of one recipe share their front end and
    architecture, so their log-mel and random-init rows are the same)."""
    floors = {}
    for name in BASELINE_ROWS:
        for report in reports:
            if name in report.floors:
                floors[name] = report.floors[name]
                break
    return floors


def runs_above_floors(summary: Summary, floor_scores: list[float | None]) -> int:
    """How many runs scored strictly above every floor in `floor_scores` (None floors are ignored)."""
    known = [f for f in floor_scores if f is not None]
    return sum(all(v > f for f in known) for v in summary.per_run)


def _cell(summary: Summary | None) -> str:
    if summary is None:
        return "–"
    runs = ", ".join(f"{100 * v:.1f}" for v in summary.per_run)
    if not math.isfinite(summary.ci95):
        return f"{100 * summary.mean:.1f} (1 run)"
    return f"{100 * summary.mean:.1f} ± {100 * summary.ci95:.1f} ({runs})"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_table(recipes: dict[str, list[Report]], tasks: list[str] | None = None) -> str:
    """{recipe name: its runs' reports} -> a markdown table: per recipe and task, linear and kNN as mean ± Student-t
    95% over runs (each run's score), the floors, and in how many runs each probe beat both the log-mel baseline
    and random init (a floor missing from every report of the recipe is shown as "–" and not counted). `tasks`:
    the tasks to show (default: each recipe's first report's)."""
    lines = ["| recipe | task | runs | linear (mean ± 95% over runs; each run) "
             "| kNN (mean ± 95% over runs; each run) "
             "| log-mel linear / kNN | random init linear / kNN | majority | runs above both floors: linear, kNN |",
             "|---|---|---:|---|---|---|---|---:|---|"]
    for name, reports in recipes.items():
        summary = summarise(reports, tasks)
        floors = recipe_floors(reports)
        for task, by_probe in summary.items():
            floor_cells, counts = [], []
            for floor in BASELINE_ROWS:
                scores = floors.get(floor, {}).get(task, {})
                floor_cells.append(f"{_pct(scores.get('linear'))} / {_pct(scores.get('knn'))}")
            for probe in PROBES:
                if by_probe[probe] is None:
                    counts.append("–")
                    continue
                floor_scores = [floors.get(f, {}).get(task, {}).get(probe) for f in BASELINE_ROWS]
                if all(f is None for f in floor_scores):  # nothing to beat: no count, rather than a vacuous n/n
                    counts.append("no floors")
                    continue
                counts.append(f"{runs_above_floors(by_probe[probe], floor_scores)}/{len(reports)}")
            majority = reports[0].majority.get(task)
            lines.append(f"| {name} | {task} | {len(reports)} | {_cell(by_probe['linear'])} | {_cell(by_probe['knn'])} "
                         f"| {floor_cells[0]} | {floor_cells[1]} | {_pct(majority)} | {', '.join(counts)} |")
    return "\n".join(lines) + "\n"
