r"""Frozen-embedding evaluation: linear probe (EVAR) and kNN (X-ARES) on one or more tasks.

    python -m audiojepa.evaluate --encoder=/tmp/audiojepa_runlocal --task=embedded --output=/tmp/eval
    python -m audiojepa.evaluate --encoder=/ckpt/m2d/export --task=/data/tasks/esc50 --task=tfds:speech_commands \
        --output=/ckpt/m2d/eval
    python -m audiojepa.evaluate --protocol=evar --encoder=/ckpt/m2d/export --task=/data/tasks/esc50 --output=/tmp/e
    python -m audiojepa.evaluate --layer=all --encoder=/tmp/audiojepa_runlocal --task=embedded --output=/tmp/layers

`--protocol=evar|matpac|xares` probes as that benchmark does (M2D and Riou et al.: EVAR; MATPAC: its
paper's probe; Audio-JEPA: X-ARES): learning rate, probe minibatch, epochs, model selection (best validation
metric or loss), head, seeds, per-task crop length (`unit_sec`) and which probes run; the values and their
sources are in audiojepa/evaluation/protocols.py. Without it the default protocol is today's (EVAR's probe
at lr 1e-3, plus kNN). `--lr`, `--seeds`, `--probe_batch_size` and `--unit_sec` override the protocol.

`--encoder` is an exported encoder, a training workdir (latest checkpoint), `logmel` (the log-mel
baseline) or `random:<config>` (that config's encoder at random init). With `--baselines` (the
default) the log-mel baseline and the same architecture at random init are evaluated too, so the
report shows the floors; every report also gives each task's majority-class score (always answering the most
frequent training label: `evaluation.tasks.majority_class`), the floor of a task whose test split is unbalanced.
Writes OUTPUT/results.json (`{task: {"linear": {"mean", "ci95", "metric", "lr", "validation", ...}, "knn":
{"mean", "metric", "test_interval95" (Wilson's, over the test clips)} or null, "protocol": {every resolved value,
the task's unit_sec}}}` for --encoder), all_results.json, results.md and one PNG per task. The JSON files are
strict JSON: a one-seed run's `ci95` and `std` are null.

`--steps=all` (every kept checkpoint) or `--steps=N,M` evaluates a training workdir at several checkpoints into
one report: rows "WORKDIR @ step N", results.json with the last step on top and every step under
"steps": {"N": {"linear", "knn", "step"}}, a table of the scores by step in results.md and scores_by_step.png
(score against step, per task and probe). The floors are evaluated once. The checkpoints are loaded one at a
time and share the first one's compiled encoder:

    python -m audiojepa.evaluate --encoder=/ckpt/m2d --steps=all --task=/data/tasks/esc50 --output=/ckpt/m2d/by_step

Embeddings are cached (audiojepa/evaluation/embedding_cache.py) in OUTPUT/embedding_cache, or in
`--embedding_cache=DIR` (shared by several reports), keyed by the encoder's params, the task's clips and the crop:
re-running with another probe setting (`--lr`, `--seeds`, `--protocol`, ...) re-embeds nothing, and a new
checkpoint misses. `--embedding_cache=none` embeds every time.

`--layer` picks the encoder layer that embeds (audiojepa/models/encoder_layers.py), for the encoder and its
random init: unset, the final output (as before the flag); an integer k (0-based, -1 the last block), block k's
output (intermediate blocks without the final norm; the last block is the final output), in rows
"NAME (layer k)" whose results record "layer": k; `all`, every layer from one forward pass per batch of clips,
one row per (encoder, layer) and per (random init, layer), results.json keeping each task's last-layer (= final
output) result on top and every layer's under "layers": {"k": {"linear", "knn", "layer"}}, and results.md naming
each task's best layer. The log-mel baseline has no layers: one row. all_results.json records "layer".

A task folder with `events.csv` (and `splits.csv`) is a sound event detection task, as HEAR's DCASE 2016 task 2
(audiojepa/evaluation/sed.py): each encoder's frame features (the log-mel baseline's: log-mel averaged over 160 ms)
get a frame-wise linear probe, decoded into events and scored with HEAR's event-based onset F-measure (200 ms
collar, micro average): metric "onset_fms", with the frame hop, in results.json ("sed") and results.md. No kNN.

Before anything is embedded, `--output` must be (or become) a writable folder, and every task must have two
or more classes, a non-empty train and test split (or two folds) and no test class missing from training;
errors name the path or the task.
"""

