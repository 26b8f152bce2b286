"""The training loop: the impure edge around the pure steps.

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

import contextlib
import dataclasses
import errno
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils
import numpy as np

from cars_jax.config import ConfigError, incompatible_fields, saved_value, validate_config
from cars_jax.data import pipeline
from cars_jax.data.augment import AugmentConfig
from cars_jax.data.dataset import DataBundle, build_data
from cars_jax.data.sources import format_skipped
from cars_jax.checkpoints import checkpoint_managers, restore_checkpoint, save_checkpoint
from cars_jax.evaluate import evaluate, full_report
from cars_jax.mixup import mixing_mode
from cars_jax.plots import plot_curves
from cars_jax.tensorboard import open_run_writer
from cars_jax.data.cache import build_cache, cache_size_for
from cars_jax.distributed import global_batch, host_local, replicate
from cars_jax.steps import (TrainState, augment_on_device, create_train_state, data_parallel_mesh,
                            make_steps, mix_hyperparameters)


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, incompatible workdir): the message says why."""


def console(msg: str, stream: Any = None) -> None:
    """print(msg) that survives a closed pipe: `python main.py | head` after head exited, or
    `| tee log` killed by the same Ctrl-C. The stream's descriptor is then pointed at
    /dev/null, so later lines (and the interpreter's last flush) neither raise
    BrokenPipeError nor change the exit status."""
    import sys
    stream = stream if stream is not None else sys.stdout
    try:
        print(msg, file=stream, flush=True)
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):   # no descriptor (a test's StringIO)
            pass


class _FirstCallTimer:
    """A jitted step whose first call's duration is kept: jit traces and compiles in that call
    (before the device runs anything), so it is the compile time, which the ETA leaves out
    (minutes on an accelerator, against seconds per steady-state epoch of a small run)."""

    def __init__(self, fn: Any):
        self.fn, self.seconds, self.called = fn, 0.0, False

    def __call__(self, *args: Any) -> Any:
        if self.called:
            return self.fn(*args)
        t = time.time()
        out = self.fn(*args)
        self.seconds, self.called = time.time() - t, True
        return out


class Reporter:
    """Prints progress and keeps a copy in workdir/log.txt, written first: a console that
    has gone away (a closed pipe) never costs the copy."""

    def __init__(self, workdir: str, quiet: bool = False, primary: bool = True):
        self.path, self.quiet, self.primary = os.path.join(workdir, 'log.txt'), quiet, primary

    def __call__(self, msg: str) -> None:
        if not self.primary:       # multi-process: process 0 speaks for the run
            return
        with open(self.path, 'a') as f:
            f.write(msg + '\n')
        if not self.quiet:
            console(msg)


def _step(state: TrainState) -> int:
    return int(host_local(state.step))


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# ---- checkpoints ----------------------------------------------------------------------------

@dataclasses.dataclass
class Progress:
    """Everything besides the TrainState that a resumed run needs (saved as JSON)."""
    epoch: int = 0                       # the epoch in progress (0-based)
    iterator: dict | None = None         # grain iterator state within that epoch
    best_val_loss: float = float('inf')       # of the best checkpoint
    best_val_accuracy: float = float('-inf')  # of the best checkpoint
    best_epoch: int = -1
    bad_epochs: int = 0
    epoch_sums: dict = dataclasses.field(default_factory=dict)
    finished: bool = False


def improves(metric: str, progress: Progress, val: dict, min_delta: float) -> bool:
    """The seed's early-stopping rule on `metric`: better than the best checkpoint so far by
    more than min_delta (val_loss: lower; val_accuracy: higher)."""
    if metric == 'val_accuracy':
        return val['accuracy'] - progress.best_val_accuracy > min_delta
    if metric == 'val_loss':
        return progress.best_val_loss - val['loss'] > min_delta
    raise ValueError(f'early_stopping_metric must be val_loss or val_accuracy, got {metric!r}')


_METRIC_WORDS = {'val_loss': 'val-loss', 'val_accuracy': 'val-accuracy'}


