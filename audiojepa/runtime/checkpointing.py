"""Orbax checkpoints of the whole run: train state, Grain iterator position and run metadata.

Layout: `workdir/checkpoints/<step>/{state, data, meta}`. `state` holds params, optimizer state,
target params and the step; `data` the per-process Grain iterator state; `meta` a JSON dict (the
config, the front end and normalisation the encoder was trained with, where the data stream stands
and the run's counters). Saves are asynchronous; an interrupted save never replaces the previous
good checkpoint: Orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames it when complete
(on GCS, where there is no rename, it writes into `<step>` and a `commit_success.txt` marks completion), and
`latest_step()` only sees finished ones. The workdir may be a gs:// URL (audiojepa.runtime.storage): Orbax writes arrays
there with TensorStore's GCS driver and its other files through etils.epath.

Faults. A save that fails (a full disk, a lost mount) raises `CheckpointWriteError` at the next call of
`save` (train.py calls it every step) or `wait_for_saves`, its message starting with the cause ("No space
left on device ..."), naming the step, and with the partial `<step>.orbax-checkpoint-tmp*` folder removed.
Each save also records a digest of every state leaf in `meta["state_digests"]`; `restore_verified` checks
them (checkpoints written before digests get a finite check of every float leaf), and
`restore_latest_intact` falls back from a damaged or unreadable checkpoint to the previous intact one with a
warning naming the bad one, which is kept (moved to `workdir/damaged_checkpoints/` where asked).

When to save: every `config.checkpoint_every_steps`, on the last step, and on preemption (Orbax's
policy in multi-process jobs; SIGTERM through `PreemptionWatcher` in single-process ones). What to
keep: the latest `config.keep_checkpoints`, plus every `config.keep_every_steps`-th step if > 0.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import threading
import time
import weakref

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

from audiojepa.runtime import storage

ITEMS = ("state", "data", "meta")
DIGESTS_KEY = "state_digests"  # meta key: {leaf name: digest} of the saved state (state_digests())
DAMAGED_DIR = "damaged_checkpoints"  # under the workdir: checkpoints found damaged, moved out of the way
GCS_COMMIT_FILE = "commit_success.txt"  # Orbax's mark of a complete checkpoint on GCS (atomicity.COMMIT_SUCCESS_FILE)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written. `step`: its step; `cause`: the underlying error in a few words
    (the start of the message); `original`: the exception Orbax raised (its traceback is in the log)."""

    def __init__(self, message: str, *, step: int, cause: str, original: BaseException):
        super().__init__(message)
        self.step, self.cause, self.original = step, cause, original


class CheckpointDamagedError(RuntimeError):
    """A checkpoint cannot be read back, or what it reads back differs from what was saved (or, without
    digests, is not finite). `step`: which (None when the error is about all of a workdir's checkpoints);
    `reason`: what is wrong with it."""

    def __init__(self, message: str, *, step: int | None = None, reason: str = ""):
        super().__init__(message)
        self.step, self.reason = step, reason

    @classmethod
    def of(cls, step: int, directory: str, reason: str) -> CheckpointDamagedError:
        return cls(f"checkpoint {step} in {directory} is damaged: {reason}", step=step, reason=reason)


def checkpoint_dir(workdir: str) -> str:
    return storage.join(storage.absolute(workdir), "checkpoints")


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


