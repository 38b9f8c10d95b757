r"""EncodecMAE's self-training stage in one command: k-means of the stage-1 encoder, then training on it.

    python -m audiojepa.selftrain --config=configs/encodecmae.py:runlocal \
        --stage1_workdir=/tmp/encodecmae_runlocal --workdir=/tmp/encodecmae_selftrain

1. The stage-1 run's latest checkpoint is restored. The frozen *teacher* is its encoder, or, with
   `--teacher_workdir`, the encoder of another EncodecMAE run of any size (the paper's large model clusters
   the base self-trained model: `--teacher_workdir=/ckpt/encodecmae_base_st`); that run's config, read from
   its checkpoint, gives the teacher's architecture. The teacher runs without masking on `--num_clips`
   random training crops (EnCodec frames from the stage-1 run's EnCodec), and `--num_frames` of its
   last-layer frame features are drawn uniformly without replacement (shared/reference/encodecmae.md §1.13:
   10,000 frames of 10,000 random items).
2. k-means with `config.model.num_clusters` centroids (of the teacher's width) is fitted on them in JAX
   (audiojepa.ops.kmeans), with a progress line per iteration. The centroids, the stage-1 params and, from
   another run, the teacher's encoder params are written into the new workdir (`kmeans_centroids.npy`,
   `stage1_params.msgpack`, `teacher_params.msgpack`), with `selftrain.json`: the stage-1 and teacher runs
   (workdir, step; the teacher's size, stack_type, share_ffn, width) and the k-means fit.
3. Training continues in the new workdir for `config.self_training_steps` steps (150k) with
   `config.model.targets` = "codes+kmeans" (the k-means stream added with weight Σγ_q; the default) or
   "kmeans" (`--config.model.targets=kmeans`, the later code's k-means-only variant), the student
   starting from the stage-1 params (`config.model.teacher_*` describe the teacher; its config is saved
   with every checkpoint).

Re-running the same command resumes stage 2 (the k-means is not fitted again; a different
`--teacher_workdir` than the one recorded is an error).
"""

from __future__ import annotations

from audiojepa.runtime import host_memory

if __name__ == "__main__":  # glibc reads GLIBC_TUNABLES only at start-up: re-execute before the heavy imports
    host_memory.reexec_with_hugepage_malloc()

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from audiojepa import config_utils  # noqa: E402
from audiojepa.adapters import encoder as encoder_lib  # noqa: E402
from audiojepa.data import pipeline, resolve  # noqa: E402
from audiojepa.methods import encodecmae  # noqa: E402
from audiojepa.ops import kmeans  # noqa: E402
from audiojepa.training import process  # noqa: E402

CENTROIDS_FILE = "kmeans_centroids.npy"
STAGE1_PARAMS_FILE = "stage1_params.msgpack"
TEACHER_PARAMS_FILE = "teacher_params.msgpack"  # only with --teacher_workdir
SUMMARY_FILE = "selftrain.json"


