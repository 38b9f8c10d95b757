r"""EncodecMAE's self-training stage in one command: k-means of the stage-1 encoder, then training on it.

    python -m audiojepa.selftrain --config=configs/encodecmae.py:runlocal \
        --stage1_workdir=/tmp/encodecmae_runlocal --workdir=/tmp/encodecmae_selftrain

1. The stage-1 run's latest checkpoint is restored; its encoder (the frozen *teacher*) runs without
   masking on `--num_clips` random training crops, and `--num_frames` of their last-layer frame features
   are drawn uniformly without replacement (shared/reference/encodecmae.md §1.13: 10,000 frames of
   10,000 random items).
2. k-means with `config.model.num_clusters` centroids is fitted on them in JAX (audiojepa.kmeans),
   with a progress line per iteration. The centroids and the stage-1 params are written into the new
   workdir (`kmeans_centroids.npy`, `stage1_params.msgpack`).
3. Training continues in the new workdir for `config.self_training_steps` steps (150k) with
   `config.model.targets` = "codes+kmeans" (the k-means stream added with weight Σγ_q; the default) or
   "kmeans" (`--config.model.targets=kmeans`, the later code's k-means-only variant), the student
   starting from the stage-1 params.

Re-running the same command resumes stage 2 (the k-means is not fitted again).
"""

from __future__ import annotations

from audiojepa import host_memory

if __name__ == "__main__":  # glibc reads GLIBC_TUNABLES only at start-up: re-execute before the heavy imports
    host_memory.reexec_with_hugepage_malloc()

import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from audiojepa import encoder as encoder_lib, kmeans, process  # noqa: E402
from audiojepa.data import pipeline  # noqa: E402
from audiojepa.methods import encodecmae  # noqa: E402

CENTROIDS_FILE = "kmeans_centroids.npy"
STAGE1_PARAMS_FILE = "stage1_params.msgpack"


def define_flags() -> None:
    """The command-line flags, defined only when this module is the program (`python -m
    audiojepa.selftrain`), so that importing its functions never claims absl's global --config."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/encodecmae.py[:arg]).", lock_config=False)
    flags.DEFINE_string("stage1_workdir", None, "Workdir of the stage-1 EncodecMAE run.")
    flags.DEFINE_string("workdir", None, "Workdir of the self-training run.")
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


def collect_teacher_features(method, stage1_params, spec, *, num_frames: int, num_clips: int, batch_size: int,
                             seed: int) -> np.ndarray:
    """[num_frames, D] float32: last-layer features of the stage-1 encoder, drawn uniformly without
    replacement from all frames of `num_clips` random training crops (fewer when the shards hold fewer
    clips), as the reference pools 10,000 random items' activations and then draws 10,000 frames
    (shared/reference/encodecmae.md §1.13)."""
    if spec.num_clips > 0 and num_clips > spec.num_clips:
        logging.info("--num_clips=%d but the shards hold %d clips: using each once", num_clips, spec.num_clips)
        num_clips = spec.num_clips
    num_batches = max(1, -(-num_clips // batch_size))
    ds = pipeline.make_dataset(spec, batch_size=batch_size, seed=seed, device_frontend=True)
    frames_fn = jax.jit(lambda params, encodec_params, waveform: method.cluster_features(
        params, method.encodec_features(encodec_params, waveform)))
    precomputed_fn = jax.jit(method.cluster_features)  # shards of precomputed EnCodec features
    encodec_params = jax.tree.map(np.asarray, method.encodec_params)

    def teacher_batches():
        start = time.time()
        for i in range(num_batches):
            batch = ds[i]
            if "features" in batch:
                out = np.asarray(precomputed_fn(stage1_params, batch["features"]))
            else:
                out = np.asarray(frames_fn(stage1_params, encodec_params, batch["waveform"]))
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


def prepare(config, stage1_workdir: str, workdir: str, *, num_frames: int, max_iter: int,
            num_clips: int = 10_000) -> tuple[str, str]:
    """Fits the k-means on the stage-1 teacher (unless done) and returns (centroids path, stage-1 params path)."""
    centroids_path = os.path.join(workdir, CENTROIDS_FILE)
    params_path = os.path.join(workdir, STAGE1_PARAMS_FILE)
    if os.path.exists(centroids_path) and os.path.exists(params_path):
        logging.info("k-means already fitted: %s", centroids_path)
        return centroids_path, params_path
    method, state, meta = encoder_lib.restore_train_state(stage1_workdir)
    if meta["method"] != "encodecmae":
        raise ValueError(f"--stage1_workdir={stage1_workdir} holds a {meta['method']!r} run; self-training needs "
                         "an EncodecMAE stage-1 run.")
    stage1_params = jax.device_get(state["params"])
    spec = pipeline.resolve_data_spec(config.data)
    features = collect_teacher_features(method, stage1_params, spec, num_frames=num_frames, num_clips=num_clips,
                                        batch_size=int(config.batch_size), seed=int(config.seed))
    k = int(config.model.num_clusters)
    logging.info("fitting %d-means on %d frames of %d dims", k, features.shape[0], features.shape[1])

    def progress(info):
        logging.info("k-means iteration %d: inertia %.5g, shift %.3g, %d empty clusters re-seeded",
                     info["iteration"], info["inertia"], info["shift"], info["num_empty"])

    centroids, inertia = kmeans.kmeans(jax.random.key(int(config.seed)), features, k, max_iter=max_iter,
                                       callback=progress)
    os.makedirs(workdir, exist_ok=True)
    tmp = f".tmp{jax.process_index()}"  # every process computes the same files; each writes its own temporary
    encodecmae.save_params(params_path + tmp, stage1_params)
    os.replace(params_path + tmp, params_path)
    with open(centroids_path + tmp, "wb") as f:
        np.save(f, centroids)
    os.replace(centroids_path + tmp, centroids_path)  # written last: its presence means "prepared"
    logging.info("k-means done (inertia %.5g): %s", inertia, centroids_path)
    return centroids_path, params_path


def self_training_config(config, centroids_path: str, params_path: str):
    """The stage-2 config: k-means targets (codes+kmeans unless the config asks for kmeans only), trained for
    `config.self_training_steps` steps (the reference's 150k; 0 or unset keeps `total_steps`)."""
    config = config.copy_and_resolve_references()
    if config.get("self_training_steps"):
        config.total_steps = int(config.self_training_steps)
    if config.model.targets == "codes":
        config.model.targets = "codes+kmeans"
    config.model.kmeans_centroids = centroids_path
    config.model.stage1_params = params_path
    return config


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    process.setup()
    config = flags.FLAGS.config
    if config.method != "encodecmae":
        raise app.UsageError(f"--config is a {config.method!r} config; self-training is EncodecMAE's stage 2.")
    centroids_path, params_path = prepare(config, flags.FLAGS.stage1_workdir, flags.FLAGS.workdir,
                                          num_frames=flags.FLAGS.num_frames, max_iter=flags.FLAGS.kmeans_iters,
                                          num_clips=flags.FLAGS.num_clips)
    process.train_and_exit(self_training_config(config, centroids_path, params_path), flags.FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
