r"""Frozen-embedding evaluation: linear probe (EVAR) and kNN (X-ARES) on one or more tasks.

    python -m audiojepa.evaluate --encoder=/tmp/audiojepa_runlocal --task=embedded --output=/tmp/eval
    python -m audiojepa.evaluate --encoder=/ckpt/m2d/export --task=/data/tasks/esc50 --task=tfds:speech_commands \
        --output=/ckpt/m2d/eval

`--encoder` is an exported encoder, a training workdir (latest checkpoint), `logmel` (the log-mel
baseline) or `random:<config>` (that config's encoder at random init). With `--baselines` (the
default) the log-mel baseline and the same architecture at random init are evaluated too, so the
report shows the floor. Writes OUTPUT/results.json (`{task: {"linear": {"mean", "ci95", "metric"},
"knn": {"mean", "metric"}}}` for --encoder), all_results.json, results.md and one PNG per task.
"""

from __future__ import annotations

from audiojepa import host_memory

if __name__ == "__main__":  # glibc reads GLIBC_TUNABLES only at start-up: re-execute before the heavy imports
    host_memory.reexec_with_hugepage_malloc()

import logging  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from tqdm import tqdm  # noqa: E402

from audiojepa.data import audio_io  # noqa: E402
from audiojepa.evaluation import embedders, probes, report, tasks  # noqa: E402

flags.DEFINE_string("encoder", None, "Exported encoder, training workdir, 'logmel' or 'random:<config>'.")
flags.DEFINE_multi_string("task", None, "Task folder (labels.csv), shard set with labels, 'embedded', or 'tfds:NAME'.")
flags.DEFINE_string("output", None, "Output folder for the report.")
flags.DEFINE_bool("baselines", True, "Also evaluate the log-mel baseline and the encoder at random init.")
flags.DEFINE_list("seeds", ["42", "43", "44"], "Linear-probe seeds.")
flags.DEFINE_integer("batch_size", 32, "Clips per embedding batch.")
flags.DEFINE_float("lr", probes.DEFAULT_LR, "Linear-probe Adam learning rate (EVAR runs M2D at 3e-5; see "
                   "audiojepa/evaluation/probes.py for why the default is 1e-3). Recorded in results.json.")
FLAGS = flags.FLAGS


# Decoded clips held at once while embedding, beyond one batch per length: bounds memory on large tasks
# (FSD50K decoded whole would be ~25 GB of float32 at 16 kHz).
MAX_BUFFERED_CLIPS = 2048


def embed_task(embedder, task: tasks.Task, *, batch_size: int = 32,
               max_buffered_clips: int = MAX_BUFFERED_CLIPS) -> tuple[np.ndarray, np.ndarray]:
    """Clip embeddings [n_kept, dim] of every clip of `task`, and the indices of the clips kept.

    Clips are batched by length (no padding: padding would change the time mean), in one streaming pass:
    a length's batch is embedded when it holds `batch_size` clips, and when more than `max_buffered_clips`
    are waiting, the fullest waiting batch goes early. Embeddings do not depend on batch composition. A clip
    that fails to load is skipped, counted in `task.skipped` (once) and left out of scoring, never given a
    fake value.
    """
    waiting: dict[int, list[tuple[int, np.ndarray]]] = {}  # length -> [(clip index, waveform)]
    out: dict[int, np.ndarray] = {}
    num_waiting = 0

    def embed(length: int) -> None:
        nonlocal num_waiting
        batch = waiting.pop(length)
        num_waiting -= len(batch)
        emb = embedder.embed_batch(np.stack([w for _, w in batch]))
        out.update(zip((i for i, _ in batch), np.asarray(emb, np.float32)))

    for i in tqdm(range(len(task.clip_ids)), desc=f"{task.name}: embedding ({embedder.name})", unit="clip"):
        try:
            waveform = task.load_audio(i, embedder.sample_rate)
        except audio_io.BadAudioError as e:
            entry = {"path": task.clip_ids[i], "reason": e.reason}
            if entry not in task.skipped:  # once per clip, however many embedders or evaluations read it
                task.skipped.append(entry)
            continue
        waiting.setdefault(waveform.shape[0], []).append((i, waveform))
        num_waiting += 1
        if len(waiting[waveform.shape[0]]) == batch_size:
            embed(waveform.shape[0])
        elif num_waiting > max_buffered_clips:
            embed(max(waiting, key=lambda length: len(waiting[length])))
    for length in sorted(waiting):  # the partial batches left
        embed(length)
    kept = np.array(sorted(out), dtype=np.int64)
    if not len(kept):
        raise ValueError(f"{task.name}: no clip could be loaded ({len(task.skipped)} skipped)")
    return np.stack([out[i] for i in kept]), kept


