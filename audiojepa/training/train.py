"""The generic trainer: every method trains through `train_and_evaluate(config, workdir)`.

A method (see `audiojepa/methods/`) supplies `init`, `loss`, `update_targets` and
`weight_decay_mask`; this module owns the rest: the mesh, the input pipeline, the optimizer, the
jitted step with donated state, and the step loop with Orbax checkpoints that resume exactly
(params, optimizer state, target params, step and data-iterator position). The loop's bookkeeping
lives beside it: `step_metrics` (logged rows, the non-finite policy, when to stop) and `run_summary`
(what the run has done, as run_summary.json says).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from audiojepa import methods
from audiojepa.data import pipeline, records, resolve, stats, target_records
from audiojepa.ops import frontend, optim
from audiojepa.runtime import checkpointing, locks, profiling, sharding, storage
from audiojepa.runtime import metrics as metrics_lib
from audiojepa.training import init_from, resume_check, run_summary
from audiojepa.training.step_metrics import StepMetrics, should_stop

LOCK_FILE = "run.lock"  # held by the training process (workdir_lock)


def _run_periodic_eval(name: str, evaluator, eval_encoder, step: int) -> dict[str, float]:
    """`eval/<name>/<metric>` values of one periodic evaluation. An evaluation that fails is logged with
    its traceback and reported as `eval/<name>/failed` = 1; it never ends the training run (whose
    checkpoint for this step is already started)."""
    try:
        return {f"eval/{name}/{key}": value for key, value in evaluator.run(eval_encoder)}
    except Exception:  # noqa: BLE001 -- a broken probe must not end a week-long run
        logging.exception("periodic evaluation config.evals.%s failed at step %d; training goes on", name, step)
        return {f"eval/{name}/failed": 1.0}


def steps_and_warmup(config, num_clips: int) -> tuple[int, int, int]:
    """(total_steps, warmup_steps, steps_per_epoch) from `config.total_steps` or epochs x epoch size.

    num_clips: clips in the shard set (-1 when unknown: shards without a manifest.json). Epoch-based
    settings then raise, naming the key to set instead, rather than giving no warm-up.
    """
    batch_size = int(config.batch_size)
    if batch_size <= 0:
        raise ValueError(f"config.batch_size={config.batch_size!r}; it must be > 0 (the global batch).")
    steps_per_epoch = max(1, num_clips // batch_size) if num_clips > 0 else 0
    total = int(config.get("total_steps") or 0)
    if total <= 0:
        if not steps_per_epoch:
            raise ValueError("config.total_steps must be set when the shards have no manifest (clip count unknown)")
        total = int(config.num_epochs * steps_per_epoch)
        if total <= 0:
            raise ValueError(f"config.num_epochs={config.num_epochs!r} gives {total} steps of {steps_per_epoch} per "
                             "epoch: nothing to train. Set config.num_epochs or config.total_steps > 0.")
    warmup = config.get("warmup_steps")
    if warmup is None or warmup < 0:
        warmup_epochs = config.get("warmup_epochs", 0)
        if warmup_epochs and not steps_per_epoch:
            raise ValueError(f"config.warmup_epochs={warmup_epochs} needs the clip count, and the shards have no "
                             "manifest.json; set config.warmup_steps instead.")
        warmup = int(warmup_epochs * steps_per_epoch)
    return total, int(warmup), steps_per_epoch


def make_train_step(method, tx, schedule, spec: pipeline.DataSpec, *, device_frontend: bool, total_steps: int):
    """The pure step: (state, batch, rng) -> (state, metrics).

    A step whose loss or gradient norm is not finite leaves the state unchanged and reports
    `nonfinite = 1`; the host stops the run at the next check, before any bad state is saved.

    `mask_variant` (static) is for methods whose masks change size between steps (e.g. a mask ratio
    drawn per batch): such a method defines `mask_variant(step) -> int` on the host and takes
    `loss(..., mask_variant=v)`; each variant compiles once, so a run compiles a bounded number of times.

    A method whose target update needs values computed in the loss (e.g. MATPAC's teacher centre)
    returns them under the metrics key "state_update" (any pytree); it is passed on as
    `update_targets(..., state_update=...)` and never logged.

    Precomputed EnCodec targets (`spec.kind == "encodec_targets"`) go to the method as they come:
    {"features", "codes"}, no EnCodec in the step (`methods.check_data` has checked the method takes them).
    """

    def step_fn(state, batch, rng, mask_variant=None):
        step = state["step"]
        rng = jax.random.fold_in(rng, step)
        if spec.kind == target_records.KIND:
            inputs = {"features": batch["features"], "codes": batch["codes"]}
        elif methods.input_kind(method) == "waveform":
            inputs = {"waveform": batch["waveform"]}
        elif device_frontend:
            inputs = {"lms": stats.normalize(frontend.logmel_device(batch["waveform"], spec.frontend),
                                             spec.norm_mean, spec.norm_std)}
        else:
            inputs = {"lms": batch["lms"]}

        def loss_fn(params):
            kwargs = {} if mask_variant is None else {"mask_variant": mask_variant}
            return method.loss(params, state["target_params"], inputs, rng, step, **kwargs)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        aux = dict(aux)
        state_update = aux.pop("state_update", None)
        update_kwargs = {} if state_update is None else {"state_update": state_update}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(state):
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"], grad_norm=grad_norm)
            params = optax.apply_updates(state["params"], updates)
            target_params = method.update_targets(params, state["target_params"], step, total_steps,
                                                  **update_kwargs)
            return {"step": step, "params": params, "target_params": target_params, "opt_state": opt_state}

        # A branch, not a select between new and old values: a select keeps the old params and moments
        # alive next to the new ones, so XLA copies them (donated buffers are updated in place) and
        # recomputes the new ones in several passes; the branch updates in place (~0.3 s of a ViT-B M2D
        # step on a 2-core CPU, BENCHMARKS.md).
        new_state = jax.lax.cond(finite, apply_update, lambda state: state, state)
        new_state["step"] = step + 1
        out = {**aux, "loss": loss, "grad_norm": grad_norm, "lr": schedule(step),
               "skipped_records": jnp.sum(batch["skipped_records"]), "nonfinite": 1 - finite.astype(jnp.int32)}
        if "skipped_by_reason" in batch:  # [batch, reasons]: summed over the global batch, i.e. all processes
            by_reason = jnp.sum(batch["skipped_by_reason"], axis=0)
            out.update({f"skipped/{r}": by_reason[i] for i, r in enumerate(records.SKIP_REASONS)})
        return new_state, out

    return step_fn


def init_train_state(method, optim_config, schedule, rng) -> dict:
    """The train state: {"step", "params", "target_params", "opt_state"} (a plain pytree)."""
    params, target_params = method.init(rng)
    tx = optim.make_optimizer(optim_config, schedule, method.weight_decay_mask(params))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "target_params": target_params,
            "opt_state": tx.init(params)}


def _state_from_weights(path: str, method, tx, state: dict, rng, sharding) -> dict:
    """`state` (step 0) with its params and target from `path` (audiojepa.training.init_from) and a fresh optimizer
    state."""
    # Replicated: every process holds the whole value (its first local shard), and reads the same source.
    host = jax.tree.map(lambda x: np.asarray(x.addressable_shards[0].data),
                        {"params": state["params"], "target_params": state["target_params"]})
    params, target_params, report = init_from.initialize(path, method, host["params"], host["target_params"],
                                                         jax.random.fold_in(rng, 1))
    logging.info("config.init_from=%s: %s", path, report.describe())
    params, target_params = jax.device_put((params, target_params), sharding)
    return {**state, "params": params, "target_params": target_params,
            "opt_state": jax.jit(tx.init, out_shardings=sharding)(params)}


def _run_meta(config, spec: pipeline.DataSpec, total_steps: int) -> dict:
    """What evaluation needs to rebuild the encoder and its input pipeline."""
    return {
        "config": json.loads(config.to_json_best_effort()),
        "method": config.method,
        "frontend": spec.frontend.to_dict(),
        "crop_frames": spec.crop_frames,
        "norm_stats": [spec.norm_mean, spec.norm_std],
        "data_identity": resume_check.data_identity(spec.manifest),
        "total_steps": total_steps,
    }


def train_and_evaluate(config, workdir: str, *, stop_after: int | None = None, num_devices: int | None = None) -> dict:
    """Trains `config.method` as configured; resumes from `workdir` if it holds a checkpoint.

    Args:
      config: an ml_collections ConfigDict (see configs/).
      workdir: where checkpoints, metrics.jsonl, TensorBoard logs and config.json go: a local path (every process
        of a multi-host run must see it) or a gs:// URL (audiojepa.runtime.storage; no run lock there, see
        workdir_lock).
      stop_after: leave the loop (with a checkpoint) after this step, as a pre-empted job would.
      num_devices: use only the first N local devices (single process; tests and benchmarks).

    Returns:
      The last logged metrics, plus `preempted` = 1.0 if a preemption signal (SIGTERM) stopped the
      run early, after committing a checkpoint.
    """
    storage.check_url(workdir, what="--workdir")
    mesh = sharding.make_mesh(num_devices)
    storage.makedirs(workdir)
    with workdir_lock(workdir):  # before anything is written: a second trainer leaves the first's files alone
        run_progress = run_summary.RunProgress(global_batch_size=int(config.batch_size))
        error = None
        try:
            # Explicit-sharding ops that create arrays (zeros_like, broadcasts) take their mesh from this
            # context on newer JAX (0.11+); without it they come out replicated and meet batch-sharded operands.
            with jax.set_mesh(mesh):
                return _train_on_mesh(config, workdir, mesh, stop_after=stop_after, run_progress=run_progress)
        except BaseException as e:
            error = e
            raise
        finally:
            if jax.process_index() == 0:
                if run_progress.committed_step is None:  # the run did not get as far as its checkpoint manager
                    run_progress.committed_step = run_summary.committed_step_on_disk(workdir)
                run_summary.write_run_summary(workdir, run_progress, error)


def workdir_lock(workdir: str):
    """The training workdir's run lock (audiojepa.runtime.locks), held by process 0 for the whole run: a second trainer
    on the same workdir fails at once, naming it and the holder's pid, instead of interleaving checkpoints.
    Other processes of a multi-host run take no lock (they are the same run).

    A workdir on an object store (gs://) has no lock, and the run says so in a warning. A lock there could only
    be a lease (an object with an owner and a heartbeat, taken by a conditional create): a killed or preempted
    run cannot release it, so every resume would first wait for its heartbeat to go stale (or fail), which is
    the path pod jobs take after each preemption, and the condition needs a client beyond epath. Checkpoints
    stay readable without it (Orbax marks each complete one with commit_success.txt), but two runs on one
    bucket workdir would interleave their checkpoints and metrics: give each run its own workdir.
    """
    if jax.process_index() != 0:
        return contextlib.nullcontext()
    if storage.is_url(workdir):
        logging.warning("workdir %s is on an object store: no run lock is taken there "
                        "(audiojepa.training.train.workdir_lock); "
                        "make sure no other run uses this workdir", workdir)
        return contextlib.nullcontext()
    path = os.path.join(workdir, LOCK_FILE)
    return locks.exclusive_lock(path, on_held=lambda holder: locks.RunLockedError(
        f"workdir {workdir} is in use by another run (pid {holder}; lock file {path}); wait for it to end (a "
        "resumed run takes the lock again), or give another --workdir"))


def _train_on_mesh(config, workdir: str, mesh, *, stop_after: int | None,
                   run_progress: run_summary.RunProgress) -> dict:
    """train_and_evaluate's body, run inside `jax.set_mesh(mesh)`; keeps `run_progress` up to date."""
    method_cls = methods.get_method(config.method)  # fail on an unknown method before touching data
    profile_window = profiling.parse_profile_steps(config.get("profile_steps"))  # fail now, naming the key
    step_metrics = StepMetrics(config.get("nonfinite_policy", "stop"))
    is_main = jax.process_index() == 0

    local_batch = sharding.check_batch_size(config.batch_size, mesh)
    spec = resolve.resolve_data_spec(config.data)
    total_steps, warmup_steps, steps_per_epoch = steps_and_warmup(config, spec.num_clips)
    run_progress.total_steps = total_steps
    input_shape = methods.input_shape(method_cls, spec.frontend, spec.crop_frames)
    method = method_cls(config.model, input_shape=input_shape, steps_per_epoch=steps_per_epoch or None)
    methods.check_data(config.method, method, spec)  # e.g. precomputed EnCodec targets for EncodecMAE only
    logging.info("%s on %d devices (%d processes): %d steps (%d per epoch), batch %d, %d clips",
                 config.method, mesh.devices.size, jax.process_count(), total_steps, steps_per_epoch,
                 config.batch_size, spec.num_clips)

    rng = jax.random.key(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    schedule = optim.learning_rate_schedule(config.optim, global_batch_size=config.batch_size,
                                            total_steps=total_steps, warmup_steps=warmup_steps)
    repl = sharding.replicated(mesh)

    def init_state(init_rng):
        return init_train_state(method, config.optim, schedule, init_rng)

    abstract_state = jax.eval_shape(init_state, init_rng)
    tx = optim.make_optimizer(config.optim, schedule, method.weight_decay_mask(abstract_state["params"]))
    n_params = sum(x.size for x in jax.tree.leaves(abstract_state["params"]))
    logging.info("trainable parameters: %.2fM", n_params / 1e6)

    # Waveform methods (EncodecMAE) take raw crops, as the device front end does.
    device_frontend = bool(config.data.get("device_frontend", False)) or methods.input_kind(method) == "waveform"
    num_workers = config.data.get("num_workers", 0)
    manager = checkpointing.manager_from_config(workdir, config)
    latest, saved_meta, restored_state = _latest_intact_checkpoint(
        manager, config, spec, checkpointing.abstract_like(abstract_state, repl), workdir=workdir)
    if is_main:  # after the checks, so that a refused resume leaves the run's config.json as it was
        storage.write_atomically(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=1))
    # The data position is decided before the iterator is built: after a change of process count the
    # Grain state cannot be restored and the stream is rebuilt from the step (see pipeline.plan_resume).
    position, restore_iterator = pipeline.plan_resume(
        saved_meta.get("data_position"), latest or 0, global_batch_size=config.batch_size,
        process_count=jax.process_count(), num_workers=num_workers)
    ds = pipeline.make_dataset(spec, batch_size=local_batch, seed=config.seed, process_index=jax.process_index(),
                               process_count=jax.process_count(), device_frontend=device_frontend,
                               start_batch=position["start_batch"])
    data_iter = pipeline.make_iterator(ds, num_workers=num_workers,
                                       worker_buffer_size=config.data.get("worker_buffer_size", 2),
                                       read_threads=config.data.get("read_threads", 0))
    if latest is not None:
        state = restored_state
        if restore_iterator:
            checkpointing.restore_data_iterator(manager, latest, data_iter)
        logging.info("resumed from step %d in %s", latest, checkpointing.checkpoint_dir(workdir))
        if config.get("init_from"):
            logging.warning("config.init_from=%s ignored: the run resumes from its own checkpoint (step %d)",
                            config.init_from, latest)
    else:
        if getattr(method, "jit_init", True):
            state = jax.jit(init_state, out_shardings=repl)(init_rng)
        else:  # a method whose init holds large host arrays (frozen networks) that should not become constants
            state = jax.device_put(init_state(init_rng), repl)
        if config.get("init_from"):
            state = _state_from_weights(config.init_from, method, tx, state, init_rng, repl)
    start_step = int(state["step"])
    counters = run_summary.RunCounters(saved_meta.get("counters"))
    run_progress.counters, run_progress.trained_step, run_progress.committed_step = counters, start_step, latest

    train_step = jax.jit(
        make_train_step(method, tx, schedule, spec, device_frontend=device_frontend, total_steps=total_steps),
        donate_argnums=(0,), out_shardings=(repl, repl), static_argnums=(3,))
    mask_variant = getattr(method, "mask_variant", lambda step: None)
    meta = {**_run_meta(config, spec, total_steps), "data_position": position}
    periodic_evals, eval_encoder = (_periodic_evaluations(config, method, spec, input_shape, state) if is_main
                                    else ([], None))
    writer = metrics_lib.MetricWriter(workdir, enabled=is_main, tensorboard=config.get("tensorboard", True),
                                      start_step=start_step)
    progress = metrics_lib.Progress(first_step=start_step, total_steps=total_steps,
                                    global_batch_size=config.batch_size)
    log_every = max(1, int(config.log_every_steps))

    def save(step, state, *, force):
        return checkpointing.save(manager, step, state, data_iter, {**meta, "counters": counters.as_dict()},
                                  force=force)

    def committed_step():
        checkpointing.wait_for_saves(manager)  # so that the checkpoint a message names is committed
        return manager.latest_step()

    last_logged: dict = {}
    step = start_step
    preempted = False
    watcher = checkpointing.PreemptionWatcher().install()
    profiler = profiling.StepProfiler(profile_window, workdir, first_step=start_step)
    logging.info("compiling the train step (the first step takes longer)")
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            batch = sharding.to_global_batch(next(data_iter), mesh)
            data_wait_s = time.perf_counter() - t0
            profiler.before_step(step)
            state, device_metrics = train_step(state, batch, train_rng, mask_variant(step))
            step_metrics.add(device_metrics, data_wait_s=data_wait_s)
            step += 1
            profiler.after_step(step, state)
            stop = should_stop(step, total_steps=total_steps, stop_after=stop_after,
                               preemption_requested=lambda: watcher.requested or manager.reached_preemption(step))
            preempted = stop.preempted
            log_due = step % log_every == 0 or stop.last_step
            if log_due or manager.should_save(step):
                last_logged = step_metrics.row(step, committed_step=committed_step)
                counters.add(last_logged)
                last_logged.update(_loop_columns(step, method, steps_per_epoch=steps_per_epoch,
                                                 total_steps=total_steps, progress=progress))
                if log_due:
                    writer.write(step, last_logged)
                    metrics_lib.log_progress(progress, step, last_logged)
            if stop.last_step or manager.should_save(step):
                writer.flush()  # a URL workdir's metrics reach it before the checkpoint that a resume starts from
            saved = save(step, state, force=stop.last_step)
            # No evaluation on preemption: the grace period before SIGKILL is for the checkpoint.
            due = [(name, ev) for name, every, ev in periodic_evals
                   if (step % every == 0 or stop.last_step) and not preempted]
            if due:
                checkpointing.wait_for_saves(manager)  # an evaluation never overlaps a checkpoint write
                writer.write(step, _evaluate(due, eval_encoder, method, state, step))
                if watcher.requested and not stop.last_step:  # the signal came during the evaluation
                    preempted = True
                    if not saved:
                        writer.flush()
                        save(step, state, force=True)
            if preempted:
                logging.warning("preemption signal at step %d: checkpoint saved, exiting", step)
                break
            if stop_after is not None and step >= stop_after:
                break
    finally:
        profiler.close()
        watcher.uninstall()
        run_progress.trained_step, run_progress.preempted = step, preempted
        try:
            checkpointing.wait_for_saves(manager)  # async saves are committed (or their failure raised)
        finally:
            run_progress.committed_step = run_summary.committed_step_on_disk(workdir)
            manager.close()
            writer.close()
    return {**last_logged, "preempted": 1.0} if preempted else last_logged


def _latest_intact_checkpoint(manager, config, spec, abstract_state, *, workdir: str):
    """(step, meta, state) of the latest checkpoint of `workdir` that reads back as saved (damaged ones are moved
    aside), after checking that `config` and the data may resume it; (None, {}, None) for a new run."""
    latest = manager.latest_step()
    saved_meta = checkpointing.restore_meta_item(manager, latest) if latest is not None else {}
    resume_check.check(saved_meta.get("config"), config, step=latest, workdir=workdir)
    if latest is None:
        return None, saved_meta, None
    resume_check.check_data(saved_meta, norm_stats=(spec.norm_mean, spec.norm_std),
                            identity=resume_check.data_identity(spec.manifest), config=config, step=latest,
                            workdir=workdir)
    intact, state, _ = checkpointing.restore_latest_intact(manager, abstract_state, move_damaged=True)
    if intact != latest:
        latest, saved_meta = intact, checkpointing.restore_meta_item(manager, intact)
    return latest, saved_meta, state


def _loop_columns(step: int, method, *, steps_per_epoch: int, total_steps: int, progress) -> dict[str, float]:
    """The logged row's columns that come from the loop, not the step: epoch, the EMA decay of the step just
    taken (methods with one) and progress (clips/s, ETA)."""
    columns = {"epoch": step / steps_per_epoch if steps_per_epoch else 0.0}
    if hasattr(method, "ema_decay"):
        columns["ema_decay"] = float(method.ema_decay(step - 1, total_steps))
    columns.update(progress.update(step))
    return columns


def _periodic_evaluations(config, method, spec, input_shape, state) -> tuple[list, object]:
    """([(name, every_steps, evaluator)], the encoder they share) for `config.evals`; ([], None) without any.
    The encoder is built once (one compile); its params are swapped for the current ones at each evaluation."""
    if not config.get("evals"):
        return [], None
    from audiojepa.adapters import encoder as encoder_lib
    from audiojepa.evaluation import evaluators

    periodic_evals = evaluators.from_config(config.evals, sample_rate=spec.frontend.sample_rate,
                                            num_layers=method.encoder_depth)
    eval_encoder = encoder_lib.AudioEncoder(
        config.method, config.model, input_shape, spec.frontend, (spec.norm_mean, spec.norm_std),
        jax.device_get(methods.encoder_params(method, state["params"], state["target_params"])))
    return periodic_evals, eval_encoder


def _evaluate(due, eval_encoder, method, state, step: int) -> dict[str, float]:
    """The `eval/<name>/<metric>` row of the evaluations `due` ([(name, evaluator)]) of the current params."""
    eval_encoder.params = jax.device_get(methods.encoder_params(method, state["params"], state["target_params"]))
    row = {}
    for name, evaluator in due:
        row.update(_run_periodic_eval(name, evaluator, eval_encoder, step))
    logging.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return row
