"""Orbax checkpoints of a run: `latest` (resume) and `best` (by validation loss or accuracy).

Both hold a Composite of the TrainState (StandardSave) and a JSON `meta` (epoch, Grain
iterator position, early-stopping counters, config). Orbax writes to a temporary directory and
renames it when complete, so a kill at any moment leaves either the old or the new checkpoint,
never a torn one; `cleanup_tmp_directories` removes leftovers of a killed save on start.
"""
from __future__ import annotations

import dataclasses
import os
import shutil

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cars_jax.distributed import host_local

from cars_jax.steps import TrainState


def checkpoint_managers(workdir: str, best_metric: str = 'val_loss'
                        ) -> tuple[ocp.CheckpointManager, ocp.CheckpointManager]:
    """`latest` (the 2 newest, for resume) and `best` (the 1 best by `best_metric`: val_loss
    is minimised, val_accuracy maximised; it must be the metric the loop saves on, else
    Orbax would keep an older checkpoint over a newer, "improved" one)."""
    if best_metric not in ('val_loss', 'val_accuracy'):
        raise ValueError(f'best_metric must be val_loss or val_accuracy, got {best_metric!r}')
    latest = latest_manager(workdir)
    best = ocp.CheckpointManager(
        _manager_dir(workdir, 'best'), item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m[best_metric],
            best_mode='min' if best_metric == 'val_loss' else 'max',
            keep_checkpoints_without_metrics=False, create=True, cleanup_tmp_directories=True,
            multiprocessing_options=_barrier_prefix('best')))
    return latest, best


def latest_manager(workdir: str) -> ocp.CheckpointManager:
    """workdir/checkpoints/latest: the 2 newest checkpoints, to resume from."""
    return ocp.CheckpointManager(
        _manager_dir(workdir, 'latest'), item_handlers=_handlers(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=2, create=True, cleanup_tmp_directories=True,
            multiprocessing_options=_barrier_prefix('latest')))


def _manager_dir(workdir: str, name: str) -> str:
    return os.path.join(os.path.abspath(workdir), 'checkpoints', name)


def _barrier_prefix(name: str) -> ocp.options.MultiprocessingOptions:
    # Multi-process: both managers save the same step at the end of an epoch, and Orbax's
    # cross-process barriers are named by step; a prefix per manager keeps them apart.
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


def _handlers() -> dict:
    # Named up front so `item_metadata` can read a checkpoint's tree in a fresh process
    # (restore_checkpoint matches fields against it).
    return {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}


def save_checkpoint(mgr: ocp.CheckpointManager, state: TrainState, meta: dict, metrics: dict | None = None,
          overwrite: bool = False) -> None:
    """Atomic Orbax save of (state, meta) at the state's step; `overwrite` replaces a
    mid-epoch checkpoint of the same step by the end-of-epoch one."""
    step = int(host_local(state.step))
    if step in mgr.all_steps():
        if not overwrite:
            return
        mgr.wait_until_finished()
        if jax.process_count() == 1:
            _delete_atomically(mgr, step)
        else:   # one process deletes, every process waits for it and re-reads the folder
            if jax.process_index() == 0:
                _delete_atomically(mgr, step)
            multihost_utils.sync_global_devices(f'cars_jax_delete_{step}')
            mgr.reload()
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           meta=ocp.args.JsonSave(meta)), metrics=metrics)


def _delete_atomically(mgr: ocp.CheckpointManager, step: int) -> None:
    """Deletes a step by first renaming it to an Orbax temporary name: a kill during the
    (non-atomic) rmtree leaves a folder that cleanup_tmp_directories removes on the next
    start, never a torn step that would be taken for the latest checkpoint."""
    path = os.path.join(os.fspath(mgr.directory), str(step))
    if not os.path.isdir(path):  # another step name format: Orbax's own delete
        mgr.delete(step)
        return
    trash = f'{path}.orbax-checkpoint-tmp-deleted'
    if os.path.exists(trash):  # left by an earlier kill (normally cleaned on start)
        shutil.rmtree(trash)
    os.rename(path, trash)
    mgr.reload()
    shutil.rmtree(trash)


def restore_checkpoint(mgr: ocp.CheckpointManager, state: TrainState, step: int | None = None
                       ) -> tuple[TrainState, dict]:
    """Restores (state, meta) of `step` (default latest) into the structure of `state`.

    The fields are matched against the tree on disk first: a checkpoint written before a
    TrainState field existed (`ema`, added after the first release) has no entry for it, and restores
    into a state that leaves that field None; a field the state needs but the checkpoint lacks
    (or the reverse) is a ValueError naming it, not Orbax's tree-structure mismatch."""
    step = mgr.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    on_disk = _state_tree_on_disk(mgr, step)
    fields = [f.name for f in dataclasses.fields(state) if f.metadata.get('pytree_node', True)]
    where = os.path.join(os.fspath(mgr.directory), str(step))
    for name in fields if on_disk is not None else ():
        ours_none, theirs_none = getattr(state, name) is None, on_disk.get(name) is None
        if theirs_none and not ours_none:   # absent (older layout) or saved as None
            raise ValueError(f'the checkpoint {where} has no {name!r} (written by a run without '
                             f'it, or before the field existed), but this config needs one; '
                             f'use the settings it was made with (for ema: --config.ema_decay=0) '
                             f'or a new --workdir.')
        if ours_none and not theirs_none:
            raise ValueError(f'the checkpoint {where} has {name!r} but this config keeps none; '
                             f'use the settings it was made with (for ema: its ema_decay).')
    present = fields if on_disk is None else [n for n in fields if n in on_disk]
    item = abstract if present == fields else {n: getattr(abstract, n) for n in present}
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item),
                                                   meta=ocp.args.JsonRestore()))
    restored = out['state']
    if not isinstance(restored, TrainState):    # fields missing on disk: keep the state's None
        restored = state.replace(**restored)
    return restored, out['meta']


def _state_tree_on_disk(mgr: ocp.CheckpointManager, step: int) -> dict | None:
    """The top level of the saved TrainState tree ({field: metadata or None}), or None where
    Orbax cannot say (then the restore itself checks the structure)."""
    try:
        tree = getattr(mgr.item_metadata(step)['state'], 'tree', None)
    except (KeyError, TypeError, ValueError, FileNotFoundError):
        return None
    return dict(tree) if isinstance(tree, dict) else None