from __future__ import annotations

from audiojepa.runtime import host_memory

if __name__ == "__main__":  # glibc reads GLIBC_TUNABLES only at start-up: re-execute before the heavy imports
    host_memory.reexec_with_hugepage_malloc()

import copy  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from audiojepa.evaluation import (  # noqa: E402
    embedders,
    embedding_cache,
    probes,
    protocols,
    report,
    sed,
    tasks,
)
from audiojepa.models import encoder_layers  # noqa: E402


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """The command line's flags, defined on `flag_values` (a fresh FlagValues in tests)."""
    flags.DEFINE_string("encoder", None, "Exported encoder, training workdir, 'logmel' or 'random:<config>'.",
                        flag_values=flag_values)
    flags.DEFINE_multi_string("task", None, "Task folder (labels.csv), shard set with labels, 'embedded', "
                              "'tfds:NAME', or a sound event detection folder (events.csv + splits.csv).",
                              flag_values=flag_values)
    flags.DEFINE_string("output", None, "Output folder for the report.", flag_values=flag_values)
    flags.DEFINE_bool("baselines", True, "Also evaluate the log-mel baseline and the encoder at random init.",
                      flag_values=flag_values)
    flags.DEFINE_enum("protocol", None, list(protocols.NAMES),
                      "Probe protocol: lr, probe batch, epochs, selection rule, head, seeds, crop length and probes "
                      "as a benchmark sets them: 'evar' (M2D, Riou et al.), 'matpac', 'xares' (Audio-JEPA); "
                      "unset = 'default' (EVAR's probe at lr 1e-3, plus kNN). Values and sources: "
                      "audiojepa/evaluation/protocols.py. --lr, --seeds, --probe_batch_size and --unit_sec, when "
                      "given, override the protocol's value; results.json records the result.",
                      flag_values=flag_values)
    flags.DEFINE_list("seeds", None, "Linear-probe seeds (overrides the protocol's; default 42,43,44, matpac "
                      "42..46, xares 42).", flag_values=flag_values)
    flags.DEFINE_float("lr", None, "Linear-probe Adam learning rate (overrides the protocol's: default 1e-3, see "
                       "audiojepa/evaluation/probes.py for why; evar 3e-5; matpac 1e-4; xares 1e-3).",
                       flag_values=flag_values)
    flags.DEFINE_integer("probe_batch_size", None, "Linear-probe minibatch in clips (overrides the protocol's: "
                         "min(200, n_train) for default and evar, 128 matpac, 32 xares).", flag_values=flag_values)
    flags.DEFINE_float("unit_sec", None, "Crop or zero-pad every clip to this many seconds before embedding, as "
                       "EVAR does (random start for train/valid clips, start 0 for test); overrides the protocol's "
                       "(evar: each task's; others: whole clips).", flag_values=flag_values)
    flags.DEFINE_string("layer", None, "Encoder layer that embeds: an integer (0-based block, -1 the last; "
                        "intermediate blocks unnormed, the last = the final output) or 'all' (every layer, one row "
                        "each); unset = the final output. Applies to the encoder and its random init.",
                        flag_values=flag_values)
    flags.DEFINE_string("steps", None, "Checkpoints of a training workdir --encoder to evaluate into one report: "
                        "'all' (every kept one) or 'N,M,...' (default: the latest).", flag_values=flag_values)
    flags.DEFINE_string("embedding_cache", None, "Folder of cached embeddings (default OUTPUT/embedding_cache); "
                        "'none' embeds every time.", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 32, "Clips per embedding batch (does not change the embeddings; the probe's "
                         "minibatch is --probe_batch_size).", flag_values=flag_values)


def protocol_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> protocols.Protocol:
    """--protocol with the explicit --lr / --seeds / --probe_batch_size / --unit_sec replacing its values."""
    overrides = {name: flag_values[name].value for name in protocols.OVERRIDABLE if flag_values[name].value is not None}
    if "seeds" in overrides:
        overrides["seeds"] = [int(s) for s in overrides["seeds"]]
    return protocols.resolve(flag_values["protocol"].value, **overrides)


def parse_layer(value: str | None) -> int | str | None:
    """--layer's value -> None (unset or empty), an int, or encoder_layers.ALL; ValueError naming the flag."""
    if value is None or value == "":
        return None
    if value == encoder_layers.ALL:
        return value
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--layer={value!r}: give an integer layer (0-based, negative from the end) or "
                         f"{encoder_layers.ALL!r}") from None