def evaluate_embedder(embedder, task: tasks.Task, *, seeds=(42, 43, 44), batch_size: int = 32,
                      lr: float = probes.DEFAULT_LR) -> dict:
    embeddings, kept = embed_task(embedder, task, batch_size=batch_size)
    labels = task.label_array()[kept]
    return probes.evaluate_task(embeddings, labels, np.asarray(task.splits)[kept], multilabel=task.multilabel,
                                num_classes=len(task.classes), seeds=tuple(seeds), lr=lr)


def run(encoder_spec: str, task_specs: list[str], output_dir: str, *, baselines: bool = True,
        seeds=(42, 43, 44), batch_size: int = 32, lr: float = probes.DEFAULT_LR) -> dict:
    """Evaluates `encoder_spec` (and the floors) on every task; returns {encoder: {task: result}}."""
    main = embedders.make_embedder(encoder_spec)
    candidates = [main]
    if baselines and encoder_spec != "logmel":
        if isinstance(main, embedders.EncoderEmbedder):
            enc = main.encoder
            candidates.append(embedders.LogMelEmbedder(enc.frontend, enc.norm_stats))
            random_init = embedders.encoder_lib.AudioEncoder(
                enc.method_name, enc.model_config, enc.input_shape, enc.frontend, enc.norm_stats,
                _random_encoder_params(enc))
            candidates.append(embedders.EncoderEmbedder(random_init, name="random init"))
    results: dict[str, dict] = {c.name: {} for c in candidates}
    skipped = {}
    specs_by_name: dict[str, str] = {}
    loaded = []
    for spec in task_specs:  # all loaded and checked before the first (long) evaluation
        task = tasks.load_task(spec, sample_rate=main.sample_rate)
        if task.name in specs_by_name:
            raise ValueError(f"--task={spec} and --task={specs_by_name[task.name]} are both named {task.name!r}; "
                             "results are keyed by task name: rename one folder")
        specs_by_name[task.name] = spec
        loaded.append(task)
    for task in loaded:
        for embedder in candidates:
            results[embedder.name][task.name] = evaluate_embedder(embedder, task, seeds=seeds, batch_size=batch_size,
                                                                  lr=lr)
        skipped[task.name] = task.skipped
        if task.skipped:
            logging.warning("%s: %d clips skipped (see all_results.json): %s", task.name, len(task.skipped),
                            sorted({s["reason"] for s in task.skipped}))
    table = report.write_report(output_dir, main.name, results, extra={"skipped": skipped})
    print(table, flush=True)
    return results


def _random_encoder_params(enc) -> dict:
    import jax

    from audiojepa import methods

    return methods.random_encoder_params(enc.method, jax.random.key(0))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's restore chatter
    run(FLAGS.encoder, FLAGS.task, FLAGS.output, baselines=FLAGS.baselines, seeds=[int(s) for s in FLAGS.seeds],
        batch_size=FLAGS.batch_size, lr=FLAGS.lr)
    print(f"report: {os.path.join(FLAGS.output, 'results.md')}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["encoder", "task", "output"])
    app.run(main)