class _StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self):
        self.received: int | None = None

    def __call__(self, signum, frame):
        if self.received is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is threading.main_thread():
            old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield self
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        else:
            yield self


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def mute_stderr() -> int:
    """Points fd 2 at /dev/null (every thread's output, Python's and C++'s) and returns a
    private copy of the real stderr, for the one error line that should be read. Idempotent:
    later calls return the same copy (the first sign of a full disk mutes, the exit reuses it)."""
    import sys
    if _MUTED_STDERR:
        return _MUTED_STDERR[0]
    sys.stdout.flush()
    sys.stderr.flush()
    own = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    _MUTED_STDERR.append(own)
    return own


_MUTED_STDERR: list[int] = []   # the private copy of fd 2 once muted (process-wide, like fd 2)


class MuteOnDiskFull(logging.Filter):
    """A log filter for the console handler: the first library log record about a full disk
    (Orbax's save threads log it the moment a write fails, before the training loop can see
    the error) is written as its one line to the real stderr, and stderr is muted from then
    on. Without this, the failing save threads' tracebacks ("Event loop is closed", pages of
    them) can reach the console in the window before the loop mutes it."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if _MUTED_STDERR or not _mentions_disk_full(record):
            return not _MUTED_STDERR
        own = mute_stderr()
        try:
            line = ' '.join(self.handler.format(record).split('\n')[0].split())
        except Exception:  # noqa: BLE001 - a log line must never raise
            line = 'a checkpoint write failed: the disk is full'
        os.write(own, (line + '\n').encode())
        return False


def _mentions_disk_full(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and is_disk_full(exc):
        return True
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001
        return False
    return any(f'[Errno {n}]' in msg or os.strerror(n) in msg
               for n in (errno.ENOSPC, errno.EDQUOT))


def _cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the decode-once cache lives: config.cache_dir, else beside the data (shared by
    runs) when that folder is writable, else in the run directory."""
    if config.cache_dir:
        return config.cache_dir
    if config.data_dir and os.access(config.data_dir, os.W_OK):
        return os.path.join(config.data_dir, '.cars_jax_cache')
    return os.path.join(workdir, 'cache')


@contextlib.contextmanager
def _closed_on_error(*managers):
    """On an error, let in-flight saves finish or fail before the error is reported: a
    process that exits under Orbax's background threads prints pages of their tracebacks."""
    try:
        yield
    except BaseException as e:
        if is_disk_full(e):
            e.stderr_fd = mute_stderr()   # the failing save threads print pages while closing
        for mgr in managers:
            try:
                mgr.close()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise


# ---- the loop -------------------------------------------------------------------------------

def _write_json(path: str, obj: Any) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _make_workdir(workdir: str) -> list[str]:
    """Creates the run directory; a one-line error with the fix when it cannot be written.
    Returns the folders it created, deepest first (for `_remove_if_empty`)."""
    made, d = [], os.path.abspath(workdir)
    while not os.path.exists(d) and os.path.dirname(d) != d:
        made.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, '.write_test'), 'w') as f:  # os.access lies for root
            f.write('ok')
        os.remove(os.path.join(workdir, '.write_test'))
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
        with open(saved_cfg) as f:
            diffs = incompatible_fields(json.load(f), config)
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


