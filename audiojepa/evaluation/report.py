"""Evaluation reports: a markdown table (printed and saved), results.json and a bar chart per task."""

from __future__ import annotations

import json
import os


def markdown_table(results: dict[str, dict[str, dict]], knn_k: int = 10) -> str:
    """results: {encoder_name: {task_name: {"linear": {...} | None, "knn": {...} | None}}} -> a markdown table.

    A probe the protocol did not run shows as "–"."""
    # The interval is over the probe's seeds (the test set is fixed), not the test set's sampling error.
    lines = [f"| task | encoder | linear probe (± 95% over seeds) | kNN (k={knn_k}) |", "|---|---|---:|---:|"]
    tasks = sorted({t for per_task in results.values() for t in per_task})
    for task in tasks:
        for encoder_name, per_task in results.items():
            if task not in per_task:
                continue
            linear, knn = per_task[task].get("linear"), per_task[task].get("knn")
            linear_cell = ("–" if linear is None else
                           f"{100 * linear['mean']:.1f} ± {100 * linear['ci95']:.1f} {linear['metric']}")
            knn_cell = "–" if knn is None else f"{100 * knn['mean']:.1f} {knn['metric']}"
            lines.append(f"| {task} | {encoder_name} | {linear_cell} | {knn_cell} |")
    return "\n".join(lines)


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
        validation = (r.get("linear") or {}).get("validation")
        lines.append(f"- {task}: {crop}" + (f"; model selected on the {validation}" if validation else "")
                     + (f"; kNN skipped ({record['knn_skipped']})" if record.get("knn_skipped") else ""))
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
        ax.bar(x - 0.2, [100 * r["mean"] if r else 0 for r in linear], 0.4,
               yerr=[100 * r["ci95"] if r else 0 for r in linear], capsize=3, label="linear probe")
    if any(r is not None for r in knn):
        ax.bar(x + 0.2, [100 * r["mean"] if r else 0 for r in knn], 0.4, label="kNN")
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
                 protocol=None):
    """Writes results.json (the main encoder's {task: {...}}), all_results.json, results.md and PNGs; with a
    `protocol` (protocols.Protocol) the table is followed by its values and each task's crop and validation."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results[main_name], f, indent=1)
    with open(os.path.join(output_dir, "all_results.json"), "w") as f:
        json.dump({"results": results, **(extra or {})}, f, indent=1)
    table = markdown_table(results, knn_k=protocol.knn_k if protocol else 10)
    if protocol is not None:
        table += "\n\n" + "\n".join(protocol_lines(protocol, {main_name: results[main_name]}))
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    tasks = sorted({t for per_task in results.values() for t in per_task})
    for task in tasks:
        bar_chart(task, results, os.path.join(output_dir, f"{task}.png"))
    return table
