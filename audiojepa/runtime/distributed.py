"""Multi-process start-up: `jax.distributed.initialize()` when the environment is a multi-host job."""

from __future__ import annotations

import logging
import os

import jax


def is_multi_process_environment(env=None) -> bool:
    """True under a multi-process SLURM / Open MPI job, a multi-host TPU slice, an explicit
    JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID), or AUDIOJEPA_DISTRIBUTED=1
    (set by launch/tpu_pod.py: on Cloud TPU VMs the slice is found through the metadata server,
    which JAX's own detection queries)."""
    env = os.environ if env is None else env
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("AUDIOJEPA_DISTRIBUTED", "0") not in ("", "0"):
        return True
    # SLURM: the tasks of this job step (srun sets SLURM_STEP_NUM_TASKS). SLURM_NTASKS is the allocation's,
    # also set in a batch script or an salloc shell where python runs once: initializing there would
    # wait forever for processes that never start.
    slurm_key = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    for key in (slurm_key, "OMPI_COMM_WORLD_SIZE"):
        if int(env.get(key, "1") or 1) > 1:
            return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def explicit_cluster_args(env) -> dict:
    """jax.distributed.initialize's arguments from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID ({} without the address: JAX detects the cluster); a missing or non-integer one is an
    error naming it."""
    if not env.get("JAX_COORDINATOR_ADDRESS"):
        return {}
    values = {}
    for key in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        try:
            values[key] = int(env[key])
        except (KeyError, ValueError):
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={env['JAX_COORDINATOR_ADDRESS']} is set, so {key} must be "
                             f"too (an int; got {env.get(key)!r}): JAX_NUM_PROCESSES is the number of processes "
                             "and JAX_PROCESS_ID this one's index, 0 … N-1.") from None
    return dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"], num_processes=values["JAX_NUM_PROCESSES"],
                process_id=values["JAX_PROCESS_ID"])


def maybe_initialize() -> None:
    """Calls `jax.distributed.initialize()` in a multi-process job; a no-op on a single host.

    With JAX_COORDINATOR_ADDRESS set, JAX_NUM_PROCESSES and JAX_PROCESS_ID give the rest (as for a
    bare multi-node GPU job or a localhost test); SLURM, Open MPI and TPU pods are auto-detected.
    """
    if not is_multi_process_environment():
        return
    jax.distributed.initialize(**explicit_cluster_args(os.environ))
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