def _mixing_name(config: ml_collections.ConfigDict) -> str:
    """'MixUp', 'CutMix' or 'MixUp/CutMix (25% CutMix)': what mixes the batches, for the log."""
    hyper = mix_hyperparameters(config)
    mode = mixing_mode(hyper['mixup_alpha'], hyper['cutmix_alpha'], hyper['cutmix_share'])
    return {'mixup': 'MixUp', 'cutmix': 'CutMix',
            'both': f'MixUp/CutMix ({hyper["cutmix_share"]:.0%} CutMix)'}[mode]


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
    primary = jax.process_index() == 0
    log = Reporter(workdir, quiet, primary)
    data = data if data is not None else build_data(config)
    _check_workdir(workdir, config, data.class_names)
    if primary:
        _write_json(os.path.join(workdir, 'config.json'), json.loads(config.to_json()))
        _write_json(os.path.join(workdir, 'class_names.json'), data.class_names)
    if data.skipped and primary:
        _write_json(os.path.join(workdir, 'skipped_files.json'), data.skipped)
        log(f'Skipped {len(data.skipped)} unreadable files (list: {workdir}/skipped_files.json).')
        for line in format_skipped(data.skipped, limit=5).splitlines()[1:]:
            log(line)
    for note in data.notes:
        log(note)

    num_classes = len(data.class_names)
    train_labels = data.train_labels
    steps_per_epoch = pipeline.steps_per_epoch(len(data.train), config.batch_size,
                                               config.max_steps_per_epoch)
    if steps_per_epoch == 0:
        raise ConfigError(f'--config.batch_size={config.batch_size} is larger than the '
                          f'{len(data.train)} training images; use a smaller batch.')
    total_steps = steps_per_epoch * config.num_epochs
    aug = AugmentConfig.from_config(config)
    init_rng, base_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    state = create_train_state(config, init_rng, num_classes, steps_per_epoch)
    # Data parallel over every device of every process (batch split, state replicated); one
    # device: plain jit. Several processes: each reads its rows of every global batch.
    mesh = data_parallel_mesh() if jax.device_count() > 1 else None
    multi = jax.process_count() > 1
    shard = (jax.process_index(), jax.process_count())
    if multi:
        state = replicate(state, mesh)
    on_device = augment_on_device(config.augment_on, jax.default_backend())
    cache = None
    if on_device:
        cache = build_cache(data.train, cache_size_for(config.image_size, config.cache_size),
                            cache_dir=_cache_dir(config, workdir), name='train',
                            use_bbox=config.use_bbox, bbox_margin=config.bbox_margin, log=log)
    train_fn, eval_fn = make_steps(config, mesh, device_aug=aug if on_device else None)
    train_fn, eval_fn = _FirstCallTimer(train_fn), _FirstCallTimer(eval_fn)
    latest_mgr, best_mgr = checkpoint_managers(workdir, config.early_stopping_metric)
    progress = Progress()
    if latest_mgr.latest_step() is not None:
        state, meta = _restore_resumable(latest_mgr, state, workdir, log)
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
    history_path = os.path.join(workdir, 'metrics.jsonl')
    history = _read_history(history_path, upto_epoch=progress.epoch, rewrite=primary)
    tb = open_run_writer(primary and saved_value(config, 'tensorboard'), workdir, _step(state))

    log(f'cars_jax: {num_classes} classes, {data.describe()}; '
        f'{steps_per_epoch} steps/epoch x {config.num_epochs} '
        f'epochs, batch {config.batch_size}, {config.image_size}px, on {jax.devices()[0].platform}, '
        f'augmentation on the {"device (decode-once cache)" if on_device else "host (per image)"}. '
        f'Train accuracy is measured on augmented images against the original labels, '
        f'including {_mixing_name(config)} batches ({config.mixup_prob:.0%} of batches), '
        f'as the seed did.')
    if state.ema is not None:
        log(f'EMA of the weights (decay {state.ema_decay}): validation, the best checkpoint and '
            f'the reports use the averaged weights; train loss/accuracy are the live weights\'.')

    def meta() -> dict:
        return {'progress': dataclasses.asdict(progress), 'config': json.loads(config.to_json())}

    stopper = _StopSignal()
    interrupted = False
    run_start, run_start_step = time.time(), _step(state)
    with stopper.installed(), _closed_on_error(latest_mgr, best_mgr, tb):
        while not progress.finished and progress.epoch < config.num_epochs:
            epoch = progress.epoch
            if cache is not None:
                ds = pipeline.cached_train_epoch_dataset(
                    cache.images, cache.orig_hw, train_labels, seed=config.seed, epoch=epoch,
                    batch_size=config.batch_size, weighted=config.weighted_sampling,
                    max_steps=config.max_steps_per_epoch, prefetch=config.prefetch_batches,
                    shard=shard)
            else:
                ds = pipeline.train_epoch_dataset(
                    data.train, train_labels, aug, seed=config.seed, epoch=epoch,
                    batch_size=config.batch_size, weighted=config.weighted_sampling,
                    use_bbox=config.use_bbox, bbox_margin=config.bbox_margin,
                    max_steps=config.max_steps_per_epoch, num_workers=config.num_workers,
                    prefetch=config.prefetch_batches, shard=shard)
            step_keys = ('image', 'orig_hw', 'label') if cache is not None else ('image', 'label')
            it = pipeline.iterate(ds, progress.iterator)
            sums = dict(progress.epoch_sums) or {'loss': 0.0, 'accuracy': 0.0, 'mixed': 0.0,
                                                 'unmixed_correct': 0.0, 'n': 0, 'time': 0.0}
            sums.setdefault('data_wait', 0.0)
            t_epoch, compiled_before = time.time(), train_fn.seconds
            step_in_epoch = _step(state) - epoch * steps_per_epoch
            first_step_in_epoch = step_in_epoch  # > 0 when resumed mid-epoch
            t_ready = time.time()
            for batch in it:
                # The step before has finished (device_get below), so this is pure loader wait.
                sums['data_wait'] += time.time() - t_ready
                step = _step(state)
                rng = jax.random.fold_in(base_rng, step)
                step_batch = {k: batch[k] for k in step_keys}
                state, m = train_fn(state, global_batch(step_batch, mesh) if multi else step_batch,
                                    rng)
                m = host_local(m)
                if not m['finite']:
                    raise TrainingError(_nonfinite_message(step, epoch, batch, data.train, m,
                                                           latest_mgr, best_mgr))
                sums['loss'] += float(m['loss'])
                sums['accuracy'] += float(m['accuracy'])
                sums['mixed'] += float(m['mixed'])
                sums['unmixed_correct'] += float(m['accuracy']) * (1 - float(m['mixed']))
                sums['n'] += 1
                tb.step(step + 1, float(m['loss']), float(m['lr']))
                step_in_epoch += 1
                progress.iterator, progress.epoch_sums = it.get_state(), sums
                if step_in_epoch % config.log_every_steps == 0 and step_in_epoch < steps_per_epoch:
                    rate = ((step_in_epoch - first_step_in_epoch) * config.batch_size
                            / max(time.time() - t_epoch - (train_fn.seconds - compiled_before),
                                  1e-9))
                    eta = (steps_per_epoch - step_in_epoch) * config.batch_size / rate
                    log(f'  epoch {epoch + 1} step {step_in_epoch}/{steps_per_epoch} '
                        f'loss {sums["loss"] / sums["n"]:.4f} lr {float(m["lr"]):.2e} '
                        f'{rate:.1f} img/s, epoch ETA {_fmt_time(eta)}')
                if config.checkpoint_every_steps and (step + 1) % config.checkpoint_every_steps == 0:
                    save_checkpoint(latest_mgr, state, meta())
                if stopper.received is not None or (stop_after_steps is not None
                                                    and step + 1 >= stop_after_steps):
                    interrupted = True
                    break
                t_ready = time.time()
            if interrupted:
                sums['time'] += time.time() - t_epoch
                save_checkpoint(latest_mgr, state, meta())
                latest_mgr.wait_until_finished()
                why = {signal.SIGINT: 'Ctrl-C', signal.SIGTERM: 'SIGTERM'}.get(stopper.received,
                                                                               'stop requested')
                log(f'{why}: saved a checkpoint at step {_step(state)} in {workdir}. '
                    'Run the same command again to resume.')
                break

            train_time = sums['time'] + time.time() - t_epoch
            val = evaluate(eval_fn, state, data.val, config, mesh)
            if val['count'] and not math.isfinite(val['loss']):  # diverged: never checkpoint it
                raise TrainingError(_nonfinite_message(_step(state), epoch, None, data.train,
                                                       val, latest_mgr, best_mgr))
            improved = improves(config.early_stopping_metric, progress, val, config.min_delta)
            if improved:
                progress.best_val_loss, progress.best_val_accuracy = val['loss'], val['accuracy']
                progress.best_epoch, progress.bad_epochs = epoch, 0
            else:
                progress.bad_epochs += 1
            n = max(sums['n'], 1)
            unmixed = n - sums['mixed']
            record = {
                'epoch': epoch + 1, 'step': _step(state),
                'train_loss': sums['loss'] / n, 'train_accuracy': sums['accuracy'] / n,
                'train_accuracy_unmixed': sums['unmixed_correct'] / unmixed if unmixed else None,
                'mixup_share': sums['mixed'] / n,
                'val_loss': val['loss'], 'val_accuracy': val['accuracy'], 'val_top5': val['top5'],
                'lr': float(state.lr_schedule(_step(state))), 'epoch_time_s': train_time,
                'img_per_s': n * config.batch_size / max(train_time, 1e-9),
                'data_wait_share': sums['data_wait'] / max(train_time, 1e-9), 'improved': improved,
            }
            history.append(record)
            if primary:
                with open(history_path, 'a') as f:
                    f.write(json.dumps(record) + '\n')
                plot_curves(history, os.path.join(workdir, 'curves.png'))
                tb.epoch(record, os.path.join(workdir, 'curves.png'))
            done_steps = _step(state) - run_start_step
            rate = done_steps / max(time.time() - run_start - train_fn.seconds
                                    - eval_fn.seconds, 1e-9)   # steady state: no compile
            eta = (total_steps - _step(state)) / rate if rate > 0 else 0.0
            log(f'Epoch {epoch + 1}/{config.num_epochs} | train loss {record["train_loss"]:.4f} '
                f'acc {record["train_accuracy"]:.3f} | val loss {val["loss"]:.4f} '
                f'acc {val["accuracy"]:.3f} top5 {val["top5"]:.3f} | lr {record["lr"]:.2e} | '
                f'{record["img_per_s"]:.1f} img/s, {train_time:.1f}s, waiting for data '
                f'{record["data_wait_share"]:.0%} | ETA {_fmt_time(eta)}'
                + (' | best, saved' if improved else f' | no improvement {progress.bad_epochs}/'
                   f'{config.patience}'))
            stop = progress.bad_epochs >= config.patience
            progress.epoch, progress.iterator, progress.epoch_sums = epoch + 1, None, {}
            progress.finished = stop or progress.epoch >= config.num_epochs
            if improved:
                save_checkpoint(best_mgr, state, meta(), metrics={'val_loss': val['loss'],
                                                        'val_accuracy': val['accuracy']})
            save_checkpoint(latest_mgr, state, meta(), overwrite=True)
            if stop:
                log(f'Early stopping at epoch {epoch + 1}: no '
                    f'{_METRIC_WORDS[config.early_stopping_metric]} improvement > '
                    f'{config.min_delta} for {config.patience} epochs.')
    latest_mgr.wait_until_finished()
    best_mgr.wait_until_finished()
    if interrupted:
        latest_mgr.close()
        best_mgr.close()
        tb.close()
        return {'interrupted': True, 'step': _step(state)}

    report = _final_report(config, workdir, data, state, eval_fn, best_mgr, history, log, mesh)
    tb.final(report, os.path.join(workdir, 'eval'), _step(state))
    tb.close()
    latest_mgr.close()
    best_mgr.close()
    return report


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