def embed_clips(embedder, task: tasks.Task, *, unit_sec: float | None, crop_seed: int = 0, batch_size: int = 32
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict]:
    """Embeddings of `task`'s clips, whole or cut to `unit_sec` seconds as EVAR cuts them ([n, depth, dim]
    instead of [n, dim] below for an embedder of every layer).

    With `unit_sec`, a clip of more than `int(sample_rate * unit_sec)` samples (EVAR's rounding) is cropped
    at a random start (train and valid clips; `np.random.default_rng((crop_seed, clip index))`, one draw
    per clip, since EVAR embeds once and caches) or from its start (test clips), and a shorter one is
    zero-padded at the end. In a fold task every clip is training data for some folds and test data for
    one, so cropped clips are embedded twice and the start-0 crops go to `test_embeddings`.

    Returns:
      (embeddings [n_kept, dim], test_embeddings [n_kept, dim] or None when the test rows are already in
       `embeddings`, kept clip indices [n_kept], {"unit_samples", "clips_cropped", "clips_padded"}).
    """
    if unit_sec is None:
        emb, kept = embedders.embed_task(embedder, task, batch_size=batch_size)
        return emb, None, kept, {}
    unit_samples = int(embedder.sample_rate * unit_sec)
    splits = np.asarray(task.splits)
    cropped, padded = set(), set()

    def prepare(index: int, waveform: np.ndarray, random_crop: bool) -> np.ndarray:
        (cropped if len(waveform) > unit_samples else padded if len(waveform) < unit_samples else set()).add(index)
        start = embedders.evar_crop_start(len(waveform), unit_samples, random_crop=random_crop,
                                          rng=np.random.default_rng((crop_seed, index)))
        return embedders.fit_to_unit(waveform, unit_samples, start=start)

    emb, kept = embedders.embed_task(
        embedder, task, batch_size=batch_size,
        prepare=lambda i, w: prepare(i, w, random_crop=task.is_folds or splits[i] != "test"))
    info = {"unit_samples": unit_samples, "clips_cropped": len(cropped), "clips_padded": len(padded)}
    if not (task.is_folds and cropped):
        return emb, None, kept, info
    again = sorted(cropped)
    test_emb, test_kept = embedders.embed_task(embedder, task, batch_size=batch_size, clip_indices=again,
                                               prepare=lambda i, w: prepare(i, w, random_crop=False))
    if not np.array_equal(test_kept, again):
        raise ValueError(f"{task.name}: clips {sorted(set(again) - set(test_kept.tolist()))[:5]} loaded once and "
                         "failed the second time")
    test_embeddings = emb.copy()
    test_embeddings[np.searchsorted(kept, test_kept)] = test_emb
    return emb, test_embeddings, kept, info


def cached_embed_clips(embedder, task: tasks.Task, *, unit_sec: float | None, crop_seed: int, batch_size: int,
                       cache_dir: str | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, dict]:
    """`embed_clips`, through the embedding cache in `cache_dir` (None: no cache). A hit also restores the clips
    that failed to load into `task.skipped`, as embedding them again would."""
    if cache_dir is None:
        return embed_clips(embedder, task, unit_sec=unit_sec, crop_seed=crop_seed, batch_size=batch_size)
    key, parts = embedding_cache.cache_key(embedder, task, unit_sec=unit_sec, crop_seed=crop_seed)
    path = embedding_cache.entry_path(cache_dir, task.name, embedder.name, key)
    hit = embedding_cache.load(path)
    if hit is not None:
        emb, test_emb, kept, meta = hit
        for entry in meta["skipped"]:
            if entry not in task.skipped:
                task.skipped.append(entry)
        logging.info("%s, %s: %d embeddings from the cache (%s)", task.name, embedder.name, len(kept), path)
        return emb, test_emb, kept, meta["crop"]
    emb, test_emb, kept, crop = embed_clips(embedder, task, unit_sec=unit_sec, crop_seed=crop_seed,
                                            batch_size=batch_size)
    failed = {task.clip_ids[i] for i in sorted(set(range(len(task.clip_ids))) - set(kept.tolist()))}
    embedding_cache.save(path, emb, test_emb, kept, {"crop": crop, "key": parts,
                                                     "skipped": [s for s in task.skipped if s["path"] in failed]})
    return emb, test_emb, kept, crop