def define_flags() -> None:
    """The command-line flags, defined only when this module is the program (`python -m
    audiojepa.selftrain`), so that importing its functions never claims absl's global --config."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/encodecmae.py[:arg]).", lock_config=False)
    flags.DEFINE_string("stage1_workdir", None, "Workdir of the stage-1 EncodecMAE run.")
    flags.DEFINE_string("workdir", None, "Workdir of the self-training run.")
    flags.DEFINE_string("teacher_workdir", None, "Workdir of the EncodecMAE run whose encoder labels the frames "
                        "(the k-means teacher), any size; default: --stage1_workdir. The paper's large model "
                        "takes the base self-trained run.")
    flags.DEFINE_integer("num_frames", 10_000, "Teacher frames the k-means is fitted on, drawn from all frames of "
                         "--num_clips clips.")
    flags.DEFINE_integer("num_clips", 10_000, "Random training crops whose teacher frames are pooled.")
    flags.DEFINE_integer("kmeans_iters", 300, "Maximum Lloyd iterations (sklearn's default).")
    flags.mark_flags_as_required(["config", "stage1_workdir", "workdir"])


def sample_frames(batches: Iterable[np.ndarray], num_frames: int, seed: int) -> np.ndarray:
    """A uniform random sample of `num_frames` frames, without replacement, from all frames of `batches`
    ([clips, frames, D] each; all frames when they hold fewer), in bounded memory ([num_frames, D]).

    Reservoir sampling (Vitter's algorithm R) over the frames in order: frame t >= num_frames replaces slot
    j ~ U{0 … t} when j < num_frames. Each batch's draws are made at once; where two frames of a batch hit
    the same slot the later one stays, as it would one frame at a time.
    """
    rng = np.random.default_rng(seed)
    sample, seen = None, 0
    for batch in batches:
        frames = np.asarray(batch, np.float32).reshape(-1, np.shape(batch)[-1])
        if sample is None:
            sample = np.empty((num_frames, frames.shape[1]), np.float32)
        fill = max(0, min(num_frames - seen, len(frames)))
        sample[seen:seen + fill] = frames[:fill]
        rest = frames[fill:]
        if len(rest):
            index = seen + fill + np.arange(len(rest))  # global frame indices t
            slots = rng.integers(0, index + 1)
            hit = np.flatnonzero(slots < num_frames)
            if len(hit):
                last_first = hit[::-1]  # keep the last frame to hit each slot
                _, first = np.unique(slots[last_first], return_index=True)
                chosen = last_first[first]
                sample[slots[chosen]] = rest[chosen]
        seen += len(frames)
    if sample is None:
        raise ValueError("no batches to sample teacher frames from.")
    return sample[:min(seen, num_frames)]


def collect_teacher_features(method, teacher_params, spec, *, num_frames: int, num_clips: int, batch_size: int,
                             seed: int, encodec_method=None) -> np.ndarray:
    """[num_frames, D] float32: last-layer features of the teacher encoder, drawn uniformly without
    replacement from all frames of `num_clips` random training crops (fewer when the shards hold fewer
    clips), as the reference pools 10,000 random items' activations and then draws 10,000 frames
    (shared/reference/encodecmae.md §1.13).

    `method` is the teacher run's EncodecMAE (its `cluster_features` on `teacher_params`; D its width);
    `encodec_method` the one whose frozen EnCodec makes the frames from waveforms (default `method`): the
    student's, so that the frames clustered are those the student's steps label."""
    encodec_method = method if encodec_method is None else encodec_method
    if spec.num_clips > 0 and num_clips > spec.num_clips:
        logging.info("--num_clips=%d but the shards hold %d clips: using each once", num_clips, spec.num_clips)
        num_clips = spec.num_clips
    num_batches = max(1, -(-num_clips // batch_size))
    ds = pipeline.make_dataset(spec, batch_size=batch_size, seed=seed, device_frontend=True)
    frames_fn = jax.jit(lambda params, encodec_params, waveform: method.cluster_features(
        params, encodec_method.encodec_features(encodec_params, waveform)))
    precomputed_fn = jax.jit(method.cluster_features)  # shards of precomputed EnCodec features
    encodec_params = jax.tree.map(np.asarray, encodec_method.encodec_params)

    def teacher_batches():
        start = time.time()
        for i in range(num_batches):
            batch = ds[i]
            if "features" in batch:
                out = np.asarray(precomputed_fn(teacher_params, batch["features"]))
            else:
                out = np.asarray(frames_fn(teacher_params, encodec_params, batch["waveform"]))
            if i % 10 == 0 or i == num_batches - 1:
                elapsed = time.time() - start
                logging.info("teacher features: batch %d / %d (%d clips), %.0f s, ETA %.0f s", i + 1,
                             num_batches, (i + 1) * batch_size, elapsed, elapsed / (i + 1) * (num_batches - i - 1))
            yield out

    features = sample_frames(teacher_batches(), num_frames, seed)
    if features.shape[0] < num_frames:
        logging.warning("the data gave %d frames, fewer than --num_frames=%d; fitting on all of them",
                        features.shape[0], num_frames)
    return features


def restore_run(workdir: str, flag: str):
    """(method, state) of the EncodecMAE run in `workdir` (its latest checkpoint); errors name `--{flag}`."""
    try:
        method, state, meta = encoder_lib.restore_train_state(workdir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--{flag}={workdir}: no checkpoint to restore ({error}); give the workdir of an "
                                "EncodecMAE training run that has written a checkpoint.") from error
    if meta["method"] != "encodecmae":
        raise ValueError(f"--{flag}={workdir} holds a {meta['method']!r} run; self-training needs an EncodecMAE run.")
    return method, state


def read_summary(workdir: str) -> dict | None:
    """`prepare`'s record in `workdir` (SUMMARY_FILE), or None (not prepared, or prepared before it existed)."""
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_atomically(path: str, write) -> None:
    """write(temporary path), then renamed to `path`: every process computes the same files and writes its own
    temporary."""
    tmp = f"{path}.tmp{jax.process_index()}"
    write(tmp)
    os.replace(tmp, path)


def _write_bytes(data: bytes):
    def write(path):
        with open(path, "wb") as f:
            f.write(data)
    return write


def _write_npy(array):
    def write(path):
        with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, array)
    return write


