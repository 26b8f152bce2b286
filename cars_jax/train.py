"""The training loop: the impure edge around the pure steps.

A run, phase by phase (`train_and_evaluate`): prepare the data and the run directory, set up
(state, mesh, jitted steps, checkpoint managers), resume from the latest checkpoint, train the
epochs left, report the best checkpoint.

Per epoch: the class-weighted Grain loader feeds `train_step`; `eval_step` runs over the
validation split; one log line, a line of `metrics.jsonl` and a redrawn `curves.png`.
Checkpoints (Orbax, atomic):
  workdir/checkpoints/latest  every epoch (+ every N steps, + on SIGINT/SIGTERM) for resume;
                              holds the state, the Grain iterator position, the epoch, the
                              early-stopping counters and the config.
  workdir/checkpoints/best    kept by Orbax's `best_fn` on `early_stopping_metric` (validation
                              loss, the seed's, or accuracy); written only on a min_delta
                              improvement (the seed's early-stopping rule).
The RNG of step s is fold_in(PRNGKey(seed), s): seed and step are in the checkpoint, so a
resumed run draws the same MixUp/dropout randomness as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
import numpy as np

from cars_jax.config import (ConfigError, incompatible_fields, read_run_config, run_config_json,
                             validate_config)
from cars_jax.console import Reporter, StopSignal, closed_on_error, fmt_time
from cars_jax.data import pipeline
from cars_jax.data.augment import AugmentConfig
from cars_jax.data.dataset import DataBundle, build_data
from cars_jax.data.sources import format_skipped
from cars_jax.checkpoints import checkpoint_managers, restore_checkpoint, save_checkpoint
from cars_jax.evaluate import evaluate, full_report
from cars_jax.fileio import atomic_write_text, ensure_writable_dir, write_json_atomic
from cars_jax.mixup import mixing_mode
from cars_jax.plots import plot_curves
from cars_jax.pretrain import load_pretrained_backbone
from cars_jax.schedules import progressive_image_size
from cars_jax.tensorboard import open_run_writer
from cars_jax.data.cache import build_cache, cache_size_for
from cars_jax.distill import load_teacher
from cars_jax.distributed import global_batch, host_local, replicate
from cars_jax.steps import (TrainState, augment_on_device, create_train_state, data_parallel_mesh,
                            make_steps, mix_hyperparameters, replicated_sharding)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, incompatible workdir): the message says why."""


# ---- a run, phase by phase --------------------------------------------------------------------

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       data: DataBundle | None = None, stop_after_steps: int | None = None,
                       quiet: bool = False) -> dict[str, Any]:
    """Trains (or resumes) in `workdir`; returns the final report of the best checkpoint.

    stop_after_steps: behave as if preempted once the global step reaches it (tests, and
    time-boxed jobs): save, and return with report['interrupted'] = True. A start that fails
    (bad data, ...) leaves no empty run directory behind; one that existed is kept.
    """
    validate_config(config)
    made = _make_workdir(workdir)
    try:
        return _train_and_evaluate(config, workdir, data, stop_after_steps, quiet)
    except BaseException:
        _remove_if_empty(made)
        raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, data: DataBundle | None,
                        stop_after_steps: int | None, quiet: bool) -> dict[str, Any]:
    log = Reporter(workdir, quiet, primary=jax.process_index() == 0)
    data = _prepare_data(config, workdir, data, log)
    run, state = _setup(config, workdir, data, log)
    state, progress = _resume(run, state)
    history = _read_history(run.history_path, upto_epoch=progress.epoch, rewrite=run.primary)
    tb = open_run_writer(run.primary and config.tensorboard, workdir, _step(state))
    _log_start(run, state)

    state, interrupted = _train_epochs(run, state, progress, history, tb, stop_after_steps)
    run.latest_mgr.wait_until_finished()
    run.best_mgr.wait_until_finished()
    if interrupted:
        for closeable in (run.latest_mgr, run.best_mgr, tb):
            closeable.close()
        return {'interrupted': True, 'step': _step(state)}

    report = _final_report(run, state, history)
    tb.final(report, os.path.join(workdir, 'eval'), _step(state))
    for closeable in (tb, run.latest_mgr, run.best_mgr):
        closeable.close()
    return report


# ---- setup and resume -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Run:
    """What the phases of one run share, fixed once it is set up."""
    config: ml_collections.ConfigDict
    workdir: str
    data: DataBundle
    log: Reporter
    steps_per_epoch: int
    aug: AugmentConfig
    base_rng: jax.Array
    mesh: Any                  # data-parallel mesh over every device; None on one device
    cache: Any                 # the decode-once cache (augmentation on the device), else None
    train_fn: _FirstCallTimer
    eval_fn: _FirstCallTimer
    latest_mgr: Any
    best_mgr: Any
    teacher: Any = None        # the distillation teacher's variables (config.distill_from)

    @property
    def primary(self) -> bool:   # process 0 writes the run's files
        return self.log.primary

    @property
    def multi(self) -> bool:     # several processes: each reads its rows of every global batch
        return jax.process_count() > 1

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.num_epochs

    @property
    def history_path(self) -> str:
        return os.path.join(self.workdir, 'metrics.jsonl')