def evaluate_embedder(embedder, task: tasks.Task, protocol: protocols.Protocol | None = None, *,
                      batch_size: int = 32, cache_dir: str | None = None) -> dict | list[dict]:
    """Probe scores of one embedder on one task under `protocol` (None: the default), with the protocol's
    resolved values (and the task's unit_sec) under "protocol", and "layer" for an encoder at a chosen layer.
    `cache_dir`: the embedding cache (cached_embed_clips), None for none.

    An embedder of every layer (layer "all") is embedded once and probed per layer: a list of results, layer k's
    at index k.
    """
    protocol = protocol or protocols.resolve(None)
    unit_sec, unit_sec_source = protocols.task_unit_sec(protocol, task.name, task.unit_sec)
    embeddings, test_embeddings, kept, crop = cached_embed_clips(
        embedder, task, unit_sec=unit_sec, crop_seed=protocol.crop_seed, batch_size=batch_size, cache_dir=cache_dir)
    run_knn = "knn" in protocol.probes and (protocol.knn_on_multilabel or not task.multilabel)
    record = {**protocol.as_record(), "unit_sec_policy": protocol.unit_sec, "unit_sec": unit_sec,
              "unit_sec_source": unit_sec_source, **crop}
    if "knn" in protocol.probes and not run_knn:
        record["knn_skipped"] = f"multi-label task: protocol {protocol.name} runs kNN on single-label tasks only"

    def probe(train_rows: np.ndarray, test_rows: np.ndarray | None, layer: int | None) -> dict:
        try:
            result = probes.evaluate_task(
                train_rows, task.label_array()[kept], np.asarray(task.splits)[kept], multilabel=task.multilabel,
                num_classes=len(task.classes), seeds=protocol.seeds, lr=protocol.lr, k=protocol.knn_k,
                temperature=protocol.knn_temperature, valid_fraction=protocol.valid_fraction,
                run_linear="linear" in protocol.probes, run_knn=run_knn, linear_options=protocol.linear_options(),
                test_embeddings=test_rows)
        except ValueError as e:  # e.g. clips that failed to embed emptied a split: say which task and encoder
            at_layer = "" if layer is None else f" at layer {layer}"
            raise ValueError(f"task {task.name!r}, encoder {embedder.name!r}{at_layer}: {e}") from e
        result["protocol"] = record
        if layer is not None:
            result["layer"] = layer
        return result

    layer = getattr(embedder, "layer", None)
    if layer != encoder_layers.ALL:
        return probe(embeddings, test_embeddings, layer)
    return [probe(embeddings[:, k], None if test_embeddings is None else test_embeddings[:, k], k)
            for k in range(embeddings.shape[1])]


