"""Meshes, shardings and multi-process start-up: the same train step on 1 CPU, 8 fake CPUs, a GPU or many hosts.

The mesh has two axes, `data` and `fsdp`. The batch is split over both (every device
sees different rows); parameters and optimizer state are replicated over `data` and,
when `fsdp > 1`, split along their largest axis that `fsdp` divides (ZeRO-3 style: XLA
inserts the all-gathers and reduce-scatters). Leaves with no divisible axis stay
replicated. Nothing here knows about models: shardings are derived from shapes.
"""

from __future__ import annotations

import os
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxseq.config import DistributedConfig, MeshConfig
from jaxseq.errors import ConfigError, ShapeError

BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed(config: DistributedConfig = DistributedConfig()) -> bool:
    """Call `jax.distributed.initialize` when the run spans several processes. Returns whether it did.

    Must run before any JAX computation. On CPU the cross-process collectives are gloo.
    """
    coordinator = config.coordinator or os.environ.get("JAXSEQ_COORDINATOR", "")
    num = config.num_processes or int(os.environ.get("JAXSEQ_NUM_PROCESSES", "0") or 0)
    pid = config.process_id if config.process_id >= 0 else int(os.environ.get("JAXSEQ_PROCESS_ID", "-1") or -1)
    if num <= 1 and not coordinator:
        return False
    if jax.distributed.is_initialized():  # a second train() in the same processes
        return True
    if not coordinator or num <= 1 or pid < 0:
        raise ConfigError(
            "a multi-process run needs all three of coordinator address, num_processes (> 1) and process_id "
            f"(got coordinator={coordinator!r}, num_processes={num}, process_id={pid}); set --dist.* or the "
            "JAXSEQ_COORDINATOR / JAXSEQ_NUM_PROCESSES / JAXSEQ_PROCESS_ID environment variables."
        )
    # Required for cross-process collectives between CPU devices; ignored by GPU/TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid)
    return True


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    data, fsdp = config.data, config.fsdp
    if data == -1 and fsdp == -1:
        raise ConfigError("mesh: at most one of --mesh.data and --mesh.fsdp may be -1.")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data < 1 or fsdp < 1 or data * fsdp != n:
        raise ConfigError(
            f"--mesh.data {config.data} x --mesh.fsdp {config.fsdp} does not fit the {n} available devices; "
            f"choose sizes whose product is {n} (or -1 for one of them). For fake CPU devices set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported."
        )
    return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _leaf_spec(shape, fsdp: int) -> P:
    if fsdp == 1 or not shape:
        return P()
    candidates = [i for i, n in enumerate(shape) if n % fsdp == 0 and n >= fsdp]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: shape[i])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def state_shardings(mesh: Mesh, tree):
    """NamedShardings for a pytree of arrays (params, optimizer state, TrainState): FSDP by shape."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, _leaf_spec(np.shape(x), fsdp)), tree)


def check_batch_divisible(batch_size: int, mesh: Mesh, *, flag: str = "batch_size"):
    """flag: how the user sets the batch size (e.g. --char-lm.batch-size), named in the error."""
    n = mesh.size
    if batch_size % n:
        raise ConfigError(
            f"{flag} {batch_size} must be divisible by the {n} devices of the mesh "
            f"(each device takes batch_size / {n} rows); use a multiple of {n}."
        )


def process_rows(batch_size: int, *, flag: str = "batch_size") -> slice:
    """The rows of the global batch that this process feeds (contiguous, in process order)."""
    count = jax.process_count()
    if batch_size % count:
        raise ConfigError(f"{flag} {batch_size} must be divisible by the {count} processes.")
    per = batch_size // count
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Turn this process's rows of the global batch (host NumPy) into global arrays split over the mesh.

    In a single process that is simply `device_put` with the batch sharding.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    out = {}
    for name, local in batch.items():
        local = np.asarray(local)
        if local.ndim == 0:
            raise ShapeError(f"batch[{name!r}] is a scalar; every batch entry needs a leading batch axis.")
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out