def _prepare_data(config: ml_collections.ConfigDict, workdir: str, data: DataBundle | None,
                  log: Reporter) -> DataBundle:
    """The data (built from the config unless given), checked against what `workdir` was
    trained on; the config, class names and skipped files written beside the run."""
    data = data if data is not None else build_data(config)
    _check_workdir(workdir, config, data.class_names)
    if log.primary:
        write_json_atomic(os.path.join(workdir, 'config.json'), run_config_json(config),
                          indent=2)
        write_json_atomic(os.path.join(workdir, 'class_names.json'), data.class_names, indent=2)
    if data.skipped and log.primary:
        write_json_atomic(os.path.join(workdir, 'skipped_files.json'), data.skipped, indent=2)
        log(f'Skipped {len(data.skipped)} unreadable files (list: {workdir}/skipped_files.json).')
        for line in format_skipped(data.skipped, limit=5).splitlines()[1:]:
            log(line)
    for note in data.notes:
        log(note)
    return data


def _setup(config: ml_collections.ConfigDict, workdir: str, data: DataBundle,
           log: Reporter) -> tuple[_Run, TrainState]:
    """A fresh TrainState, the mesh, the decode-once cache, the jitted steps and the
    checkpoint managers."""
    # Data parallel over every device of every process (batch split, state replicated); one
    # device: plain jit. Several processes: each reads its rows of every global batch.
    mesh = data_parallel_mesh() if jax.device_count() > 1 else None
    steps_per_epoch = pipeline.steps_per_epoch(len(data.train), config.batch_size,
                                               config.max_steps_per_epoch,
                                               config.drop_last_batch,
                                               _num_devices(mesh))
    if steps_per_epoch == 0:
        raise ConfigError(f'--config.batch_size={config.batch_size}: the {len(data.train)} '
                          'training images do not fill one batch; use a smaller batch.')
    aug = AugmentConfig.from_config(config)
    init_rng, base_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = create_train_state(config, init_rng, len(data.class_names), steps_per_epoch)
    if jax.process_count() > 1:
        state = replicate(state, mesh)
    else:   # committed where the steps expect it: a fresh and a resumed run share one program
        state = jax.device_put(state, replicated_sharding(mesh))
    on_device = augment_on_device(config.augment_on, jax.default_backend())
    cache = None
    if on_device:
        cache = build_cache(data.train, cache_size_for(config.image_size, config.cache_size),
                            cache_dir=_cache_dir(config, workdir), name='train',
                            use_bbox=config.use_bbox, bbox_margin=config.bbox_margin, log=log)
    teacher, teacher_apply = None, None
    if config.distill_from:
        teacher, teacher_apply = load_teacher(config, data.class_names, not data.val_is_test)
        teacher = replicate(teacher, mesh) if jax.process_count() > 1 else teacher
        log(f'Distillation from the best checkpoint of {config.distill_from} (weight '
            f'{config.distill_weight}, temperature {config.distill_temperature}).')
    if config.cskd_weight > 0:
        log(f'Class-wise self-distillation (CS-KD): each image also fits the net\'s prediction '
            f'on another image of its class (weight {config.cskd_weight}, temperature '
            f'{config.cskd_temperature}; one more forward pass per step).')
    train_fn, eval_fn = make_steps(config, mesh, device_aug=aug if on_device else None,
                                   teacher_apply=teacher_apply)
    latest_mgr, best_mgr = checkpoint_managers(workdir, config.early_stopping_metric)
    run = _Run(config, workdir, data, log, steps_per_epoch, aug, base_rng, mesh, cache,
               _FirstCallTimer(train_fn), _FirstCallTimer(eval_fn), latest_mgr, best_mgr,
               teacher)
    return run, state


def _num_devices(mesh) -> int:
    """The devices a batch is split over (a last partial batch is cut to a multiple)."""
    return 1 if mesh is None else mesh.size


