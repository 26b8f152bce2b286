"""TrainState and the pure, jit-compiled train / eval steps.

`train_step(state, batch, rng)` is the whole recipe of one optimiser step: MixUp (on a share
of batches), forward with BatchNorm in train mode, label-smoothed cross-entropy mixed with the
MixUp lambda, AdamW under the one-cycle schedule. No globals, no I/O: wrap it in `jax.jit`.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from flax.training import train_state

from cars_jax.data.augment import AugmentConfig
from cars_jax.data.device_augment import augment_batch, sample_device_params
from cars_jax.losses import distillation_loss, mixed_loss, topk_correct
from cars_jax.mixup import mix_batch
from cars_jax.model import build_model, init_variables
from cars_jax.optim import make_optimizer

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """params, opt_state and step (from flax) + BatchNorm statistics; one pytree.

    `ema` (None unless `ema_decay` > 0): an exponential moving average of params and BatchNorm
    statistics, {'params', 'batch_stats'}, updated by every train step; evaluation, the best
    checkpoint's choice and everything served from it use it (`inference_variables`)."""
    batch_stats: Any = None
    ema: Any = None
    lr_schedule: Callable[[jax.Array], jax.Array] = flax.struct.field(pytree_node=False,
                                                                       default=None)
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)

    @classmethod
    def create(cls, *, lr_schedule: Callable | None = None, **kwargs) -> 'TrainState':
        """flax's, with `step` an int32 array as a restored checkpoint's is (flax's weakly typed
        0 traces to another program, so a resumed run would compile its steps anew) and the lr
        schedule jitted (the loops also read it on the host each epoch, where its jnp ops would
        each compile on first use: ~0.5 s per process)."""
        schedule = None if lr_schedule is None else jax.jit(lr_schedule)
        return super().create(lr_schedule=schedule, **kwargs).replace(
            step=jnp.zeros((), jnp.int32))


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
    """The decay used after optimiser step `step` (1-based): min(decay, (1 + step) / (10 + step)),
    TensorFlow's ExponentialMovingAverage(num_updates) warm-up, so that the average forgets the
    random init within the first few hundred steps instead of ~1/(1 - decay) of them."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def inference_variables(state: TrainState) -> dict:
    """{'params', 'batch_stats'} to evaluate and serve: the EMA when the run keeps one."""
    if state.ema is not None:
        return state.ema
    return {'params': state.params, 'batch_stats': state.batch_stats}


def create_train_state(config: ml_collections.ConfigDict, rng: jax.Array, num_classes: int,
                       steps_per_epoch: int) -> TrainState:
    """Initial state of the configured model and optimiser (schedule over the whole run)."""
    model = build_model(config, num_classes)
    variables = init_variables(model, rng, config.image_size)
    tx, schedule = make_optimizer(config, steps_per_epoch)
    ema_decay = float(config.ema_decay)
    # the average starts at the init, in buffers of its own (the state is donated to the step)
    ema = jax.tree.map(jnp.copy, variables) if ema_decay > 0 else None
    return TrainState.create(apply_fn=model.apply, params=variables['params'],
                             batch_stats=variables['batch_stats'], tx=tx, lr_schedule=schedule,
                             ema=ema, ema_decay=ema_decay)


def _tree_all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


def _updated(state: TrainState, grads: Any, batch_stats: Any) -> TrainState:
    """The optimiser's step, new BatchNorm statistics, and the EMA when one is kept."""
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if state.ema is None:
        return new_state
    decay = ema_decay_at(state.ema_decay, new_state.step)
    live = {'params': new_state.params, 'batch_stats': new_state.batch_stats}
    return new_state.replace(ema=optax.incremental_update(live, state.ema,
                                                          step_size=1.0 - decay))


