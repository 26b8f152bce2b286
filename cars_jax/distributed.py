"""Several processes (hosts) training one model: `jax.distributed` + each process reads its rows.

The engine is JAX's own: `jax.distributed.initialize` connects the processes, `jax.devices()`
then lists every process's devices, and one `Mesh` over all of them makes the jitted step
(`steps.make_steps`) all-reduce gradients and BatchNorm statistics across hosts. What this module
adds is the data side, kept out of the math:

* every process computes the same global epoch order (`pipeline.epoch_indices` is a function of
  (seed, epoch)) and keeps its own contiguous rows of each global batch (`shard_rows`), so
  process p decodes and augments only B / P images per step and the global batch is exactly the
  single-process one;
* `global_batch` assembles the processes' rows into one array sharded over the mesh;
* `host_local` reads a replicated result (metrics, eval sums, the state for reports) back as
  numpy on each process, and `replicate` turns one process's host values into an array
  replicated over the whole mesh (the same values on every process: the same seed).

Only process 0 writes logs, metrics, plots and reports; Orbax writes checkpoints once, with
every process taking part in each save and restore, as it requires.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1,
               local_device_ids: str = '') -> bool:
    """Starts `jax.distributed` when asked to; returns whether this is a multi-process run.

    Explicit flags win; else JAX's own cluster detection (SLURM, Open MPI, ...) applies when
    the process was started by such a launcher with more than one task; else nothing happens
    (one process). On CPU the cross-process collectives use gloo."""
    explicit = bool(coordinator_address) or num_processes > 1
    launcher = int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1 or int(
        os.environ.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1
    if not explicit and not launcher:
        return False
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu' or not _has_accelerator_plugin():
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    kwargs: dict[str, Any] = {}
    if coordinator_address:
        kwargs['coordinator_address'] = coordinator_address
    if num_processes > 0:
        kwargs['num_processes'] = num_processes
    if process_id >= 0:
        kwargs['process_id'] = process_id
    if local_device_ids:
        kwargs['local_device_ids'] = [int(i) for i in local_device_ids.split(',')]
    jax.distributed.initialize(**kwargs)
    return jax.process_count() > 1


def _has_accelerator_plugin() -> bool:
    import importlib.util
    return any(importlib.util.find_spec(m) is not None
               for m in ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'libtpu', 'jax_rocm60_plugin'))


def shard_rows(indices: np.ndarray, batch_size: int, process_index: int,
               process_count: int) -> np.ndarray:
    """This process's rows of every global batch: `indices` (global order, whole batches of
    batch_size and possibly one last partial batch) -> its share, batch after batch. Each
    process takes a contiguous 1 / process_count of every batch, the partial one included
    (its size must divide by process_count: `pipeline.epoch_batch_sizes` makes it so)."""
    if process_count == 1:
        return indices
    if batch_size % process_count:
        raise ValueError(f'--config.batch_size={batch_size} must be divisible by the '
                         f'{process_count} processes.')
    indices = np.asarray(indices)
    full = len(indices) // batch_size * batch_size
    local = batch_size // process_count
    rows = indices[:full].reshape(-1, batch_size)
    head = rows[:, process_index * local:(process_index + 1) * local].reshape(-1)
    tail = indices[full:]
    if len(tail) % process_count:
        raise ValueError(f'a last batch of {len(tail)} rows does not split over '
                         f'{process_count} processes.')
    return np.concatenate([head, tail.reshape(process_count, -1)[process_index]])


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process's rows -> one batch array per key, sharded over the mesh's 'data' axis."""
    sharding = NamedSharding(mesh, P('data'))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def host_local(tree: Any) -> Any:
    """numpy copies of replicated arrays (each process holds the whole value)."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x) if isinstance(x, jax.Array) else x
    return jax.tree.map(one, tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values (identical on every process) -> arrays replicated over the whole mesh."""
    sharding = NamedSharding(mesh, P())

    def one(x):
        if not isinstance(x, (jax.Array, np.ndarray, np.generic)):
            return x
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
    return jax.tree.map(one, tree)