def _resume(run: _Run, state: TrainState) -> tuple[TrainState, Progress]:
    """The state and progress of the latest checkpoint, or `state` and a fresh Progress."""
    config, workdir, log = run.config, run.workdir, run.log
    if run.latest_mgr.latest_step() is None:
        if config.pretrained_backbone:
            state = load_pretrained_backbone(state, config, holdout=not run.data.val_is_test)
            log(f'The backbone starts from the self-supervised pretraining in '
                f'{config.pretrained_backbone} (the classifier from scratch).')
        return state, Progress()
    state, meta = _restore_resumable(run.latest_mgr, state, workdir, log)
    progress = Progress(**meta['progress'])
    stopped_early = progress.epoch < config.num_epochs
    if progress.finished and not (stopped_early and progress.bad_epochs < config.patience):
        log(_finished_message(workdir, progress, config, stopped_early))
    else:
        log(f'Resumed from {workdir} at step {_step(state)} (epoch {progress.epoch + 1}).')
    if (progress.finished and progress.epoch < config.num_epochs
            and progress.bad_epochs < config.patience):
        # Stopped early under a smaller patience: the same trajectory goes on from there.
        progress.finished = False
        log(f'The run stopped early after epoch {progress.epoch} ({progress.bad_epochs} '
            f'epochs without improvement); with --config.patience={config.patience} it '
            f'continues to epoch {config.num_epochs}.')
    return state, progress


def _log_start(run: _Run, state: TrainState) -> None:
    config, data, log = run.config, run.data, run.log
    log(f'cars_jax: {len(data.class_names)} classes, {data.describe()}; '
        f'{run.steps_per_epoch} steps/epoch x {config.num_epochs} '
        f'epochs, batch {config.batch_size}, {config.image_size}px, on {jax.devices()[0].platform}, '
        f'augmentation on the '
        f'{"device (decode-once cache)" if run.cache is not None else "host (per image)"}. '
        f'Train accuracy is measured on augmented images against the original labels, '
        f'including {_mixing_name(config)} batches ({config.mixup_prob:.0%} of batches), '
        f'as the seed did.')
    if state.ema is not None:
        log(f'EMA of the weights (decay {state.ema_decay}): validation, the best checkpoint and '
            f'the reports use the averaged weights; train loss/accuracy are the live weights\'.')


# ---- the epochs -------------------------------------------------------------------------------

def _train_epochs(run: _Run, state: TrainState, progress: Progress, history: list[dict], tb,
                  stop_after_steps: int | None) -> tuple[TrainState, bool]:
    """The epochs left. Returns the last state and whether the run was stopped before its end
    (Ctrl-C, SIGTERM, stop_after_steps), with a checkpoint saved to resume from."""
    stopper = StopSignal()
    started = (time.time(), _step(state))
    with stopper.installed(), closed_on_error(run.latest_mgr, run.best_mgr, tb):
        while not progress.finished and progress.epoch < run.config.num_epochs:
            state, meter, stopped = _train_epoch(run, state, progress, tb, stopper,
                                                 stop_after_steps)
            if stopped:
                _save_on_stop(run, state, progress, stopper.received)
                return state, True
            _end_epoch(run, state, progress, meter, history, tb, started)
    return state, False


def _train_epoch(run: _Run, state: TrainState, progress: Progress, tb, stopper: StopSignal,
                 stop_after_steps: int | None) -> tuple[TrainState, EpochMeter, bool]:
    """The steps of epoch `progress.epoch` (from the saved iterator position when resumed
    mid-epoch). Returns the state, the epoch's meter and whether a stop was asked for."""
    config, epoch, steps_per_epoch = run.config, progress.epoch, run.steps_per_epoch
    step_keys = ('image', 'orig_hw', 'label') if run.cache is not None else ('image', 'label')
    if config.cskd_weight > 0:
        step_keys += ('pair_image', 'pair_orig_hw') if run.cache is not None else ('pair_image',)
    size = train_image_size(config, epoch)
    if config.progressive_min_size and (epoch == 0 or train_image_size(config, epoch - 1) != size):
        run.log(f'  from epoch {epoch + 1} the train images are {size} px (progressive '
                f'resizing; validation at {config.image_size} px)')
    # The device path augments inside the step: its output size is a static argument there.
    size_kw = {'image_size': size} if run.cache is not None and size != config.image_size else {}
    teacher = () if run.teacher is None else (run.teacher,)
    it = pipeline.iterate(_epoch_dataset(run, epoch, size), progress.iterator)
    meter = EpochMeter(progress.epoch_sums)
    t_epoch, compiled_before = time.time(), run.train_fn.seconds
    step_in_epoch = _step(state) - epoch * steps_per_epoch
    first_step_in_epoch = step_in_epoch  # > 0 when resumed mid-epoch
    stopped = False
    t_ready = time.time()
    for batch in it:
        # The step before has finished (host_local below), so this is pure loader wait.
        meter.add_data_wait(time.time() - t_ready)
        step = _step(state)
        rng = jax.random.fold_in(run.base_rng, step)
        step_batch = {k: batch[k] for k in step_keys}
        state, m = run.train_fn(state, global_batch(step_batch, run.mesh) if run.multi
                                else step_batch, rng, *teacher, **size_kw)
        m = host_local(m)
        if not m['finite']:
            raise TrainingError(_nonfinite_message(step, epoch, batch, run.data.train, m,
                                                   run.latest_mgr, run.best_mgr))
        if run.multi and step_in_epoch == first_step_in_epoch:
            _compile_partial_step(run, state, step_batch, teacher, size_kw)
        meter.add(m, images=len(batch['label']) * jax.process_count(),
                  batch_size=config.batch_size)
        tb.step(step + 1, float(m['loss']), float(m['lr']))
        step_in_epoch += 1
        progress.iterator, progress.epoch_sums = it.get_state(), meter.sums
        if step_in_epoch % config.log_every_steps == 0 and step_in_epoch < steps_per_epoch:
            rate = ((step_in_epoch - first_step_in_epoch) * config.batch_size
                    / max(time.time() - t_epoch - (run.train_fn.seconds - compiled_before),
                          1e-9))
            eta = (steps_per_epoch - step_in_epoch) * config.batch_size / rate
            run.log(f'  epoch {epoch + 1} step {step_in_epoch}/{steps_per_epoch} '
                    f'loss {meter.mean_loss:.4f} lr {float(m["lr"]):.2e} '
                    f'{rate:.1f} img/s, epoch ETA {fmt_time(eta)}')
        if config.checkpoint_every_steps and (step + 1) % config.checkpoint_every_steps == 0:
            save_checkpoint(run.latest_mgr, state, _meta(progress, config))
        if stopper.received is not None or (stop_after_steps is not None
                                            and step + 1 >= stop_after_steps):
            stopped = True
            break
        t_ready = time.time()
    meter.add_time(time.time() - t_epoch)
    return state, meter, stopped


