"""Orbax checkpoints of the whole run: train state, Grain iterator position and run metadata.

Layout: `workdir/checkpoints/<step>/{state, data, meta}`. `state` holds params, optimizer state,
target params and the step; `data` the per-process Grain iterator state; `meta` a JSON dict (the
config, the front end and normalisation the encoder was trained with). Saves are asynchronous;
an interrupted save never replaces the previous good checkpoint (Orbax commits atomically).
"""

from __future__ import annotations

import logging
import os
import time

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

ITEMS = ("state", "data", "meta")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, every_steps: int, keep: int = 2, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A manager that saves every `every_steps` steps (and on preemption) and keeps the latest `keep`."""
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=sdp.AnySavePolicy([
            sdp.FixedIntervalPolicy(max(1, every_steps)),
            sdp.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=pp.LatestN(max(1, keep)),
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
    )
    # Registering handlers up front lets a fresh manager restore before it has saved anything.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(workdir), item_names=ITEMS, item_handlers=handlers,
                                 options=options)


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
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], restored["meta"]


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
