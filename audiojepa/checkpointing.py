"""Orbax checkpoints of the whole run: train state, Grain iterator position and run metadata.

Layout: `workdir/checkpoints/<step>/{state, data, meta}`. `state` holds params, optimizer state,
target params and the step; `data` the per-process Grain iterator state; `meta` a JSON dict (the
config, the front end and normalisation the encoder was trained with, where the data stream stands
and the run's counters). Saves are asynchronous; an interrupted save never replaces the previous
good checkpoint: Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it when complete
(on GCS, a `commit_success.txt` marks completion), and `latest_step()` only sees finished ones.

When to save: every `config.checkpoint_every_steps`, on the last step, and on preemption (Orbax's
policy in multi-process jobs; SIGTERM through `PreemptionWatcher` in single-process ones). What to
keep: the latest `config.keep_checkpoints`, plus every `config.keep_every_steps`-th step if > 0.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

ITEMS = ("state", "data", "meta")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, every_steps: int, keep: int = 2, keep_every_steps: int = 0,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """A manager that saves every `every_steps` steps (and on preemption) and keeps the latest `keep`
    checkpoints plus, if `keep_every_steps` > 0, every checkpoint whose step is a multiple of it."""
    preservation = pp.LatestN(max(1, keep))
    if keep_every_steps > 0:
        preservation = pp.AnyPreservationPolicy([preservation, pp.EveryNSteps(keep_every_steps)])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=sdp.AnySavePolicy([
            sdp.FixedIntervalPolicy(max(1, every_steps)),
            sdp.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=preservation,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
    )
    # Registering handlers up front lets a fresh manager restore before it has saved anything.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS, item_handlers=handlers,
                                 options=options)


def _int_key(config, key: str, default: int, minimum: int, meaning: str) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"config.{key}={value!r}; expected an integer >= {minimum} ({meaning})")
    return value


def manager_from_config(workdir: str, config) -> ocp.CheckpointManager:
    """`make_manager` with the checkpoint keys of a run config, checked (errors name the key)."""
    every = _int_key(config, "checkpoint_every_steps", 1000, 1, "save every N steps")
    keep = _int_key(config, "keep_checkpoints", 2, 1, "how many of the latest checkpoints to keep")
    keep_every = _int_key(config, "keep_every_steps", 0, 0,
                          "also keep checkpoints whose step is a multiple of N; 0 keeps none extra")
    async_save = config.get("async_checkpoints", True)
    if not isinstance(async_save, bool):
        raise ValueError(f"config.async_checkpoints={async_save!r}; expected True or False")
    if keep_every and keep_every % every:
        raise ValueError(f"config.keep_every_steps={keep_every} is not a multiple of "
                         f"config.checkpoint_every_steps={every}: no saved step would be kept by it")
    return make_manager(workdir, every_steps=every, keep=keep, keep_every_steps=keep_every, async_save=async_save)


class PreemptionWatcher:
    """Turns SIGTERM into "save a checkpoint and stop at the next step boundary" (single-process runs).

    `install()` before the train loop, poll `requested` after each step, `uninstall()` after (or use
    it as a context manager). In a multi-process job
    `jax.distributed.initialize()` starts JAX's preemption service, which catches SIGTERM itself
    and makes every process reach `manager.reached_preemption(step)` at the same step (Orbax's
    `PreemptionCheckpointingPolicy`); a Python handler would replace that one, so none is installed.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        del frame
        if not self.requested:
            logging.warning("received signal %d: saving a checkpoint at the end of this step, then exiting", signum)
        self.requested = True

    def install(self) -> "PreemptionWatcher":
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def __enter__(self) -> "PreemptionWatcher":
        return self.install()

    def __exit__(self, *exc) -> bool:
        self.uninstall()
        return False


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict, *, force: bool = False) -> bool:
    """Saves if the policy says so (or `force`); returns whether a save started."""
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    start = time.perf_counter()
    saved = manager.save(step, args=ocp.args.Composite(**args), force=force)
    if saved:
        logging.info("checkpoint for step %d started (%.2f s blocking)", step, time.perf_counter() - start)
    return saved


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
    """Restores `state` onto the shardings in `abstract_state` (jax.ShapeDtypeStruct leaves).

    Restoring onto an abstract target (rather than the saved sharding) is what lets a run resume
    on a different number of devices. `data_iterator`, if given, is moved to the saved position.
    Returns (state, meta).
    """
    check_block_layout(manager, step)
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], restored["meta"]


def check_block_layout(manager: ocp.CheckpointManager, step: int) -> None:
    """Raises a ValueError naming the checkpoint when it stores transformer blocks per block (`blocks_<i>`,
    audiojepa before 2026-11-30) rather than stacked (vit.TransformerStack), instead of Orbax's long list
    of missing keys."""
    metadata = manager.item_metadata(step)["state"]
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(metadata)[0]]
    old = next((path for path in paths if re.search(r"\['blocks_\d+'\]", path)), None)
    if old is not None:
        raise ValueError(
            f"checkpoint {step} in {manager.directory} stores transformer blocks one by one (e.g. state{old}), "
            f"the layout of audiojepa before 2026-11-30; this code stores them stacked (params .../blocks/... "
            f"with a leading [depth] axis) and cannot resume it. Start a new workdir, or export the encoder "
            f"with the code that wrote it (tools/export_encoder.py); exported encoders of that layout still load.")


def restore_meta_item(manager: ocp.CheckpointManager, step: int) -> dict:
    """The `meta` dict of checkpoint `step` of an open manager (no arrays are read)."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_meta(workdir: str, step: int | None = None) -> tuple[int, dict]:
    """(step, meta) of the latest (or given) checkpoint in `workdir`, without loading arrays."""
    manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS,
                                    item_handlers={"meta": ocp.JsonCheckpointHandler()},
                                    options=ocp.CheckpointManagerOptions(read_only=True, create=False))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(workdir)}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    return step, meta


def abstract_like(tree, sharding):
    """ShapeDtypeStruct leaves with `sharding`, for restoring `tree`-shaped state."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