def run(encoder_spec: str, task_specs: list[str], output_dir: str, *, baselines: bool = True,
        protocol: protocols.Protocol | str | None = None, seeds=None, batch_size: int = 32, lr: float | None = None,
        probe_batch_size: int | None = None, unit_sec: float | None = None, layer: int | str | None = None,
        embedding_cache_dir: str | None = "", steps: str | None = None) -> dict:
    """Evaluates `encoder_spec` (and the floors) on every task; returns {row name: {task: result}}.

    `protocol` is a Protocol or a name (None: "default"); `seeds`, `lr`, `probe_batch_size` and `unit_sec`,
    when not None, override a named protocol's values. `batch_size` is the embedding batch. `layer` (None, an
    int or "all"; module docstring) is the layer of the encoder and of its random init that embeds. The output
    folder and every task's splits are checked before the first embedding (ValueError naming --output or the
    task). `embedding_cache_dir`: "" (default) OUTPUT/embedding_cache, a folder, or None / "none" for no cache.
    `steps`: None (the workdir's latest checkpoint, or an export), "all" or "N,M,..." (checkpoint_steps).
    """
    prepare_output_dir(output_dir)
    if embedding_cache_dir == "":
        embedding_cache_dir = os.path.join(output_dir, "embedding_cache")
    elif embedding_cache_dir == embedding_cache.DISABLED:
        embedding_cache_dir = None
    if not isinstance(protocol, protocols.Protocol):
        overrides = {"seeds": seeds, "lr": lr, "probe_batch_size": probe_batch_size, "unit_sec": unit_sec}
        protocol = protocols.resolve(protocol, **{k: v for k, v in overrides.items() if v is not None})
    step_list = checkpoint_steps(encoder_spec, steps) if steps else None
    if step_list and layer == encoder_layers.ALL:
        raise ValueError(f"--steps={steps} with --layer=all: pick one layer (or none) to compare checkpoints")
    if step_list:
        step_candidates, main = _step_candidates(encoder_spec, step_list, layer)
        layer = main.layer  # checked by load_encoder; an int layer as its index 0 … depth-1
    else:
        main = embedders.make_embedder(encoder_spec)
    if layer is not None and not step_list:
        if not isinstance(main, embedders.EncoderEmbedder):
            raise ValueError(f"--layer={layer}: --encoder={encoder_spec} has no layers; leave --layer out")
        try:
            main.encoder = main.encoder.with_layer(layer)
        except ValueError as e:
            raise ValueError(f"--layer={layer}, --encoder={encoder_spec}: {e}") from None
        layer = main.layer  # an int layer as its index 0 … depth-1
        if isinstance(layer, int):
            main.name = report.layer_row(main.name, layer)
    # (row name, make embedder): built when evaluated, so several checkpoints are never in memory at once.
    candidates = step_candidates if step_list else [(main.name, lambda: main)]
    if baselines and encoder_spec != "logmel":
        if isinstance(main, embedders.EncoderEmbedder):
            enc = main.encoder
            logmel = embedders.LogMelEmbedder(enc.frontend, enc.norm_stats)
            candidates.append((logmel.name, lambda: logmel))
            random_init = embedders.encoder_lib.AudioEncoder(
                enc.method_name, enc.model_config, enc.input_shape, enc.frontend, enc.norm_stats,
                _random_encoder_params(enc), layer=layer)
            name = report.layer_row("random init", layer) if isinstance(layer, int) else "random init"
            random_embedder = embedders.EncoderEmbedder(random_init, name=name)
            candidates.append((name, lambda: random_embedder))
    results: dict[str, dict] = {}
    skipped = {}
    specs_by_name: dict[str, str] = {}
    loaded = []
    for spec in task_specs:  # all loaded and checked before the first (long) evaluation
        if sed.is_sed_task(spec):  # events.csv: frame-level sound event detection (evaluation/sed.py)
            if layer == encoder_layers.ALL:
                raise ValueError(f"--task={spec} is an SED task, which takes one layer's frames; leave out --layer=all")
            task = sed.load_sed_task(spec, sample_rate=main.sample_rate)
        else:
            task = tasks.load_task(spec, sample_rate=main.sample_rate)
        if task.name in specs_by_name:
            raise ValueError(f"--task={spec} and --task={specs_by_name[task.name]} are both named {task.name!r}; "
                             "results are keyed by task name: rename one folder")
        if isinstance(task, sed.SedTask):  # its splits and events were checked as it loaded
            specs_by_name[task.name] = spec
            loaded.append(task)
            continue
        protocols.task_unit_sec(protocol, task.name, task.unit_sec)  # a missing crop length fails now
        try:  # an empty test split or a test class never trained on fails now, not after embedding
            probes.check_splits(task.label_array(), task.splits, multilabel=task.multilabel,
                                num_classes=len(task.classes))
        except ValueError as e:
            raise ValueError(f"task {task.name!r} (--task={spec}): {e}") from e
        specs_by_name[task.name] = spec
        loaded.append(task)
    for _, make in candidates:
        embedder = make()
        for task in loaded:
            if isinstance(task, sed.SedTask):
                result = sed.evaluate_embedder(embedder, task, protocol)
            else:
                result = evaluate_embedder(embedder, task, protocol, batch_size=batch_size,
                                           cache_dir=embedding_cache_dir)
            if isinstance(result, list):  # every layer: one row each
                for k, layer_result in enumerate(result):
                    results.setdefault(report.layer_row(embedder.name, k), {})[task.name] = layer_result
            else:
                results.setdefault(embedder.name, {})[task.name] = result
        del embedder
    majority = {task.name: tasks.majority_class(task) for task in loaded if not isinstance(task, sed.SedTask)}
    for task in loaded:
        skipped[task.name] = task.skipped
        if task.skipped:
            logging.warning("%s: %d clips skipped (see all_results.json): %s", task.name, len(task.skipped),
                            sorted({s["reason"] for s in task.skipped}))
    main_rows = ([report.layer_row(main.name, k) for k in range(main.encoder.num_layers)]
                 if layer == encoder_layers.ALL else None)
    step_rows = [(s, report.step_row(encoder_spec, s)) for s in step_list] if step_list else None
    main_name = main_rows[-1] if main_rows else step_rows[-1][1] if step_rows else main.name
    table = report.write_report(output_dir, main_name, results,
                                extra={"skipped": skipped, "protocol": protocol.as_record(), "layer": layer,
                                       "steps": step_list, "majority_class": majority},
                                protocol=protocol, main_rows=main_rows, step_rows=step_rows)
    print(table, flush=True)
    return results


