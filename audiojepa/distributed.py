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
    for key in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(env.get(key, "1") or 1) > 1:
            return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))


def maybe_initialize() -> None:
    """Calls `jax.distributed.initialize()` in a multi-process job; a no-op on a single host.

    With JAX_COORDINATOR_ADDRESS set, JAX_NUM_PROCESSES and JAX_PROCESS_ID give the rest (as for a
    bare multi-node GPU job or a localhost test); SLURM, Open MPI and TPU pods are auto-detected.
    """
    if not is_multi_process_environment():
        return
    kwargs = {}
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = dict(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                      process_id=int(os.environ["JAX_PROCESS_ID"]))
    jax.distributed.initialize(**kwargs)
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
