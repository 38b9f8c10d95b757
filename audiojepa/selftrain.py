r"""EncodecMAE's self-training stage in one command: k-means of the stage-1 encoder, then training on it.

    python -m audiojepa.selftrain --config=configs/encodecmae.py:runlocal \
        --stage1_workdir=/tmp/encodecmae_runlocal --workdir=/tmp/encodecmae_selftrain

1. The stage-1 run's latest checkpoint is restored; its encoder (the frozen *teacher*) runs without
   masking on random training crops until `--num_frames` frames of its last-layer features are
   collected (shared/reference/encodecmae.md §1.13: 10,000 frames).
2. k-means with `config.model.num_clusters` centroids is fitted on them in JAX (audiojepa.kmeans),
   with a progress line per iteration. The centroids and the stage-1 params are written into the new
   workdir (`kmeans_centroids.npy`, `stage1_params.msgpack`).
3. Training continues in the new workdir with `config.model.targets` = "codes+kmeans" (the k-means
   stream added with weight Σγ_q; the default) or "kmeans" (`--config.model.targets=kmeans`, the
   later code's k-means-only variant), the student starting from the stage-1 params.

Re-running the same command resumes stage 2 (the k-means is not fitted again).
"""

from __future__ import annotations

from audiojepa import host_memory

if __name__ == "__main__":  # glibc reads GLIBC_TUNABLES only at start-up: re-execute before the heavy imports
    host_memory.reexec_with_hugepage_malloc()

import logging  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

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
    flags.DEFINE_integer("num_frames", 10_000, "Teacher frames the k-means is fitted on.")
    flags.DEFINE_integer("kmeans_iters", 100, "Maximum Lloyd iterations.")
    flags.mark_flags_as_required(["config", "stage1_workdir", "workdir"])


def collect_teacher_features(method, stage1_params, spec, *, num_frames: int, batch_size: int, seed: int) -> np.ndarray:
    """[num_frames, D] float32: last-layer features of the stage-1 encoder on random training crops
    (all frames of ⌈num_frames / frames per batch⌉ batches, then a random subset without replacement)."""
    ds = pipeline.make_dataset(spec, batch_size=batch_size, seed=seed, device_frontend=True)
    frames_fn = jax.jit(lambda params, encodec_params, waveform: method.cluster_features(
        params, method.encodec_features(encodec_params, waveform)))
    precomputed_fn = jax.jit(method.cluster_features)  # shards of precomputed EnCodec features
    encodec_params = jax.tree.map(np.asarray, method.encodec_params)
    features, collected, start = [], 0, time.time()
    for i in range(len(ds)):
        batch = ds[i]
        if "features" in batch:
            out = np.asarray(precomputed_fn(stage1_params, batch["features"]))
        else:
            out = np.asarray(frames_fn(stage1_params, encodec_params, batch["waveform"]))
        features.append(out.reshape(-1, out.shape[-1]))
        collected += features[-1].shape[0]
        logging.info("teacher features: %d / %d frames (%.0f s)", min(collected, num_frames), num_frames,
                     time.time() - start)
        if collected >= num_frames:
            break
    features = np.concatenate(features)
    if features.shape[0] < num_frames:
        logging.warning("the data gave %d frames, fewer than --num_frames=%d; fitting on all of them",
                        features.shape[0], num_frames)
        return features
    pick = np.random.default_rng(seed).choice(features.shape[0], num_frames, replace=False)
    return features[np.sort(pick)]


def prepare(config, stage1_workdir: str, workdir: str, *, num_frames: int, max_iter: int) -> tuple[str, str]:
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
    features = collect_teacher_features(method, stage1_params, spec, num_frames=num_frames,
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
    """The stage-2 config: k-means targets (codes+kmeans unless the config asks for kmeans only)."""
    config = config.copy_and_resolve_references()
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
                                          num_frames=flags.FLAGS.num_frames, max_iter=flags.FLAGS.kmeans_iters)
    process.train_and_exit(self_training_config(config, centroids_path, params_path), flags.FLAGS.workdir)


if __name__ == "__main__":
    define_flags()
    app.run(main)
