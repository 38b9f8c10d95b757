"""Evaluation reports: a markdown table (printed and saved), results.json and a bar chart per task.

An encoder evaluated at a chosen layer (`evaluate --layer`) has rows named `layer_row(name, k)`, one per layer
with `--layer=all`; each of their results records its "layer" (0-based). A result without "layer" (from a run
without --layer, or from before it existed) is the encoder's final output.
"""

from __future__ import annotations

import json
import math
import os


def json_safe(value):
    """`value` with every NaN or infinite float replaced by None, so that strict JSON parsers read the file.

    A one-seed run has no spread: its `ci95` and `std` are NaN in memory and null in results.json."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):  # numpy float64 is a float too
        return None
    return value


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _linear_cell(linear: dict | None) -> str:
    """"81.2 ± 1.3 accuracy", or "81.2 accuracy (1 seed)" where there is no interval; a frame-level (SED) probe
    adds its frame hop: "62.0 ± 1.3 onset_fms, 160 ms frames"."""
    if linear is None:
        return "–"
    frames = f", {1000 * linear['frame_hop_seconds']:g} ms frames" if linear.get("frame_hop_seconds") else ""
    if not _finite(linear.get("mean")):
        return f"n/a {linear['metric']}{frames}"
    if _finite(linear.get("ci95")):
        return f"{100 * linear['mean']:.1f} ± {100 * linear['ci95']:.1f} {linear['metric']}{frames}"
    seeds = len(linear.get("per_seed") or ())
    why = "1 seed" if seeds == 1 else "no interval"
    return f"{100 * linear['mean']:.1f} {linear['metric']} ({why}){frames}"


def _knn_cell(knn: dict | None) -> str:
    """"64.4 [49.8, 76.8] accuracy": the score and its 95% interval over the test clips where there is one."""
    if knn is None:
        return "–"
    if not _finite(knn.get("mean")):
        return f"n/a {knn['metric']}"
    interval = knn.get("test_interval95")
    span = f" [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]" if interval else ""
    return f"{100 * knn['mean']:.1f}{span} {knn['metric']}"


def markdown_table(results: dict[str, dict[str, dict]], knn_k: int = 10) -> str:
    """results: {encoder_name: {task_name: {"linear": {...} | None, "knn": {...} | None}}} -> a markdown table.

    A probe the protocol did not run shows as "–"; a one-seed linear probe, which has no interval, "(1 seed)".
    The linear probe's interval is over the probe's seeds (the test set is fixed); kNN, which has no seed, shows
    the test set's own sampling error: a 95% interval over its clips (accuracy only; Wilson's on a split, around
    the folds' mean on folds: probes.evaluate_task)."""
    lines = [f"| task | encoder | linear probe (± 95% over seeds) | kNN (k={knn_k}) [95% over test clips] |",
             "|---|---|---:|---:|"]
    tasks = sorted({t for per_task in results.values() for t in per_task})
    for task in tasks:
        for encoder_name, per_task in results.items():
            if task not in per_task:
                continue
            linear, knn = per_task[task].get("linear"), per_task[task].get("knn")
            linear_cell = _linear_cell(linear)
            knn_cell = _knn_cell(knn)
            lines.append(f"| {task} | {encoder_name} | {linear_cell} | {knn_cell} |")
    return "\n".join(lines)


def layer_row(name: str, layer: int) -> str:
    """The report row of encoder `name` at `layer`, e.g. "random init (layer 3)"."""
    return f"{name} (layer {layer})"


def every_layer_results(results: dict[str, dict[str, dict]], rows: list[str]) -> dict[str, dict]:
    """results.json of an encoder evaluated at every layer (`rows`: its rows, layer 0 first).

    Each task keeps the last layer's result on top (the final output: the numbers and "protocol" that
    results.json holds without --layer, so readers of older files find the same keys) and adds
    "layers": {"<k>": {"linear", "knn", "layer"}} for every layer k.
    """
    out = {}
    for task, last in results[rows[-1]].items():
        layers = {str(k): {key: results[row][task].get(key) for key in ("linear", "knn")} | {"layer": k}
                  for k, row in enumerate(rows)}
        out[task] = {**last, "layers": layers}
    return out


def step_row(name: str, step: int) -> str:
    """The report row of training workdir `name` at checkpoint `step`, e.g. "/ckpt/m2d @ step 3000"."""
    return f"{name} @ step {step}"