# manager -> step of its last started save whose outcome has not been checked yet
_unchecked_saves: "weakref.WeakKeyDictionary[ocp.CheckpointManager, int]" = weakref.WeakKeyDictionary()


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict, *, force: bool = False) -> bool:
    """Saves if the policy says so (or `force`); returns whether a save started.

    Meant to be called every step: it first checks the previous asynchronous save without blocking (and
    waits for it when a new save is due, as Orbax would), raising `CheckpointWriteError` if that save
    failed. `meta` gets `state_digests(state)` under DIGESTS_KEY.
    """
    due = force or manager.should_save(step)
    if due and _unchecked_saves.get(manager) is not None:
        _wait_and_check(manager)
    elif not due:
        check_last_save(manager)
        return False
    args = {"state": ocp.args.StandardSave(state),
            "meta": ocp.args.JsonSave({**meta, DIGESTS_KEY: state_digests(state)})}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    start = time.perf_counter()
    try:
        saved = manager.save(step, args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # noqa: BLE001 - any failure of a synchronous save (or the blocking part of an
        # asynchronous one) is a failed write: re-raised as CheckpointWriteError, cause first
        raise _write_error(manager, step, e) from None
    if saved:
        _unchecked_saves[manager] = step
        logging.info("checkpoint for step %d started (%.2f s blocking)", step, time.perf_counter() - start)
    return saved


def check_last_save(manager: ocp.CheckpointManager) -> None:
    """Raises `CheckpointWriteError` if the last asynchronous save has failed; never blocks on one still
    being written (costs a lock when there is nothing to check). `save` already calls it."""
    if _unchecked_saves.get(manager) is not None and not manager.is_saving_in_progress():
        _wait_and_check(manager)


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
    """`manager.wait_until_finished()`, raising `CheckpointWriteError` (cause first, partial folder
    removed) if the last save failed. Call it in place of wait_until_finished before exiting."""
    _wait_and_check(manager)


def _wait_and_check(manager: ocp.CheckpointManager) -> None:
    step = _unchecked_saves.pop(manager, None)
    try:
        manager.wait_until_finished()
    except Exception as e:
        if step is None:
            raise
        raise _write_error(manager, step, e) from None


def _os_cause(error: BaseException) -> str | None:
    """"No space left on device (errno 28, ENOSPC)" for the first OS error in `error`'s chain or text
    (TensorStore reports one as `[os_error_code='28']`), else None."""
    seen = 0
    while error is not None and seen < 32:
        code = error.errno if isinstance(error, OSError) and error.errno else None
        if code is None:
            found = re.search(r"os_error_code='?(\d+)|\[Errno (\d+)\]", str(error))
            code = int(found.group(1) or found.group(2)) if found else None
        if code:
            return f"{os.strerror(code)} (errno {code}, {errno.errorcode.get(code, '?')})"
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _write_error(manager: ocp.CheckpointManager, step: int, error: BaseException) -> CheckpointWriteError:
    """The error for a failed save of `step`, after removing the partial folder it left."""
    directory = str(manager.directory)
    removed = []
    if jax.process_index() == 0:
        try:  # on an object store the cause (an unreachable bucket) may fail this too; it must not hide the cause
            partials = storage.glob(storage.join(directory, f"{step}.orbax-checkpoint-tmp*"))
            unfinished = storage.join(directory, str(step))  # on GCS the save writes here; the marker commits it
            if storage.is_url(directory) and not storage.exists(storage.join(unfinished, GCS_COMMIT_FILE)):
                partials.append(unfinished)
            for partial in partials:
                if storage.exists(partial):
                    storage.remove_tree(partial)
                    removed.append(os.path.basename(partial))
        except Exception:  # noqa: BLE001 - reported in the log; the write error below is what the caller needs
            logging.exception("could not remove the partial checkpoint of step %d in %s", step, directory)
    cause = _os_cause(error) or _first_line(error)
    latest = manager.latest_step()
    intact = f"checkpoint {latest}" if latest is not None else "none"
    message = (f"{cause}: the checkpoint of step {step} could not be written to {directory} "
               f"(partial folder removed: {', '.join(removed) or 'none'}; latest intact checkpoint: {intact}); "
               f"fix the cause and run again to resume. Orbax: {_first_line(error)[:500]}")
    return CheckpointWriteError(message, step=step, cause=cause, original=error)


def _leaf_name(path) -> str:
    """'params/stack/blocks/mlp/kernel' for a key path, the same for dicts, namedtuples and lists."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _words(x):
    """The bits of `x` as a flat uint32 vector (narrower types widened, 64-bit ones split)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).ravel()
    bits = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32).ravel()


