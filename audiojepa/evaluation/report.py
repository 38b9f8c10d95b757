"""Evaluation reports: a markdown table (printed and saved), results.json and a bar chart per task."""

from __future__ import annotations

import json
import os


def markdown_table(results: dict[str, dict[str, dict]]) -> str:
    """results: {encoder_name: {task_name: {"linear": {...}, "knn": {...}}}} -> a markdown table."""
    # The interval is over the probe's seeds (the test set is fixed), not the test set's sampling error.
    lines = ["| task | encoder | linear probe (± 95% over seeds) | kNN (k=10) |", "|---|---|---:|---:|"]
    tasks = sorted({t for per_task in results.values() for t in per_task})
    for task in tasks:
        for encoder_name, per_task in results.items():
            if task not in per_task:
                continue
            r = per_task[task]
            linear, knn = r["linear"], r["knn"]
            lines.append(f"| {task} | {encoder_name} | {100 * linear['mean']:.1f} ± {100 * linear['ci95']:.1f} "
                         f"{linear['metric']} | {100 * knn['mean']:.1f} {knn['metric']} |")
    return "\n".join(lines)


def bar_chart(task: str, results: dict[str, dict[str, dict]], path: str) -> str:
    """One PNG per task: linear probe (with its 95% interval over seeds) and kNN for each encoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [name for name in results if task in results[name]]
    linear = [results[n][task]["linear"] for n in names]
    knn = [results[n][task]["knn"] for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 3.6), dpi=120)
    ax.bar(x - 0.2, [100 * r["mean"] for r in linear], 0.4, yerr=[100 * r["ci95"] for r in linear],
           capsize=3, label="linear probe")
    ax.bar(x + 0.2, [100 * r["mean"] for r in knn], 0.4, label="kNN")
    ax.set_xticks(x, [os.path.basename(n.rstrip("/")) or n for n in names], rotation=15, fontsize=8)
    ax.set_ylabel(f"{linear[0]['metric']} (%)" if linear else "")
    ax.set_ylim(0, 100)
    ax.set_title(task)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(output_dir: str, main_name: str, results: dict[str, dict[str, dict]], extra: dict | None = None):
    """Writes results.json (the main encoder's {task: {...}}), all_results.json, results.md and PNGs."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(results[main_name], f, indent=1)
    with open(os.path.join(output_dir, "all_results.json"), "w") as f:
        json.dump({"results": results, **(extra or {})}, f, indent=1)
    table = markdown_table(results)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    tasks = sorted({t for per_task in results.values() for t in per_task})
    for task in tasks:
        bar_chart(task, results, os.path.join(output_dir, f"{task}.png"))
    return table