def _final_report(config, workdir, data: DataBundle, last_state: TrainState, eval_fn, best_mgr,
                  history, log, mesh=None) -> dict[str, Any]:
    """Restores the best checkpoint and evaluates it: that is what the run reports."""
    best_step = best_mgr.best_step()
    if best_step is None:
        raise TrainingError('no best checkpoint was written (did every epoch fail to improve?)')
    best_state, best_meta = restore_checkpoint(best_mgr, last_state, best_step)
    best_epoch = best_meta['progress']['best_epoch'] + 1
    val = evaluate(eval_fn, best_state, data.val, config, mesh)
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
        test = evaluate(eval_fn, best_state, data.test, config, mesh)
        report['test'] = test
        log(f'Test (evaluated once, best checkpoint): top-1 {test["accuracy"]:.4f}, '
            f'top-5 {test["top5"]:.4f}, loss {test["loss"]:.4f} on {test["count"]} images.')
    if jax.process_index() == 0:   # figures and tables: process 0 alone, on a local copy
        local = best_state if jax.process_count() == 1 else jax.device_put(host_local(best_state))
        report['reports'] = full_report(local, data, config, os.path.join(workdir, 'eval'), log)
        _write_json(os.path.join(workdir, 'final_report.json'), report)
    if jax.process_count() > 1:    # the others wait: a process that exits early fails the run
        multihost_utils.sync_global_devices('cars_jax_final_report')
    return report


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
    if not rewrite:
        return rows
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    os.replace(tmp, path)
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
           'TrainingError', 'Progress']