def _compile_partial_step(run: _Run, state: TrainState, like: dict, teacher: tuple,
                          size_kw: dict) -> None:
    """Several processes: compile the train step for the epoch's last partial batch now, in
    every process at the same point (after the epoch's first step), not when each process
    reaches that batch: a process still compiling there can time out the others' collectives.
    It runs once on zeros shaped like that batch and a copy of the state, and is thrown away."""
    config = run.config
    sizes = pipeline.epoch_batch_sizes(len(run.data.train), config.batch_size,
                                       config.max_steps_per_epoch, config.drop_last_batch,
                                       _num_devices(run.mesh))
    if sizes[-1] == sizes[0]:
        return
    rows = sizes[-1] // jax.process_count()
    dummy = global_batch({k: np.zeros((rows,) + np.shape(v)[1:], np.asarray(v).dtype)
                          for k, v in like.items()}, run.mesh)
    if not run.train_fn.seen(dummy, size_kw):
        run.train_fn(jax.tree.map(jnp.copy, state), dummy, run.base_rng, *teacher, **size_kw)


def train_image_size(config: ml_collections.ConfigDict, epoch: int) -> int:
    """The train resolution of 0-based epoch `epoch`: image_size, or the progressive-resizing
    ramp's size when config.progressive_min_size is set."""
    if not config.progressive_min_size:
        return int(config.image_size)
    return progressive_image_size(epoch, config.image_size, config.progressive_min_size,
                                  config.progressive_start_epoch, config.progressive_end_epoch,
                                  config.progressive_multiple)


def _epoch_dataset(run: _Run, epoch: int, size: int):
    """Epoch `epoch`'s batches (train images of `size` px): from the decode-once cache, or
    decoded and augmented on the host."""
    config, shard = run.config, (jax.process_index(), jax.process_count())
    drop_last, devices = config.drop_last_batch, _num_devices(run.mesh)
    if run.cache is not None:
        return pipeline.cached_train_epoch_dataset(
            run.cache.images, run.cache.orig_hw, run.data.train_labels, seed=config.seed,
            epoch=epoch, batch_size=config.batch_size, weighted=config.weighted_sampling,
            max_steps=config.max_steps_per_epoch, drop_last=drop_last, num_devices=devices,
            prefetch=config.prefetch_batches, shard=shard, partners=config.cskd_weight > 0)
    aug = run.aug if size == run.aug.image_size else dataclasses.replace(run.aug, image_size=size)
    return pipeline.train_epoch_dataset(
        run.data.train, run.data.train_labels, aug, seed=config.seed, epoch=epoch,
        batch_size=config.batch_size, weighted=config.weighted_sampling,
        use_bbox=config.use_bbox, bbox_margin=config.bbox_margin,
        max_steps=config.max_steps_per_epoch, drop_last=drop_last, num_devices=devices,
        num_workers=config.num_workers,
        prefetch=config.prefetch_batches, shard=shard, partners=config.cskd_weight > 0)


