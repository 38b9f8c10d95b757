"""Device mesh and batch placement for data parallelism.

One mesh axis, `data`, over every device of every process. Parameters and optimizer state are
replicated; batches are split along their leading axis. Each process feeds its own slice of the
global batch (`jax.make_array_from_process_local_data`), so the same code runs on one CPU, one GPU
node or a TPU pod.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh (`data`) over all devices (or the first `num_devices`, single process only)."""
    devices = jax.devices()
    if num_devices is not None:
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError("num_devices must be left unset in a multi-process run")
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"num_devices={num_devices}; this process sees {len(devices)} devices")
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Explicit,), devices=devices)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh, key: str = "config.batch_size") -> int:
    """Returns the per-process batch size; errors name `key` when the batch does not divide."""
    n = mesh.devices.size
    if global_batch_size % n:
        raise ValueError(f"{key}={global_batch_size} is not divisible by the {n} devices of the mesh")
    if global_batch_size % jax.process_count():
        raise ValueError(f"{key}={global_batch_size} is not divisible by {jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def to_global_batch(local_batch: dict, mesh) -> dict:
    """This process's batch (NumPy, leading axis = local examples) -> globally sharded jax.Arrays."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