def prepare(config, stage1_workdir: str, workdir: str, *, num_frames: int, max_iter: int,
            num_clips: int = 10_000, teacher_workdir: str | None = None) -> tuple[str, str]:
    """Fits the k-means on the teacher (unless done) and returns (centroids path, stage-1 params path).

    The teacher is the stage-1 run's encoder, or `teacher_workdir`'s (another EncodecMAE run, any size; its
    encoder params go to TEACHER_PARAMS_FILE). SUMMARY_FILE records both runs and the fit (`read_summary`).
    """
    centroids_path = os.path.join(workdir, CENTROIDS_FILE)
    params_path = os.path.join(workdir, STAGE1_PARAMS_FILE)
    teacher_workdir = teacher_workdir or None
    if os.path.exists(centroids_path) and os.path.exists(params_path):
        summary = read_summary(workdir)
        recorded = summary["teacher"]["workdir"] if summary else os.path.abspath(stage1_workdir)
        wanted = os.path.abspath(teacher_workdir or stage1_workdir)
        if recorded != wanted:
            raise ValueError(f"--teacher_workdir={teacher_workdir}: {workdir} was prepared with the teacher "
                             f"{recorded}; give that one, or a new --workdir to fit the k-means on another teacher.")
        logging.info("k-means already fitted: %s", centroids_path)
        return centroids_path, params_path
    method, state = restore_run(stage1_workdir, "stage1_workdir")
    stage1_params = jax.device_get(state["params"])
    if teacher_workdir:
        teacher_method, teacher_state = restore_run(teacher_workdir, "teacher_workdir")
        teacher_params = {key: jax.device_get(teacher_state["params"][key]) for key in encodecmae.TEACHER_KEYS}
        if teacher_method.config.encodec_checkpoint != method.config.encodec_checkpoint:
            logging.warning("--teacher_workdir's run used encodec_checkpoint=%r, the stage-1 run %r: the teacher "
                            "is fed the stage-1 run's EnCodec frames", teacher_method.config.encodec_checkpoint,
                            method.config.encodec_checkpoint)
    else:
        teacher_method, teacher_state, teacher_params = method, state, stage1_params
    teacher_config = teacher_method.config  # the teacher run's own architecture (not its own teacher's)
    teacher = {"workdir": os.path.abspath(teacher_workdir or stage1_workdir), "step": int(teacher_state["step"]),
               "params": os.path.join(workdir, TEACHER_PARAMS_FILE) if teacher_workdir else "",
               "size": teacher_config.size, "stack_type": teacher_config.stack_type,
               "share_ffn": bool(teacher_config.share_ffn), "width": teacher_method.width}
    logging.info("k-means teacher: %s", teacher)
    spec = resolve.resolve_data_spec(config.data)
    features = collect_teacher_features(teacher_method, teacher_params, spec, num_frames=num_frames,
                                        num_clips=num_clips, batch_size=int(config.batch_size),
                                        seed=int(config.seed), encodec_method=method)
    k = int(config.model.num_clusters)
    logging.info("fitting %d-means on %d frames of %d dims", k, features.shape[0], features.shape[1])

    def progress(info):
        logging.info("k-means iteration %d: inertia %.5g, shift %.3g, %d empty clusters re-seeded",
                     info["iteration"], info["inertia"], info["shift"], info["num_empty"])

    centroids, inertia = kmeans.kmeans(jax.random.key(int(config.seed)), features, k, max_iter=max_iter,
                                       callback=progress)
    os.makedirs(workdir, exist_ok=True)
    _write_atomically(params_path, lambda tmp: encodecmae.save_params(tmp, stage1_params))
    if teacher["params"]:
        _write_atomically(teacher["params"], lambda tmp: encodecmae.save_params(tmp, teacher_params))
    summary = {"stage1": {"workdir": os.path.abspath(stage1_workdir), "step": int(state["step"])},
               "teacher": teacher,
               "kmeans": {"num_clusters": k, "num_frames": int(features.shape[0]), "dim": int(features.shape[1]),
                          "num_clips": int(num_clips), "inertia": float(inertia), "centroids": centroids_path}}
    _write_atomically(os.path.join(workdir, SUMMARY_FILE), _write_bytes(json.dumps(summary, indent=2).encode()))
    # Written last: its presence means "prepared".
    _write_atomically(centroids_path, _write_npy(centroids))
    logging.info("k-means done (inertia %.5g): %s", inertia, centroids_path)
    return centroids_path, params_path