def _save_on_stop(run: _Run, state: TrainState, progress: Progress, signum: int | None) -> None:
    """A stop mid-epoch: the checkpoint to resume from (iterator position and sums included)."""
    save_checkpoint(run.latest_mgr, state, _meta(progress, run.config))
    run.latest_mgr.wait_until_finished()
    why = {signal.SIGINT: 'Ctrl-C', signal.SIGTERM: 'SIGTERM'}.get(signum, 'stop requested')
    run.log(f'{why}: saved a checkpoint at step {_step(state)} in {run.workdir}. '
            'Run the same command again to resume.')


def _end_epoch(run: _Run, state: TrainState, progress: Progress, meter: EpochMeter,
               history: list[dict], tb, started: tuple[float, int]) -> None:
    """Validation, the early-stopping rule, metrics.jsonl / curves.png / TensorBoard, the
    epoch's line and its checkpoints (best on an improvement, latest always)."""
    config, epoch, step = run.config, progress.epoch, _step(state)
    val = evaluate(run.eval_fn, state, run.data.val, config, run.mesh)
    if val['count'] and not math.isfinite(val['loss']):  # diverged: never checkpoint it
        raise TrainingError(_nonfinite_message(step, epoch, None, run.data.train, val,
                                               run.latest_mgr, run.best_mgr))
    improved = _record_validation(progress, epoch, val, config)
    record = epoch_record(epoch + 1, step, meter.summary(config.batch_size), val,
                          float(state.lr_schedule(step)), improved)
    history.append(record)
    if run.primary:
        with open(run.history_path, 'a') as f:
            f.write(json.dumps(record) + '\n')
        plot_curves(history, os.path.join(run.workdir, 'curves.png'))
        tb.epoch(record, os.path.join(run.workdir, 'curves.png'))
    run.log(_epoch_line(config, record, progress, _run_eta(run, started, step), improved))
    stop = progress.bad_epochs >= config.patience
    progress.epoch, progress.iterator, progress.epoch_sums = epoch + 1, None, {}
    progress.finished = stop or progress.epoch >= config.num_epochs
    if improved:
        save_checkpoint(run.best_mgr, state, _meta(progress, config),
                        metrics={'val_loss': val['loss'], 'val_accuracy': val['accuracy']})
    save_checkpoint(run.latest_mgr, state, _meta(progress, config), overwrite=True)
    if stop:
        run.log(f'Early stopping at epoch {epoch + 1}: no '
                f'{_METRIC_WORDS[config.early_stopping_metric]} improvement > '
                f'{config.min_delta} for {config.patience} epochs.')


def _run_eta(run: _Run, started: tuple[float, int], step: int) -> float:
    """Seconds left in the run at the steady-state rate since `started` (compile time left
    out)."""
    run_start, run_start_step = started
    rate = (step - run_start_step) / max(time.time() - run_start - run.train_fn.seconds
                                         - run.eval_fn.seconds, 1e-9)
    return (run.total_steps - step) / rate if rate > 0 else 0.0


# ---- the end-of-run report --------------------------------------------------------------------

def _final_report(run: _Run, last_state: TrainState, history: list[dict]) -> dict[str, Any]:
    """Restores the best checkpoint and evaluates it: that is what the run reports."""
    config, data, log = run.config, run.data, run.log
    best_step = run.best_mgr.best_step()
    if best_step is None:
        raise TrainingError('no best checkpoint was written (did every epoch fail to improve?)')
    best_state, best_meta = restore_checkpoint(run.best_mgr, last_state, best_step)
    best_epoch = best_meta['progress']['best_epoch'] + 1
    val = evaluate(run.eval_fn, best_state, data.val, config, run.mesh)
    report: dict[str, Any] = {'best_epoch': best_epoch, 'best_step': best_step, 'val': val,
                              'epochs_run': len(history)}
    log(f'Best checkpoint: epoch {best_epoch} (step {best_step}): val loss {val["loss"]:.4f}, '
        f'top-1 {val["accuracy"]:.4f}, top-5 {val["top5"]:.4f} on {val["count"]} images.')
    if history:
        last = history[-1]
        report['last_epoch_val'] = {'epoch': last['epoch'], 'accuracy': last['val_accuracy'],
                                    'loss': last['val_loss']}
        log(f'(The seed reported its last in-memory weights instead: epoch {last["epoch"]} had '
            f'val top-1 {last["val_accuracy"]:.4f}, loss {last["val_loss"]:.4f}. We report the '
            f'best-{_METRIC_WORDS[config.early_stopping_metric]} checkpoint.)')
    if len(data.test):
        test = evaluate(run.eval_fn, best_state, data.test, config, run.mesh)
        report['test'] = test
        log(f'Test (evaluated once, best checkpoint): top-1 {test["accuracy"]:.4f}, '
            f'top-5 {test["top5"]:.4f}, loss {test["loss"]:.4f} on {test["count"]} images.')
    if jax.process_index() == 0:   # figures and tables: process 0 alone, on a local copy
        local = best_state if jax.process_count() == 1 else jax.device_put(host_local(best_state))
        report['reports'] = full_report(local, data, config,
                                        os.path.join(run.workdir, 'eval'), log)
        write_json_atomic(os.path.join(run.workdir, 'final_report.json'), report, indent=2)
    if jax.process_count() > 1:    # the others wait: a process that exits early fails the run
        multihost_utils.sync_global_devices('cars_jax_final_report')
    return report