@jax.jit
def _digest_words(leaves):
    """Per leaf, [sum of words, sum of position-weighted mixed words] mod 2**32: any change of one word
    changes the first; the second catches swaps. Integer sums, so equal on any device or sharding."""
    out = []
    for x in leaves:
        words = _words(x)
        weighted = words * (jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1))
        mixed = weighted ^ (weighted >> 15)
        out.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)]))
    return out


def state_digests(state) -> dict[str, str]:
    """{leaf name: "<dtype>[shape]:<16 hex digits>"} of a state tree, computed where the arrays live
    (one small jitted reduction per save; only 8 bytes per leaf come to the host)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    if not flat:
        return {}
    sums = jax.device_get(_digest_words([jnp.asarray(x) for _, x in flat]))
    return {_leaf_name(path): f"{np.asarray(x).dtype}{list(np.shape(x))}:{int(s[0]):08x}{int(s[1]):08x}"
            for (path, x), s in zip(flat, sums)}


@jax.jit
def _all_finite(leaves):
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def _verify_state(step: int, directory: str, state, meta: dict) -> None:
    """Raises CheckpointDamagedError when the restored `state` differs from the digests saved with it
    (or, for a checkpoint saved without digests, has a non-finite float leaf)."""
    expected = meta.get(DIGESTS_KEY)
    if expected is None:
        flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
                if jnp.issubdtype(x.dtype, jnp.inexact)]
        finite = jax.device_get(_all_finite([x for _, x in flat])) if flat else []
        bad = [_leaf_name(p) for (p, _), ok in zip(flat, finite) if not ok]
        if bad:
            raise CheckpointDamagedError.of(step, directory, f"(saved without digests) non-finite values in "
                                                          f"{len(bad)} state leaves, e.g. state/{bad[0]}")
        return
    actual = state_digests(state)
    wrong = sorted(name for name in expected.keys() | actual.keys() if expected.get(name) != actual.get(name))
    if wrong:
        raise CheckpointDamagedError.of(
            step, directory, f"it reads back different from what was saved: {len(wrong)} of {len(expected)} "
            f"state leaves differ from their saved digests, e.g. state/{wrong[0]} "
            f"(saved {expected.get(wrong[0])}, read {actual.get(wrong[0])})")


def _public_meta(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != DIGESTS_KEY}


def restore(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
    """Restores `state` onto the shardings in `abstract_state` (jax.ShapeDtypeStruct leaves), unverified
    (`restore_verified` checks it against its digests).

    Restoring onto an abstract target (rather than the saved sharding) is what lets a run resume
    on a different number of devices. `data_iterator`, if given, is moved to the saved position.
    Returns (state, meta).
    """
    check_block_layout(manager, step)
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], _public_meta(restored["meta"])


def restore_verified(manager: ocp.CheckpointManager, step: int, abstract_state, data_iterator=None):
    """`restore`, then a check of every state leaf against the digests saved with it. Returns (state, meta).

    `abstract_state`: a tree of jax.ShapeDtypeStruct, or a function step -> such a tree (e.g. built from
    `manager.item_metadata(step)`). Raises CheckpointDamagedError naming the checkpoint when it cannot be
    read (a truncated or missing file, undecodable data) or reads back different from what was saved; a
    checkpoint of the old per-block layout still gets check_block_layout's ValueError.
    """
    directory = str(manager.directory)
    try:
        metadata = manager.item_metadata(step)["state"]
    except Exception as e:
        raise CheckpointDamagedError.of(step, directory, f"it cannot be read: {_first_line(e)[:500]}") from e
    _check_block_layout_of(metadata, step, directory)
    target = abstract_state(step) if callable(abstract_state) else abstract_state
    try:
        args = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
        raise CheckpointDamagedError.of(step, directory, f"it cannot be read: {_first_line(e)[:500]}") from e
    _verify_state(step, directory, restored["state"], restored["meta"])
    return restored["state"], _public_meta(restored["meta"])


def restore_latest_intact(manager: ocp.CheckpointManager, abstract_state, data_iterator=None, *,
                          move_damaged: bool = False):
    """(step, state, meta) of the latest checkpoint that reads back as saved (`restore_verified`), or
    (None, None, {}) when there is none.

    A damaged checkpoint is skipped with a warning naming it and the one used instead, and is never
    deleted; with `move_damaged` (a training run, which will save again) it is moved to
    `<workdir>/damaged_checkpoints/<step>` so that new saves of that step and the keep-latest-N policy see
    only intact checkpoints. Raises CheckpointDamagedError naming every checkpoint when none is intact.
    """
    directory = str(manager.directory)
    problems = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, meta = restore_verified(manager, step, abstract_state, data_iterator)
        except CheckpointDamagedError as e:
            problems.append((step, e))
            continue
        for bad, error in problems:
            moved = f"; moved to {_move_aside(manager, bad)}" if move_damaged else " (left in place)"
            logging.warning("%s; using checkpoint %d instead%s", error, step, moved)
        if move_damaged and problems:
            manager.reload()
        return step, state, meta
    if problems:
        raise CheckpointDamagedError(
            f"no intact checkpoint in {directory}: "
            + "; ".join(f"checkpoint {bad}: {error.reason}" for bad, error in problems)
            + ". Nothing was deleted; start a new workdir, or restore one of them from a backup.")
    return None, None, {}


def restore_data_iterator(manager: ocp.CheckpointManager, step: int, data_iterator) -> None:
    """Moves `data_iterator` to the position saved in checkpoint `step` (its `data` item only; no arrays)."""
    manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))


def _move_aside(manager: ocp.CheckpointManager, step: int) -> str:
    """Moves checkpoint `step` to <workdir>/damaged_checkpoints/<step>[-n]; returns where (process 0 moves,
    every process waits for it)."""
    source = storage.join(str(manager.directory), str(step))
    root = storage.join(os.path.dirname(str(manager.directory)), DAMAGED_DIR)
    dest, n = storage.join(root, str(step)), 0
    while storage.exists(dest):
        n += 1
        dest = storage.join(root, f"{step}-{n}")
    if jax.process_index() == 0:
        storage.makedirs(root)
        storage.move(source, dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"audiojepa_move_damaged_checkpoint_{step}")
    return dest


def check_block_layout(manager: ocp.CheckpointManager, step: int) -> None:
    """Raises a ValueError naming the checkpoint when it stores transformer blocks per block (`blocks_<i>`,
    audiojepa before 2026-11-30) rather than stacked (vit.TransformerStack), instead of Orbax's long list
    of missing keys."""
    _check_block_layout_of(manager.item_metadata(step)["state"], step, str(manager.directory))


def _check_block_layout_of(metadata, step: int, directory: str) -> None:
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(metadata)[0]]
    old = next((path for path in paths if re.search(r"\['blocks_\d+'\]", path)), None)
    if old is not None:
        raise ValueError(
            f"checkpoint {step} in {directory} stores transformer blocks one by one (e.g. state{old}), "
            f"the layout of audiojepa before 2026-11-30; this code stores them stacked (params .../blocks/... "
            f"with a leading [depth] axis) and cannot resume it. Start a new workdir, or export the encoder "
            f"with the code that wrote it (tools/export_encoder.py); exported encoders of that layout still load.")


def restore_meta_item(manager: ocp.CheckpointManager, step: int) -> dict:
    """The `meta` dict of checkpoint `step` of an open manager (no arrays are read)."""
    return _public_meta(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])


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
    return step, _public_meta(meta)


def abstract_like(tree, sharding):
    """ShapeDtypeStruct leaves with `sharding`, for restoring `tree`-shaped state."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
