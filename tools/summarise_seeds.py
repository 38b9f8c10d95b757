r"""One table of several recipes, each over its pretraining seeds, against the floors
(audiojepa.evaluation.seed_summary).

Evaluate every run (same tasks; `--baselines` on at least one run of a recipe, for its log-mel and random-init
floors), then:

    python tools/summarise_seeds.py \
        --recipe="M2D :small=/eval/m2d_s0,/eval/m2d_s1" \
        --recipe="JEPA :small=/eval/jepa_s0,/eval/jepa_s1" --output=/eval/seeds.md

prints (and writes to --output) one row per recipe and task: linear and kNN as the mean over runs ± the Student-t
95% half-width over runs (each run's score in brackets), the log-mel and random-init floors, the majority class,
and in how many runs each probe beat both floors, e.g. `2/2, 1/2`. `DIR#ROW` picks a row of a report with several
encoder rows (`evaluate --layer=all`).
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.evaluation import seed_summary  # noqa: E402

flags.DEFINE_multi_string("recipe", None, "NAME=DIR[,DIR...]: a recipe's evaluate --output folders, one per "
                          "pretraining run (DIR#ROW picks a row).")
flags.DEFINE_multi_string("task", None, "Tasks to show, in this order (default: each recipe's first report's).")
flags.DEFINE_string("output", None, "Also write the table to this markdown file.")
flags.mark_flags_as_required(["recipe"])
FLAGS = flags.FLAGS


def parse_recipe(value: str) -> tuple[str, list[str]]:
    """"NAME=DIR,DIR" -> (NAME, [DIR, DIR]); a usage error naming the flag value otherwise."""
    name, sep, dirs = value.partition("=")
    folders = [d for d in dirs.split(",") if d]
    if not sep or not name.strip() or not folders:
        raise app.UsageError(f"--recipe={value!r}: expected NAME=DIR[,DIR...]")
    return name.strip(), folders


def main(argv):
    del argv
    recipes = {}
    for value in FLAGS.recipe:
        name, folders = parse_recipe(value)
        if name in recipes:
            raise app.UsageError(f"--recipe {name!r} is given twice; put all its runs in one --recipe")
        recipes[name] = [seed_summary.read_report(folder) for folder in folders]
    table = seed_summary.markdown_table(recipes, FLAGS.task)
    print(table, end="")
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(table)


if __name__ == "__main__":
    app.run(main)