def self_training_config(config, centroids_path: str, params_path: str, teacher: dict | None = None):
    """The stage-2 config: k-means targets (codes+kmeans unless the config asks for kmeans only), trained for
    `config.self_training_steps` steps (the reference's 150k; 0 or unset keeps `total_steps`).

    `teacher`: `read_summary(workdir)["teacher"]`; when it names a params file (a teacher from another run),
    config.model.teacher_params and teacher_size / teacher_stack_type / teacher_share_ffn are set from it.
    """
    config = config.copy_and_resolve_references()
    if config.get("self_training_steps"):
        config.total_steps = int(config.self_training_steps)
    if config.model.targets == "codes":
        config.model.targets = "codes+kmeans"
    config.model.kmeans_centroids = centroids_path
    config.model.stage1_params = params_path
    if teacher and teacher.get("params"):
        config.model.teacher_params = teacher["params"]
        config.model.teacher_size = teacher["size"]
        config.model.teacher_stack_type = teacher["stack_type"]
        config.model.teacher_share_ffn = bool(teacher["share_ffn"])
    return config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    process.setup()
    config = flags.FLAGS.config
    if config.method != "encodecmae":
        raise app.UsageError(f"--config is a {config.method!r} config; self-training is EncodecMAE's stage 2.")
    workdir = flags.FLAGS.workdir
    centroids_path, params_path = prepare(config, flags.FLAGS.stage1_workdir, workdir,
                                          num_frames=flags.FLAGS.num_frames, max_iter=flags.FLAGS.kmeans_iters,
                                          num_clips=flags.FLAGS.num_clips, teacher_workdir=flags.FLAGS.teacher_workdir)
    summary = read_summary(workdir)
    process.train_and_exit(self_training_config(config, centroids_path, params_path, summary and summary["teacher"]),
                           workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=config_utils.parse_flags_naming_config_keys)