def every_step_results(results: dict[str, dict[str, dict]], step_rows: list[tuple[int, str]]) -> dict[str, dict]:
    """results.json of a workdir evaluated at several checkpoints (`step_rows`: (step, row), ascending): each
    task keeps the last step's result on top and adds "steps": {"<step>": {"linear", "knn", "step"}}."""
    out = {}
    for task, last in results[step_rows[-1][1]].items():
        steps = {str(step): {key: results[row][task].get(key) for key in ("linear", "knn")} | {"step": step}
                 for step, row in step_rows if task in results[row]}
        out[task] = {**last, "steps": steps}
    return out


def step_table(main_results: dict[str, dict]) -> str:
    """The scores of an every-step results.json (`every_step_results`) as a markdown table, step by step."""
    lines = ["| task | step | linear probe | kNN |", "|---|---:|---:|---:|"]
    for task, result in sorted(main_results.items()):
        for step, r in sorted(result["steps"].items(), key=lambda item: int(item[0])):
            knn = r.get("knn")
            knn_cell = f"{100 * knn['mean']:.1f}" if knn and _finite(knn.get("mean")) else "–"
            lines.append(f"| {task} | {step} | {_linear_cell(r.get('linear'))} | {knn_cell} |")
    return "\n".join(lines)


def step_chart(main_results: dict[str, dict], path: str) -> str:
    """scores_by_step.png: each task's linear probe (with its 95% interval) and kNN against the checkpoint step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    metrics = set()
    for task, result in sorted(main_results.items()):
        steps = sorted(result["steps"].values(), key=lambda r: r["step"])
        for probe, style in (("linear", "-o"), ("knn", "--s")):
            points = [(r["step"], r[probe]) for r in steps if r.get(probe) and _finite(r[probe].get("mean"))]
            if not points:
                continue
            metrics.add(points[0][1]["metric"])
            x = [s for s, _ in points]
            y = [100 * p["mean"] for _, p in points]
            line, = ax.plot(x, y, style, label=f"{task} {'linear probe' if probe == 'linear' else 'kNN'}")
            ci = [100 * p["ci95"] if _finite(p.get("ci95")) else 0.0 for _, p in points]
            if probe == "linear" and any(ci):
                ax.fill_between(x, [a - b for a, b in zip(y, ci)], [a + b for a, b in zip(y, ci)],
                                color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel(" / ".join(f"{m} (%)" for m in sorted(metrics)))
    ax.set_title("score by checkpoint")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _score(result: dict) -> tuple[float, str] | None:
    """(the linear probe's mean, "linear probe"), else kNN's; None when neither ran or is finite."""
    for probe, label in (("linear", "linear probe"), ("knn", "kNN")):
        mean = (result.get(probe) or {}).get("mean")
        if _finite(mean):
            return mean, label
    return None


def best_layer_lines(main_results: dict[str, dict]) -> list[str]:
    """One line per task of an every-layer results.json (`every_layer_results`): its best layer and score."""
    lines = []
    for task, result in sorted(main_results.items()):
        scored = [(_score(r), int(k)) for k, r in result.get("layers", {}).items() if _score(r) is not None]
        if scored:
            (score, probe), layer = max(scored, key=lambda s: (s[0][0], -s[1]))  # ties: the earlier layer
            lines.append(f"- {task}: layer {layer} ({probe} {100 * score:.1f})")
    return lines


def protocol_lines(protocol, results: dict[str, dict[str, dict]]) -> list[str]:
    """What decided the scores: the protocol's values, each task's crop length and validation clips."""
    batch = protocol.probe_batch_size or "min(200, n_train)"
    stop = f"patience {protocol.patience}" if protocol.patience else "no early stopping"
    lines = [f"Protocol `{protocol.name}` ({protocol.used_by}): lr {protocol.lr:g}, probe batch {batch}, "
             f"<= {protocol.max_epochs} epochs ({stop}), selection {protocol.selection}, head {protocol.head}, "
             f"seeds {', '.join(map(str, protocol.seeds))}, probes {' + '.join(protocol.probes)}"
             + (f"; overridden: {', '.join(protocol.overridden)}" if protocol.overridden else "") + "."]
    per_task = next(iter(results.values()), {})
    for task, r in sorted(per_task.items()):
        record = r.get("protocol") or {}
        crop = (f"unit_sec {record['unit_sec']:g} s ({record['unit_sec_source']})" if record.get("unit_sec")
                else "whole clips")
        if r.get("sed"):  # a sound event detection task (evaluation/sed.py)
            sed = r["sed"]
            crop = (f"sound event detection with its own probe (not the protocol's): lr {record['lr']:g}, "
                    f"{record['probe_batch_frames']} frames a step, <= {record['max_epochs']} epochs, valid scored "
                    f"every {record['valid_every_epochs']} (patience {record['patience_scorings']} scorings), seeds "
                    f"{', '.join(map(str, record['seeds']))}; whole files, frames every "
                    f"{1000 * sed['frame_hop_seconds']:g} ms ({sed['timestamps']}); onset F-measure "
                    f"({1000 * sed['decoding']['onset_collar_s']:g} ms collar, {sed['decoding']['average']})")
        validation = (r.get("linear") or {}).get("validation")
        lines.append(f"- {task}: {crop}" + (f"; model selected on the {validation}" if validation else "")
                     + (f"; kNN skipped ({record['knn_skipped']})" if record.get("knn_skipped") else ""))
    return lines


def majority_lines(majority: dict[str, dict | None]) -> list[str]:
    """One line per task of `{task: tasks.majority_class(...)}`: the score of always answering the most frequent
    training label (a multi-label task, None, has none)."""
    lines = []
    for task, m in sorted(majority.items()):
        if m is not None:
            answer = f"always {m['label']!r}" if m["label"] is not None else "the training folds' most frequent label"
            lines.append(f"- {task}: {answer}: {100 * m['accuracy']:.1f}% of {m['test_clips']} test clips")
    return lines


def bar_chart(task: str, results: dict[str, dict[str, dict]], path: str) -> str:
    """One PNG per task: linear probe (with its 95% interval over seeds) and kNN for each encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [name for name in results if task in results[name]]
    linear = [results[n][task].get("linear") for n in names]
    knn = [results[n][task].get("knn") for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6), dpi=120)
    if any(r is not None for r in linear):
        ax.bar(x - 0.2, [100 * r["mean"] if r and _finite(r["mean"]) else 0 for r in linear], 0.4,
               yerr=[100 * r["ci95"] if r and _finite(r.get("ci95")) else 0 for r in linear], capsize=3,
               label="linear probe")
    if any(r is not None for r in knn):
        ax.bar(x + 0.2, [100 * r["mean"] if r and _finite(r["mean"]) else 0 for r in knn], 0.4, label="kNN")
    ax.set_xticks(x, [os.path.basename(n.rstrip("/")) or n for n in names], rotation=15, fontsize=8)
    metric = next((r["metric"] for r in linear + knn if r is not None), "")
    ax.set_ylabel(f"{metric} (%)" if metric else "")
    ax.set_ylim(0, 100)
    ax.set_title(task)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(output_dir: str, main_name: str, results: dict[str, dict[str, dict]], extra: dict | None = None,
                 protocol=None, main_rows: list[str] | None = None, step_rows: list[tuple[int, str]] | None = None):
    """Writes results.json (the main encoder's {task: {...}}), all_results.json, results.md and PNGs; with a
    `protocol` (protocols.Protocol) the table is followed by its values and each task's crop and validation, and
    with `extra["majority_class"]` ({task: tasks.majority_class(...)}) by each task's majority-class score.

    `main_rows`: the main encoder's rows when it was evaluated at every layer (layer 0 first; `main_name` is
    then the last one): results.json is `every_layer_results` and results.md names each task's best layer.
    `step_rows`: (step, row) of a workdir evaluated at several checkpoints (ascending; `main_name` is the last
    row): results.json is `every_step_results`, results.md adds the scores step by step, and
    scores_by_step.png plots them.
    The JSON files are strict JSON: a NaN or infinite value (a one-seed run's `ci95` and `std`) is written as
    null (`json_safe`)."""
    os.makedirs(output_dir, exist_ok=True)
    results = json_safe(results)
    main_results = (every_layer_results(results, main_rows) if main_rows
                    else every_step_results(results, step_rows) if step_rows else results[main_name])
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(main_results, f, indent=1, allow_nan=False)
    with open(os.path.join(output_dir, "all_results.json"), "w") as f:
        json.dump(json_safe({"results": results, **(extra or {})}), f, indent=1, allow_nan=False)
    table = markdown_table(results, knn_k=protocol.knn_k if protocol else 10)
    if main_rows:
        table += "\n\nBest layer of the encoder per task (chosen on test scores: for comparing layers, not for " \
                 "reporting a score):\n" + "\n".join(best_layer_lines(main_results))
    if step_rows:
        table += "\n\nScores by checkpoint (scores_by_step.png):\n" + step_table(main_results)
        step_chart(main_results, os.path.join(output_dir, "scores_by_step.png"))
    majority = majority_lines((extra or {}).get("majority_class") or {})
    if majority:
        table += ("\n\nMajority class (answering the most frequent training label; a probe at or under it has "
                  "learnt nothing):\n" + "\n".join(majority))
    if protocol is not None:
        table += "\n\n" + "\n".join(protocol_lines(protocol, {main_name: results[main_name]}))
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    tasks = sorted({t for per_task in results.values() for t in per_task})
    for task in tasks:
        bar_chart(task, results, os.path.join(output_dir, f"{task}.png"))
    return table