def checkpoint_steps(workdir: str, steps: str) -> list[int]:
    """--steps of training workdir `workdir`: "all" (every kept checkpoint) or "N,M,..." -> ascending steps.
    Errors name --steps and list the steps the workdir holds."""
    from audiojepa.runtime import checkpointing

    if not os.path.isdir(checkpointing.checkpoint_dir(workdir)):
        raise ValueError(f"--steps={steps}: --encoder={workdir} is not a training workdir (no checkpoints/); "
                         "--steps picks checkpoints of a run")
    manager = checkpointing.make_manager(workdir, every_steps=1, read_only=True)
    try:
        kept = sorted(int(s) for s in manager.all_steps())
    finally:
        manager.close()
    if not kept:
        raise ValueError(f"--steps={steps}: {workdir} holds no checkpoint")
    if steps.strip() == "all":
        return kept
    try:
        wanted = sorted({int(s) for s in steps.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"--steps={steps!r}: give 'all' or steps as integers, e.g. --steps=1000,2000") from None
    missing = [s for s in wanted if s not in kept]
    if missing or not wanted:
        raise ValueError(f"--steps={steps}: {workdir} holds no checkpoint at step(s) {missing}; kept: {kept}")
    return wanted


def _step_candidates(encoder_spec: str, steps: list[int], layer) -> tuple[list, embedders.EncoderEmbedder]:
    """One (row name, make embedder) per step, loaded when evaluated; every step's encoder is a copy of the
    first's with its own params (the compiled functions are shared). Also returns the first step's embedder."""
    from audiojepa.adapters import encoder as encoder_lib

    first = encoder_lib.load_encoder(encoder_spec, step=steps[0], layer=layer)

    def make(step):
        def load():
            enc = first if step == steps[0] else copy.copy(first)
            if step != steps[0]:
                enc.params = encoder_lib.load_encoder(encoder_spec, step=step).params
            return embedders.EncoderEmbedder(enc, name=report.step_row(encoder_spec, step))
        return load
    return ([(report.step_row(encoder_spec, s), make(s)) for s in steps],
            embedders.EncoderEmbedder(first, name=report.step_row(encoder_spec, steps[0])))


def prepare_output_dir(output_dir: str) -> None:
    """Creates `output_dir` (the report folder) now, so that a path that cannot be a writable folder fails before
    hours of embedding and probing rather than when the report is written; errors name --output."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output={output_dir} is a file, not a folder: the report (results.json, results.md, "
                         "one PNG per task) needs a folder; pick another path")
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output={output_dir} cannot be made a folder: {e.strerror or e}") from None
    if not os.access(output_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--output={output_dir} is not writable by this user")


def _random_encoder_params(enc) -> dict:
    import jax

    from audiojepa import methods

    return methods.random_encoder_params(enc.method, jax.random.key(0))


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
    """The CLI on `flag_values` (define_flags'; the global flags when run as a program). Importing this module
    defines no flag, so it sits beside other tools' flags (e.g. tools/bench_train.py's --steps) in one process."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    missing = [name for name in ("encoder", "task", "output") if not flag_values[name].value]
    if missing:
        raise app.UsageError(f"missing {', '.join('--' + m for m in missing)}")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's restore chatter
    fv = flag_values
    run(fv.encoder, fv.task, fv.output, baselines=fv.baselines, protocol=protocol_from_flags(fv),
        batch_size=fv.batch_size, layer=parse_layer(fv.layer),
        embedding_cache_dir="" if fv.embedding_cache is None else fv.embedding_cache, steps=fv.steps)
    print(f"report: {os.path.join(fv.output, 'results.md')}")


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["encoder", "task", "output"])
    app.run(main)