# ---- per-epoch bookkeeping (pure) -------------------------------------------------------------

@dataclasses.dataclass
class Progress:
    """Everything besides the TrainState that a resumed run needs (saved as JSON)."""
    epoch: int = 0                       # the epoch in progress (0-based)
    iterator: dict | None = None         # grain iterator state within that epoch
    best_val_loss: float = float('inf')       # of the best checkpoint
    best_val_accuracy: float = float('-inf')  # of the best checkpoint
    best_epoch: int = -1
    bad_epochs: int = 0
    epoch_sums: dict = dataclasses.field(default_factory=dict)   # EpochMeter.sums
    finished: bool = False


class EpochMeter:
    """The running sums of one epoch's steps. `sums` is a plain dict, saved in the checkpoint
    (Progress.epoch_sums), so an epoch resumed mid-way goes on counting where it stopped."""

    def __init__(self, sums: dict | None = None):
        self.sums = dict(sums or {}) or {'loss': 0.0, 'accuracy': 0.0, 'mixed': 0.0,
                                         'unmixed_correct': 0.0, 'n': 0, 'time': 0.0}
        self.sums.setdefault('data_wait', 0.0)

    def add(self, m: dict, images: int | None = None, batch_size: int | None = None) -> None:
        """One step's host-local metrics (loss, accuracy, mixed) of a batch of `images` rows
        out of a full `batch_size`: the sums weigh each step by images / batch_size (1 for a
        full batch), so the epoch's means are over images, as the seed's (a last partial
        batch counts for its rows), and `n` is the epoch's images in full batches' worth."""
        w = 1.0 if images is None or not batch_size else images / batch_size
        s = self.sums
        s['loss'] += w * float(m['loss'])
        s['accuracy'] += w * float(m['accuracy'])
        s['mixed'] += w * float(m['mixed'])
        s['unmixed_correct'] += w * float(m['accuracy']) * (1 - float(m['mixed']))
        s['n'] += w

    def add_data_wait(self, seconds: float) -> None:
        self.sums['data_wait'] += seconds

    def add_time(self, seconds: float) -> None:
        self.sums['time'] += seconds

    @property
    def mean_loss(self) -> float:
        return self.sums['loss'] / (self.sums['n'] or 1)

    def summary(self, batch_size: int) -> dict[str, Any]:
        """The epoch's training fields of its metrics.jsonl line (train_images: the images
        its steps trained on)."""
        s = self.sums
        n = s['n'] or 1      # a float (full batches' worth); under 1 for one partial batch
        unmixed = n - s['mixed']
        return {'train_images': round(s['n'] * batch_size),
                'train_loss': s['loss'] / n, 'train_accuracy': s['accuracy'] / n,
                'train_accuracy_unmixed': s['unmixed_correct'] / unmixed if unmixed else None,
                'mixup_share': s['mixed'] / n, 'epoch_time_s': s['time'],
                'img_per_s': n * batch_size / max(s['time'], 1e-9),
                'data_wait_share': s['data_wait'] / max(s['time'], 1e-9)}


# A metrics.jsonl line: these fields, in this order.
METRICS_FIELDS = ('epoch', 'step', 'train_images', 'train_loss', 'train_accuracy',
                  'train_accuracy_unmixed', 'mixup_share', 'val_loss', 'val_accuracy',
                  'val_top5', 'lr', 'epoch_time_s', 'img_per_s', 'data_wait_share', 'improved')


def epoch_record(epoch: int, step: int, train: dict, val: dict, lr: float,
                 improved: bool) -> dict[str, Any]:
    """One metrics.jsonl line: epoch (1-based), the EpochMeter summary, validation."""
    fields = {'epoch': epoch, 'step': step, **train, 'val_loss': val['loss'],
              'val_accuracy': val['accuracy'], 'val_top5': val['top5'], 'lr': lr,
              'improved': improved}
    return {k: fields[k] for k in METRICS_FIELDS}