def apply_gradients_if_finite(state: TrainState, grads: Any, batch_stats: Any, loss: jax.Array
                              ) -> tuple[TrainState, jax.Array, jax.Array]:
    """(new state, finite flag, gradient norm): the optimiser's step (and EMA) where the loss,
    the gradients' global norm, the new BatchNorm statistics and the parameters the update gives
    are all finite; else `state` unchanged, step included (the caller stops or skips), so a NaN
    never reaches parameters or checkpoints. Finite gradients can still overflow in the update
    (a huge lr): hence the check of the new parameters. A norm that overflows float32 (an
    element beyond ~1e19, where Adam's second moment would overflow too) counts as non-finite.

    Why a `lax.cond` around the update, not a select between the old and the new state after
    it: the step then updates the donated state in place in one pass, and the check costs one
    more elementwise pass of the optimiser's arithmetic. Keeping both states alive and
    selecting between them made the seed's train step 13% slower (64 px, CPU) and its compile
    ~5 s longer (BENCHMARKS.md, profile section)."""
    grad_norm = optax.tree.norm(grads)
    updates, _ = state.tx.update(grads, state.opt_state, state.params)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _tree_all_finite(batch_stats)
              & _tree_all_finite(optax.apply_updates(state.params, updates)))
    new_state = jax.lax.cond(finite, lambda: _updated(state, grads, batch_stats), lambda: state)
    return new_state, finite, grad_norm


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, label_smoothing: float = 0.05,
               mixup_alpha: float = 0.4, mixup_prob: float = 0.5, cutmix_alpha: float = 0.0,
               cutmix_share: float = 0.5, loss: str = 'cross_entropy',
               cosine_ce_weight: float = 0.1, teacher: Any = None,
               teacher_apply: Callable | None = None, distill_weight: float = 0.5,
               distill_temperature: float = 4.0, cskd_weight: float = 0.0,
               cskd_temperature: float = 4.0) -> tuple[TrainState, Metrics]:
    """One optimiser step. Defaults are the seed's values (cutmix_alpha 0: MixUp only; the
    label-smoothed cross-entropy; `loss='cosine'`: see `losses.mixed_loss`).

    Distillation (not the seed): with `teacher` variables and their `teacher_apply`, the loss
    is (1 - distill_weight) x the above + distill_weight x `losses.distillation_loss` against
    the teacher's logits on the same (mixed) images, in inference mode.

    Class-wise self-knowledge distillation (CS-KD, Yun et al. 2020; not the seed): with
    `cskd_weight` > 0 the batch also holds 'pair_image', another image of each one's class;
    the loss adds cskd_weight x `losses.distillation_loss` against the network's own logits on
    those (the current weights, train-mode BN on the pair batch, no gradient; their BN
    statistics are not kept). A MixUp/CutMix batch mixes the pair images with the same key
    (the same coin, lam and partners), so a mixed image's target is the prediction on the
    same mixture of its classes' other images.

    A non-finite loss, gradient, BatchNorm statistic or update leaves the state unchanged and
    reports `finite=0` (`apply_gradients_if_finite`), so a NaN can never reach parameters or
    checkpoints; the caller decides to stop.
    Train accuracy is measured against the *original* labels (labels_a), also on MixUp batches
    (`mixed` says which), as the seed did.
    """
    mix_rng, dropout_rng = jax.random.split(rng)
    images, labels_a, labels_b, lam = mix_batch(mix_rng, batch['image'], batch['label'],
                                                mixup_alpha, mixup_prob, cutmix_alpha,
                                                cutmix_share)
    teacher_logits = None if teacher is None else teacher_apply(teacher, images, train=False)
    pair_logits = None
    if cskd_weight > 0:
        if 'pair_image' not in batch:
            raise ValueError("cskd_weight > 0 needs batches with 'pair_image' (the loaders' "
                             'partners=True)')
        pair_images = mix_batch(mix_rng, batch['pair_image'], batch['label'], mixup_alpha,
                                mixup_prob, cutmix_alpha, cutmix_share)[0]
        pair_logits, _ = state.apply_fn(
            {'params': state.params, 'batch_stats': state.batch_stats}, pair_images,
            train=True, rngs={'dropout': jax.random.fold_in(dropout_rng, 1)},
            mutable=['batch_stats'])

    def loss_fn(params):
        logits, new_model_state = state.apply_fn(
            {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
            rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
        value = mixed_loss(logits, labels_a, labels_b, lam, label_smoothing, loss,
                           cosine_ce_weight).mean()
        if teacher_logits is not None:
            kd = distillation_loss(logits, teacher_logits, distill_temperature).mean()
            value = (1.0 - distill_weight) * value + distill_weight * kd
        if pair_logits is not None:
            value = value + cskd_weight * distillation_loss(logits, pair_logits,
                                                            cskd_temperature).mean()
        return value, (logits, new_model_state)

    (value, (logits, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    new_state, finite, grad_norm = apply_gradients_if_finite(
        state, grads, new_model_state['batch_stats'], value)
    metrics = {
        'loss': value,
        'accuracy': jnp.mean(topk_correct(logits, labels_a, 1)),
        'mixed': (lam < 1.0).astype(jnp.float32),
        'lr': jnp.asarray(state.lr_schedule(state.step), jnp.float32),
        'grad_norm': grad_norm,
        'finite': finite.astype(jnp.float32),
    }
    return new_state, metrics


def augment_on_device(name: str, backend: str) -> bool:
    """Whether config.augment_on means the decode-once + on-device augmentation path:
    'auto' is on on accelerators (there the per-image CPU pipeline, not the network, sets the
    pace) and off on CPU, where both would share the same cores."""
    if name not in ('auto', 'host', 'device'):
        raise ValueError(f'augment_on must be auto, host or device, got {name!r}')
    return name == 'device' or (name == 'auto' and backend != 'cpu')


def cached_step_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The device path's one RNG convention: a step's `rng` splits into the augmentation key
    and the rng that `train_step` gets (MixUp and dropout)."""
    aug_key, step_rng = jax.random.split(rng)
    return aug_key, step_rng


def augment_cached_batch(batch: Batch, key: jax.Array, aug: AugmentConfig) -> Batch:
    """A batch of decode-once cache images (uint8 (B, C, C, 3) + their original `orig_hw`)
    through the seed's random train transform on the device (`device_augment.py`), drawn from
    `key`: the float {'image', 'label'} batch that `train_step` takes."""
    params = sample_device_params(key, batch['orig_hw'], aug)
    out = {'image': augment_batch(batch['image'], params, aug), 'label': batch['label']}
    if 'pair_image' in batch:                     # CS-KD partners: their own draws
        pair = sample_device_params(jax.random.fold_in(key, 1), batch['pair_orig_hw'], aug)
        out['pair_image'] = augment_batch(batch['pair_image'], pair, aug)
    return out


def train_step_cached(state: TrainState, batch: Batch, rng: jax.Array, *, aug: AugmentConfig,
                      **step_kwargs) -> tuple[TrainState, Metrics]:
    """The one "augment on the device, then step": `train_step` on a decode-once cache batch,
    augmented inside the jitted step (`augment_cached_batch`). `rng` is split once
    (`cached_step_keys`) into the augmentation key and `train_step`'s rng."""
    aug_key, step_rng = cached_step_keys(rng)
    return train_step(state, augment_cached_batch(batch, aug_key, aug), step_rng, **step_kwargs)


def eval_step(state: TrainState, batch: Batch, *, label_smoothing: float = 0.05,
              flip_tta: bool = False, loss: str = 'cross_entropy',
              cosine_ce_weight: float = 0.1) -> Metrics:
    """Sums over the batch (divide by `count`): loss (the training loss unmixed: the seed's
    label-smoothed criterion by default),
    top-1 and top-5 hits. An optional `mask` marks padding. flip_tta: score the mean of the
    logits of each image and its mirror image (not the seed; cars are left-right symmetric
    enough that the two views are near-independent evidence)."""
    variables = inference_variables(state)
    logits = state.apply_fn(variables, batch['image'], train=False)
    if flip_tta:
        mirrored = state.apply_fn(variables, batch['image'][:, :, ::-1], train=False)
        logits = (logits.astype(jnp.float32) + mirrored.astype(jnp.float32)) / 2
    mask = batch.get('mask', jnp.ones(batch['label'].shape, jnp.float32))
    k5 = min(5, logits.shape[-1])
    return {
        'loss_sum': jnp.sum(mixed_loss(logits, batch['label'], batch['label'], 1.0,
                                       label_smoothing, loss, cosine_ce_weight) * mask),
        'correct_sum': jnp.sum(topk_correct(logits, batch['label'], 1) * mask),
        'top5_sum': jnp.sum(topk_correct(logits, batch['label'], k5) * mask),
        'count': jnp.sum(mask),
    }


def predict_step(state: TrainState, images: jax.Array) -> jax.Array:
    """Class probabilities in inference mode (BN running stats, no dropout; the EMA if kept)."""
    logits = state.apply_fn(inference_variables(state), images, train=False)
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def data_parallel_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ('data') over all devices (every process's, in a multi-process run): the
    batch is split along it, the state replicated. With one device every sharding is trivial and nothing changes."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), ('data',))


def replicated_sharding(mesh: Mesh | None = None) -> NamedSharding:
    """Where the train state lives: replicated over `mesh`, or on the first device without one.
    The steps of `make_steps` take and return it there; a state put there before the first
    step (`jax.device_put(state, replicated_sharding(mesh))`) meets the program compiled for it
    on every call, fresh or restored."""
    return NamedSharding(mesh if mesh is not None else data_parallel_mesh(jax.devices()[:1]), P())


def mix_hyperparameters(config: ml_collections.ConfigDict) -> dict[str, float]:
    """The train step's loss and batch-mixing keywords from a config."""
    return dict(label_smoothing=float(config.label_smoothing),
                mixup_alpha=float(config.mixup_alpha), mixup_prob=float(config.mixup_prob),
                cutmix_alpha=float(config.cutmix_alpha),
                cutmix_share=float(config.cutmix_share), loss=str(config.loss),
                cosine_ce_weight=float(config.cosine_ce_weight))


def make_steps(config: ml_collections.ConfigDict, mesh: Mesh | None = None,
               device_aug: AugmentConfig | None = None,
               teacher_apply: Callable | None = None) -> tuple[Callable, Callable]:
    """train_step / eval_step with the config's hyperparameters bound, each jitted once.

    The state is donated to the train step: XLA updates parameters in place. Both steps take
    and return the state at `replicated_sharding(mesh)` (without a mesh: the first device),
    wherever it comes from, so a fresh and a restored state run the same compiled program (put
    a fresh one there first to skip a second trace at the first step). With a `mesh`
    (data parallelism without pmap): batches are sharded over its 'data' axis and the state
    replicated; XLA's SPMD partitioner inserts the gradient all-reduce, and BatchNorm's batch
    statistics are means over the *global* batch, so the trajectory equals one device's.
    With `device_aug` the train step takes decode-once cache batches and augments them itself
    (`train_step_cached`); its `image_size` keyword is the augmentation's output size when it
    is not device_aug's (progressive resizing; each size compiles once). With
    `teacher_apply` (distillation) the train step takes the teacher's variables as its 4th
    argument: `train_fn(state, batch, rng, teacher)`. With config.cskd_weight > 0 (CS-KD) the
    batches carry 'pair_image' (and, on the device path, 'pair_orig_hw').
    """
    kw = mix_hyperparameters(config)
    if teacher_apply is not None:
        kw.update(teacher_apply=teacher_apply, distill_weight=float(config.distill_weight),
                  distill_temperature=float(config.distill_temperature))
    if config.cskd_weight > 0:
        kw.update(cskd_weight=float(config.cskd_weight),
                  cskd_temperature=float(config.cskd_temperature))

    def train_fn(s, b, r, teacher=None, image_size=None):
        if device_aug is None:
            return train_step(s, b, r, teacher=teacher, **kw)
        aug = device_aug if image_size in (None, device_aug.image_size) else \
            dataclasses.replace(device_aug, image_size=image_size)
        return train_step_cached(s, b, r, aug=aug, teacher=teacher, **kw)
    eval_fn = lambda s, b: eval_step(s, b, label_smoothing=config.label_smoothing,
                                     flip_tta=bool(config.eval_flip_tta),
                                     loss=str(config.loss),
                                     cosine_ce_weight=float(config.cosine_ce_weight))
    # Shardings are given on one device too: without them, the program XLA compiles depends on
    # whether the arguments are committed to a device (a fresh state is not, a restored one
    # is, and a step's outputs are if any input was), so a resumed run compiled each step
    # twice more (first with the restored state, then with its own outputs) than a fresh one.
    replicated = replicated_sharding(mesh)
    mesh = replicated.mesh
    if config.batch_size % mesh.size:
        raise ValueError(f'--config.batch_size={config.batch_size} must be divisible by the '
                         f'{mesh.size} devices of the data-parallel mesh.')
    split = NamedSharding(mesh, P('data'))
    teacher_in = (replicated,) if teacher_apply is not None else ()
    jit_train = functools.partial(jax.jit, donate_argnums=(0,),
                                  in_shardings=(replicated, split, replicated) + teacher_in,
                                  out_shardings=(replicated, replicated))
    if device_aug is None:
        train = jit_train(train_fn)
    else:   # jit takes no keyword arguments once shardings are given: one program per size
        train = _PerImageSize(lambda size: jit_train(functools.partial(train_fn, image_size=size)),
                              device_aug.image_size)
    evaluate = jax.jit(eval_fn, in_shardings=(replicated, split), out_shardings=replicated)
    return train, evaluate


class _PerImageSize:
    """The device path's train step called as `train(state, batch, rng[, teacher],
    image_size=None)`: a jitted program per augmentation output size, made on first use."""

    def __init__(self, make: Callable[[int | None], Callable], default_size: int):
        self._make, self._default, self._by_size = make, default_size, {}

    def __call__(self, state, batch, rng, *teacher, image_size=None):
        size = None if image_size == self._default else image_size
        if size not in self._by_size:
            self._by_size[size] = self._make(size)
        return self._by_size[size](state, batch, rng, *teacher)
