"""Self-supervised pretraining on the train images (SimCLR), then supervised training from it.

Still from scratch: no external data or weights. `python main.py --mode=pretrain
--config=configs/pretrain.py` trains the ResNet's backbone with a projection head on pairs
of augmented views of the *train* images of the split (labels unused; the validation and
test images never seen) with the NT-Xent loss (`losses.nt_xent_loss`). A supervised run
then starts its backbone from it with `--config.pretrained_backbone=<pretrain workdir>`;
its classifier (`fc`) starts fresh.

Pure pieces: `create_pretrain_state`, `pretrain_step`, `with_backbone`. The loop
(`pretrain`) is the side-effecting edge: log with throughput and ETA, a resume checkpoint per
epoch and on Ctrl-C/SIGTERM, metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from cars_jax.checkpoints import latest_manager, restore_checkpoint, save_checkpoint
from cars_jax.config import (ConfigError, check_same_fields, check_same_split, incompatible_fields,
                             read_run_config, run_config_json, validate_config)
from cars_jax.console import Reporter, StopSignal, fmt_time
from cars_jax.data import pipeline
from cars_jax.data.augment import AugmentConfig
from cars_jax.data.dataset import build_data
from cars_jax.fileio import write_json_atomic
from cars_jax.losses import nt_xent_loss
from cars_jax.model import ContrastiveNet, build_model, init_variables
from cars_jax.optim import make_optimizer
from cars_jax.steps import TrainState, apply_gradients_if_finite, replicated_sharding

# What the supervised run must share with the pretraining it starts from: the backbone's
# shapes, and the split (`config.check_same_split`).
_SAME_ARCHITECTURE = ('stage_sizes', 'widths', 'stem_pool', 'stem')
PRETRAIN_MARKER = 'pretrain.json'


def create_pretrain_state(config: ml_collections.ConfigDict, rng: jax.Array,
                          steps_per_epoch: int) -> TrainState:
    """The configured ResNet as a SimCLR network (`ContrastiveNet`: backbone + projection
    head), with the configured optimiser and one-cycle schedule over the pretraining."""
    backbone = build_model(config, num_classes=1)          # no classifier is built
    model = ContrastiveNet(backbone, hidden_dim=int(config.widths[-1]),
                           projection_dim=int(config.ssl_projection_dim))
    variables = init_variables(model, rng, config.image_size)
    tx, schedule = make_optimizer(config, steps_per_epoch)
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             batch_stats=variables['batch_stats'], tx=tx, lr_schedule=schedule)


def pretrain_step(state: TrainState, batch: dict, temperature: float = 0.2
                  ) -> tuple[TrainState, dict]:
    """One SimCLR step on a batch of two views ('image', 'image2'): both go through the
    network as one batch of 2N (BatchNorm statistics over both views), NT-Xent on the
    projections. A non-finite loss or update leaves the state unchanged (`finite` 0)."""
    n = batch['image'].shape[0]
    images = jnp.concatenate([batch['image'], batch['image2']])

    def loss_fn(params):
        z, new_model_state = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                            images, train=True, mutable=['batch_stats'])
        loss, hits = nt_xent_loss(z[:n], z[n:], temperature)
        return loss, (hits, new_model_state)

    (loss, (hits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state, finite, grad_norm = apply_gradients_if_finite(
        state, grads, new_model_state['batch_stats'], loss)
    return new_state, {'loss': loss, 'positive_hits': hits, 'finite': finite.astype(jnp.float32),
                       'lr': jnp.asarray(state.lr_schedule(state.step), jnp.float32),
                       'grad_norm': grad_norm}


def with_backbone(state: TrainState, backbone: dict) -> TrainState:
    """A supervised TrainState whose every parameter and BatchNorm statistic but the
    classifier's (`fc`) is the pretrained backbone's ({'params', 'batch_stats'} of
    `ContrastiveNet`'s 'backbone'); the EMA, if kept, starts at the same weights."""
    params = dict(backbone['params'])
    extra = set(params) - set(state.params)
    missing = set(state.params) - set(params) - {'fc'}
    if extra or missing:
        raise ValueError(f'the pretrained backbone does not fit this network: missing '
                         f'{sorted(missing)}, extra {sorted(extra)}')
    params['fc'] = state.params['fc']
    new = {'params': params, 'batch_stats': dict(backbone['batch_stats'])}
    shapes = lambda t: jax.tree.map(jnp.shape, t)
    if shapes(new) != shapes({'params': dict(state.params),
                              'batch_stats': dict(state.batch_stats)}):
        raise ValueError('the pretrained backbone\'s shapes differ from this network\'s')
    ema = None if state.ema is None else jax.tree.map(jnp.copy, new)
    return state.replace(params=new['params'], batch_stats=new['batch_stats'], ema=ema)


def load_pretrained_backbone(state: TrainState, config: ml_collections.ConfigDict,
                             holdout: bool = True) -> TrainState:
    """`with_backbone` from the pretraining run in config.pretrained_backbone, after checking
    that it pretrained this architecture on this run's train images (`holdout`: validation is
    a seeded share of train, so the seed and share must match too)."""
    workdir = config.pretrained_backbone
    if not os.path.isfile(os.path.join(workdir, PRETRAIN_MARKER)):
        raise ConfigError(f'--config.pretrained_backbone={workdir!r} is not a finished '
                          'pretraining run (no pretrain.json); run python main.py '
                          f'--mode=pretrain --workdir={workdir} first.')
    theirs = read_run_config(os.path.join(workdir, 'config.json'))
    check_same_fields(theirs, config, _SAME_ARCHITECTURE, 'pretrained_backbone',
                      'the backbone\'s shapes must match')
    check_same_split(theirs, config, holdout, 'pretrained_backbone')
    mgr = latest_manager(workdir)
    try:
        template = create_pretrain_state(theirs, jax.random.PRNGKey(0), 2)  # shapes only
        pretrained, _ = restore_checkpoint(mgr, template)
    finally:
        mgr.close()
    return with_backbone(state, {'params': pretrained.params['backbone'],
                                 'batch_stats': pretrained.batch_stats['backbone']})


# ---- the loop ---------------------------------------------------------------------------------

def pretrain(config: ml_collections.ConfigDict, workdir: str, *,
             stop_after_steps: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """SimCLR pretraining for config.num_epochs epochs (or resumed from workdir's latest
    checkpoint), on plain shuffled full batches of the split's train images. Returns the
    summary written to pretrain.json ({'epochs', 'steps', 'loss', 'positive_hits', 'seconds',
    'images_seen'}), or {'interrupted': True, 'step'} when stopped (Ctrl-C, SIGTERM,
    stop_after_steps) with a checkpoint to resume from."""
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    log = Reporter(workdir, quiet)
    marker = os.path.join(workdir, PRETRAIN_MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            log(f'{workdir} holds a finished pretraining; start a run from it with '
                f'--config.pretrained_backbone={workdir}')
            return json.load(f)
    data = build_data(config)
    steps_per_epoch = pipeline.steps_per_epoch(len(data.train), config.batch_size,
                                               config.max_steps_per_epoch, drop_last=True)
    if steps_per_epoch == 0:
        raise ConfigError(f'--config.batch_size={config.batch_size}: the {len(data.train)} train '
                          'images do not fill one batch; use a smaller batch.')
    state = create_pretrain_state(config, jax.random.split(jax.random.PRNGKey(config.seed))[0],
                                  steps_per_epoch)
    # committed to the device as a restored state is: a resumed pretraining compiles its step once
    state = jax.device_put(state, replicated_sharding())
    mgr = latest_manager(workdir)
    state, epoch, iterator = _resume_pretraining(mgr, state, config, workdir, log)
    log(f'SimCLR pretraining: {len(data.train)} train images (labels unused; {len(data.val)} '
        f'validation images never seen), {steps_per_epoch} steps/epoch x {config.num_epochs} '
        f'epochs, batch {config.batch_size} x 2 views, {config.image_size}px, temperature '
        f'{config.ssl_temperature}, on {jax.devices()[0].platform}.')
    loop = _PretrainLoop(config, workdir, data, log, mgr, steps_per_epoch,
                         jax.jit(lambda s, b: pretrain_step(s, b, float(config.ssl_temperature)),
                                 donate_argnums=(0,)), int(state.step))
    record = {}
    with loop.stopper.installed():
        while epoch < config.num_epochs:
            state, record, stopped = loop.epoch(state, epoch, iterator, stop_after_steps)
            if stopped:
                mgr.close()
                return {'interrupted': True, 'step': int(state.step)}
            epoch, iterator = epoch + 1, None
    mgr.wait_until_finished()
    mgr.close()
    summary = {'epochs': epoch, 'steps': int(state.step), 'loss': record.get('loss'),
               'positive_hits': record.get('positive_hits'),
               'seconds': time.time() - loop.started,
               'images_seen': int(state.step) * config.batch_size}
    write_json_atomic(marker, summary, indent=2)
    log(f'Pretraining done: start a supervised run from it with '
        f'--config.pretrained_backbone={workdir}')
    return summary


def _resume_pretraining(mgr, state: TrainState, config: ml_collections.ConfigDict, workdir: str,
                        log: Reporter) -> tuple[TrainState, int, Any]:
    """(state, epoch, iterator position) of the latest checkpoint, or the fresh state (whose
    config.json is written then)."""
    if mgr.latest_step() is None:
        write_json_atomic(os.path.join(workdir, 'config.json'), run_config_json(config),
                          indent=2)
        return state, 0, None
    with open(os.path.join(workdir, 'config.json')) as f:
        changed = incompatible_fields(json.load(f), config)
    if changed:
        raise ConfigError(f'{workdir} holds a pretraining with another config ('
                          f'{"; ".join(changed)}); use its settings or a new --workdir.')
    state, meta = restore_checkpoint(mgr, state)
    log(f'Resumed the pretraining in {workdir} at step {int(state.step)} '
        f'(epoch {meta["epoch"] + 1}).')
    return state, meta['epoch'], meta['iterator']


class _PretrainLoop:
    """What the epochs of one pretraining share; `epoch` runs one (or its rest, resumed)."""

    def __init__(self, config, workdir, data, log, mgr, steps_per_epoch, step_fn, first_step):
        self.config, self.workdir, self.data, self.log, self.mgr = config, workdir, data, log, mgr
        self.steps_per_epoch, self.step_fn, self.first_step = steps_per_epoch, step_fn, first_step
        self.aug = AugmentConfig.from_config(config)
        self.stopper, self.started, self.compile_s = StopSignal(), time.time(), 0.0

    def epoch(self, state: TrainState, epoch: int, iterator: Any,
              stop_after_steps: int | None) -> tuple[TrainState, dict, bool]:
        """Returns the state, the epoch's metrics.jsonl record and whether it stopped early
        (then a checkpoint with the iterator position is saved)."""
        config = self.config
        ds = pipeline.train_epoch_dataset(
            self.data.train, self.data.train_labels, self.aug, seed=config.seed, epoch=epoch,
            batch_size=config.batch_size, weighted=False, use_bbox=config.use_bbox,
            bbox_margin=config.bbox_margin, max_steps=config.max_steps_per_epoch,
            drop_last=True, num_workers=config.num_workers, prefetch=config.prefetch_batches,
            two_views=True)
        it = pipeline.iterate(ds, iterator)
        sums, t_epoch = {'loss': 0.0, 'positive_hits': 0.0, 'steps': 0}, time.time()
        for batch in it:
            t = time.time()
            state, m = self.step_fn(state, {'image': batch['image'], 'image2': batch['image2']})
            m, step = jax.device_get(m), int(state.step)
            if step == self.first_step + 1:
                self.compile_s = time.time() - t
            if not m['finite']:
                raise _nonfinite(step, epoch, self.mgr)
            for k in ('loss', 'positive_hits'):
                sums[k] += float(m[k])
            sums['steps'] += 1
            if self.stopper.received is not None or (stop_after_steps is not None
                                                     and step >= stop_after_steps):
                save_checkpoint(self.mgr, state, {'epoch': epoch, 'iterator': it.get_state()})
                self.mgr.wait_until_finished()
                self.log(f'Stopped: saved a checkpoint at step {step} in {self.workdir}. Run '
                         'the same command again to resume.')
                return state, {}, True
            if step % config.log_every_steps == 0:
                self._progress(epoch, step, sums)
        steps = max(sums['steps'], 1)     # 0: resumed at the very end of the epoch
        record = {'epoch': epoch + 1, 'step': int(state.step), 'loss': sums['loss'] / steps,
                  'positive_hits': sums['positive_hits'] / steps,
                  'lr': float(state.lr_schedule(state.step)), 'steps': sums['steps'],
                  'epoch_time_s': time.time() - t_epoch}
        with open(os.path.join(self.workdir, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')
        save_checkpoint(self.mgr, state, {'epoch': epoch + 1, 'iterator': None})
        self.log(f'Pretrain epoch {epoch + 1}/{config.num_epochs} | NT-Xent {record["loss"]:.4f} '
                 f'| positive found {record["positive_hits"]:.1%} | '
                 f'{record["epoch_time_s"]:.1f}s')
        return state, record, False

    def _progress(self, epoch: int, step: int, sums: dict) -> None:
        config = self.config
        rate = ((step - self.first_step) * config.batch_size
                / max(time.time() - self.started - self.compile_s, 1e-9))
        left = (config.num_epochs * self.steps_per_epoch - step) * config.batch_size
        self.log(f'  epoch {epoch + 1} step {step - epoch * self.steps_per_epoch}/'
                 f'{self.steps_per_epoch} loss {sums["loss"] / sums["steps"]:.4f} '
                 f'{rate:.1f} img/s, ETA {fmt_time(left / max(rate, 1e-9))}')


def _nonfinite(step: int, epoch: int, mgr) -> Exception:
    from cars_jax.train import TrainingError
    return TrainingError(f'non-finite NT-Xent loss or update at step {step} (epoch {epoch + 1}); '
                         f'the last good checkpoint (step {mgr.latest_step()}) is kept. Lower '
                         '--config.learning_rate or raise --config.ssl_temperature.')