def improves(metric: str, progress: Progress, val: dict, min_delta: float) -> bool:
    """The seed's early-stopping rule on `metric`: better than the best checkpoint so far by
    more than min_delta (val_loss: lower; val_accuracy: higher)."""
    if metric == 'val_accuracy':
        return val['accuracy'] - progress.best_val_accuracy > min_delta
    if metric == 'val_loss':
        return progress.best_val_loss - val['loss'] > min_delta
    raise ValueError(f'early_stopping_metric must be val_loss or val_accuracy, got {metric!r}')


def _record_validation(progress: Progress, epoch: int, val: dict,
                       config: ml_collections.ConfigDict) -> bool:
    """Updates the best scores or the count of epochs without improvement; True: improved."""
    improved = improves(config.early_stopping_metric, progress, val, config.min_delta)
    if improved:
        progress.best_val_loss, progress.best_val_accuracy = val['loss'], val['accuracy']
        progress.best_epoch, progress.bad_epochs = epoch, 0
    else:
        progress.bad_epochs += 1
    return improved


_METRIC_WORDS = {'val_loss': 'val-loss', 'val_accuracy': 'val-accuracy'}


def _epoch_line(config: ml_collections.ConfigDict, record: dict, progress: Progress, eta: float,
                improved: bool) -> str:
    return (f'Epoch {record["epoch"]}/{config.num_epochs} | train loss '
            f'{record["train_loss"]:.4f} acc {record["train_accuracy"]:.3f} | val loss '
            f'{record["val_loss"]:.4f} acc {record["val_accuracy"]:.3f} top5 '
            f'{record["val_top5"]:.3f} | lr {record["lr"]:.2e} | {record["img_per_s"]:.1f} '
            f'img/s, {record["epoch_time_s"]:.1f}s, waiting for data '
            f'{record["data_wait_share"]:.0%} | ETA {fmt_time(eta)}'
            + (' | best, saved' if improved else f' | no improvement {progress.bad_epochs}/'
               f'{config.patience}'))


def _meta(progress: Progress, config: ml_collections.ConfigDict) -> dict:
    """What a checkpoint keeps besides the state."""
    return {'progress': dataclasses.asdict(progress), 'config': json.loads(config.to_json())}


def _mixing_name(config: ml_collections.ConfigDict) -> str:
    """'MixUp', 'CutMix' or 'MixUp/CutMix (25% CutMix)': what mixes the batches, for the log."""
    hyper = mix_hyperparameters(config)
    mode = mixing_mode(hyper['mixup_alpha'], hyper['cutmix_alpha'], hyper['cutmix_share'])
    return {'mixup': 'MixUp', 'cutmix': 'CutMix',
            'both': f'MixUp/CutMix ({hyper["cutmix_share"]:.0%} CutMix)'}[mode]


# ---- helpers of the loop ----------------------------------------------------------------------

def _step(state: TrainState) -> int:
    return int(host_local(state.step))


class _FirstCallTimer:
    """A jitted step whose first call per batch shape is timed: jit traces and compiles in
    that call (before the device runs anything), so the sum is the compile time, which the ETA
    leaves out (minutes on an accelerator, against seconds per steady-state epoch of a small
    run). The train step compiles twice: for full batches and for an epoch's last partial one."""

    def __init__(self, fn: Any):
        self.fn, self.seconds, self.shapes = fn, 0.0, set()

    @staticmethod
    def _key(batch: dict, static: dict) -> tuple:
        return (tuple(sorted((k, tuple(np.shape(v))) for k, v in batch.items())),
                tuple(sorted(static.items())))

    def seen(self, batch: dict, static: dict) -> bool:
        """Whether a call with this batch shape (and static arguments) has compiled."""
        return self._key(batch, static) in self.shapes

    def __call__(self, state: Any, batch: dict, *args: Any, **static: Any) -> Any:
        shape = self._key(batch, static)
        if shape in self.shapes:
            return self.fn(state, batch, *args, **static)
        t = time.time()
        out = self.fn(state, batch, *args, **static)
        self.seconds += time.time() - t
        self.shapes.add(shape)
        return out


def _cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the decode-once cache lives: config.cache_dir, else beside the data (shared by
    runs) when that folder is writable, else in the run directory."""
    if config.cache_dir:
        return config.cache_dir
    if config.data_dir and os.access(config.data_dir, os.W_OK):
        return os.path.join(config.data_dir, '.cars_jax_cache')
    return os.path.join(workdir, 'cache')


def _make_workdir(workdir: str) -> list[str]:
    """Creates the run directory; a one-line error with the fix when it cannot be written.
    Returns the folders it created, deepest first (for `_remove_if_empty`)."""
    made, d = [], os.path.abspath(workdir)
    while not os.path.exists(d) and os.path.dirname(d) != d:
        made.append(d)
        d = os.path.dirname(d)
    try:
        ensure_writable_dir(workdir)
    except OSError as e:
        raise TrainingError(f'cannot write the run directory --workdir={workdir} ({e.strerror}: '
                            f'{e.filename}); pass a writable --workdir.') from e
    return made


def _remove_if_empty(folders: list[str]) -> None:
    """After a failed start: removes the folders `_make_workdir` created that are still
    empty (os.rmdir never removes a folder with anything in it)."""
    for d in folders:
        try:
            os.rmdir(d)
        except OSError:
            return


def _check_workdir(workdir: str, config: ml_collections.ConfigDict, class_names: list[str]) -> None:
    saved_cfg = os.path.join(workdir, 'config.json')
    if os.path.exists(saved_cfg) and os.path.isdir(os.path.join(workdir, 'checkpoints', 'latest')):
        diffs = incompatible_fields(read_run_config(saved_cfg).to_dict(), config)
        if diffs:
            raise TrainingError(
                f'{workdir} holds a run made with another config ({"; ".join(diffs)}). '
                'Use a new --workdir, or the original config to resume.')
    names_path = os.path.join(workdir, 'class_names.json')
    if os.path.exists(names_path):
        with open(names_path) as f:
            if json.load(f) != class_names:
                raise TrainingError(f'{workdir} was trained on other classes than {config.data_dir}; '
                                    'use a new --workdir.')


def _finished_message(workdir: str, progress: Progress, config: ml_collections.ConfigDict,
                      stopped_early: bool) -> str:
    """What a rerun of a finished run does (report it again) and how to go further."""
    how = (f' (stopped early: no improvement for {progress.bad_epochs} epochs; a larger '
           '--config.patience continues it)' if stopped_early else '')
    return (f'{workdir} holds a finished run ({progress.epoch} of {config.num_epochs} epochs)'
            f'{how}: nothing to train, its best checkpoint is reported again. To evaluate it: '
            f'python main.py --mode=eval --workdir={workdir}. To train longer, use a new '
            '--workdir with a larger --config.num_epochs (the one-cycle schedule spans '
            'num_epochs).')


def _read_history(path: str, upto_epoch: int, rewrite: bool = True) -> list[dict]:
    """metrics.jsonl lines of completed epochs (a crash may have left a line past the ckpt,
    or a torn last line); rewritten atomically, so a kill here loses nothing."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    rows = [r for r in rows if isinstance(r, dict) and r.get('epoch', math.inf) <= upto_epoch]
    if rewrite:
        atomic_write_text(path, lambda f: f.writelines(json.dumps(r) + '\n' for r in rows))
    return rows


def _restore_resumable(mgr, template: TrainState, workdir: str, log) -> tuple[TrainState, dict]:
    """The newest `latest` checkpoint that restores. One torn by a disk error or a kill in the
    middle of a delete is skipped (with a warning) for the older one max_to_keep=2 keeps."""
    errors = []
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            state, meta = restore_checkpoint(mgr, template, step)
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types
            errors.append(f'step {step}: {type(e).__name__}: {" ".join(str(e).split())[:160]}')
            continue
        if errors:
            log(f'Warning: skipped unreadable checkpoint(s) in {workdir}/checkpoints/latest '
                f'({"; ".join(errors)}); resuming from step {step}.')
        return state, meta
    raise TrainingError(f'no checkpoint in {workdir}/checkpoints/latest can be read '
                        f'({"; ".join(errors)}). Move that folder away to start over.')


def _nonfinite_message(step, epoch, batch, records, m, latest_mgr, best_mgr) -> str:
    # Name only finished checkpoints: wait for a save still being written in the background.
    for mgr in (latest_mgr, best_mgr):
        try:
            mgr.wait_until_finished()
        except Exception:  # noqa: BLE001 - a failed save is not a good checkpoint anyway
            pass
    last, best = latest_mgr.latest_step(), best_mgr.best_step()
    where = os.path.dirname(os.fspath(latest_mgr.directory))
    last = f'step {last} in {where}/latest' if last is not None else 'none yet'
    best = f'step {best} in {where}/best' if best is not None else 'none yet'
    if batch is None:
        detail = (f'Non-finite validation loss ({m["loss"]}) after epoch {epoch + 1} (step '
                  f'{step}): the weights diverged and were not saved.')
    else:
        files = [records[int(i)].key for i in np.asarray(batch['index'])[:8]]
        detail = (f'Non-finite loss or gradient at step {step} (epoch {epoch + 1}, loss {m["loss"]}, '
                  f'grad norm {m["grad_norm"]}); the update was not applied. Batch files '
                  f'(first 8): {files}.')
    return (f'{detail} Last good checkpoint: {last}; best: {best}. Lower '
            '--config.learning_rate or check these images, then rerun to resume from the last '
            'checkpoint.')


__all__ = ['train_and_evaluate', 'evaluate', 'restore_checkpoint', 'checkpoint_managers',
           'TrainingError', 'Progress', 'EpochMeter']
