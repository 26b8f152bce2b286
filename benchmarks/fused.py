"""Whole epochs on the accelerator: a resident dataset and `lax.scan` over train steps, the
tool of the fused benchmark (`benchmarks/bench.py fused`); the training loop (main.py) does not
use it.

The host pipeline decodes, augments and ships every batch, and dispatches one jitted step per
batch. Here the dataset is decoded ONCE into a uint8 cache (N, C, C, 3) that stays on the
device with each image's original (h, w) and label; one jitted call then runs K train steps
under `jax.lax.scan`: step i gathers its batch from the resident arrays and calls the SAME
pure `steps.train_step_cached` as the loop's decode-once path (the device augmentation, then
`steps.train_step`: MixUp, label-smoothed CE, BatchNorm statistics, the non-finite guard, the
per-step optax schedule). No host round trip per step; the per-step semantics are the recipe's.

Randomness: a chunk gets one key; step i's rng is `fold_in(key, i)` (`chunk_step_key`), so a
Python loop of `train_step_cached` over the gathered batches reproduces a chunk.

Memory: the cache is N * C * C * 3 bytes (Stanford Cars train, 8144 images at C = 256: 1.6 GB;
the test split at the eval size 224: 1.2 GB); only one augmented batch exists at a time.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cars_jax.data.augment import AugmentConfig
from cars_jax.steps import (Batch, Metrics, TrainState, eval_step, mix_hyperparameters,
                            train_step_cached)


class DeviceDataset(NamedTuple):
    """The decoded train set, resident on the device (a pytree: pass it to jitted calls)."""
    images: jax.Array    # (N, C, C, 3) uint8: every image squashed once to the cache size
    orig_hw: jax.Array   # (N, 2) int32: ORIGINAL (height, width), what the crop draws refer to
    labels: jax.Array    # (N,) int32


def device_dataset(images: np.ndarray, orig_hw: np.ndarray, labels: np.ndarray,
                   device: jax.Device | None = None) -> DeviceDataset:
    """Checks the host arrays and puts them on the device once. Checked here because inside
    the scan a bad entry fails silently: an original size of 0 makes the augmentation NaN
    (the step is then skipped as non-finite), a label out of range a wrong one-hot."""
    images, orig_hw, labels = np.asarray(images), np.asarray(orig_hw), np.asarray(labels)
    n = len(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f'images must be uint8 (N, C, C, 3), got {images.dtype} {images.shape}')
    if orig_hw.shape != (n, 2) or (orig_hw < 1).any():
        raise ValueError(f'orig_hw must be (N, 2) sizes >= 1, got shape {orig_hw.shape}')
    if labels.shape != (n,) or (labels < 0).any():
        raise ValueError(f'labels must be (N,) >= 0, got shape {labels.shape}')
    put = lambda x, dtype: jax.device_put(x.astype(dtype, copy=False), device)
    return DeviceDataset(put(images, np.uint8), put(orig_hw, np.int32), put(labels, np.int32))


class FusedSteps(NamedTuple):
    """make_fused_steps' jitted functions (config hyperparameters bound)."""
    train_chunk: Callable      # (state, data, indices (K, B), key) -> (state, metrics (K,))
    evaluate: Callable         # (state, images (M, S, S, 3) uint8, labels (M,)) -> sums
    epoch_indices: Callable    # (key, labels, num_steps) -> (num_steps, B) int32


@functools.partial(jax.jit, static_argnames=('num_steps', 'batch_size', 'weighted',
                                             'num_classes'))
def device_epoch_indices(key: jax.Array, labels: jax.Array, num_steps: int, batch_size: int,
                         weighted: bool, num_classes: int) -> jax.Array:
    """One epoch's record indices as (num_steps, batch_size) int32, drawn on the device.

    weighted: draws WITH replacement, p ~ 1 / (size of the record's class), as the seed's
    WeightedRandomSampler (and pipeline.epoch_indices); any number of draws. Otherwise a
    permutation of range(N) truncated to num_steps * batch_size (the dropped remainder), which
    must not exceed N. Deterministic per key."""
    labels = jnp.asarray(labels, jnp.int32)
    n = labels.shape[0]
    total = num_steps * batch_size
    if weighted:
        counts = jnp.bincount(labels, length=num_classes)
        # every record's class has count >= 1, so the weights are finite
        weights = 1.0 / counts[labels].astype(jnp.float32)
        idx = jax.random.choice(key, n, shape=(total,), replace=True, p=weights / weights.sum())
    else:
        if total > n:
            raise ValueError(f'{num_steps} steps x {batch_size} > {n} records: a permutation '
                             'cannot fill them (drop remainder: num_steps = N // batch_size)')
        idx = jax.random.permutation(key, n)[:total]
    return idx.astype(jnp.int32).reshape(num_steps, batch_size)


def chunk_step_key(key: jax.Array, i: jax.Array | int) -> jax.Array:
    """The rng of step i of a chunk (what `steps.train_step_cached` gets)."""
    return jax.random.fold_in(key, i)


def gather_batch(data: DeviceDataset, idx_row: jax.Array) -> Batch:
    """Records idx_row (B,) of the resident arrays as a decode-once cache batch (uint8 images,
    original sizes, labels): what `steps.train_step_cached` takes."""
    return {'image': jnp.take(data.images, idx_row, axis=0),
            'orig_hw': jnp.take(data.orig_hw, idx_row, axis=0),
            'label': jnp.take(data.labels, idx_row, axis=0)}


def train_chunk(state: TrainState, data: DeviceDataset, indices: jax.Array, key: jax.Array, *,
                aug: AugmentConfig, **step_kwargs: float) -> tuple[TrainState, Metrics]:
    """K = len(indices) train steps in one `lax.scan` (one dispatch, no host round trip): step
    i is `steps.train_step_cached` on `gather_batch(data, indices[i])` with
    `chunk_step_key(key, i)`.

    Returns the state after the K steps and each step's metrics stacked on a leading K axis
    (`finite` among them: a non-finite step left the state unchanged, as in the loop; the
    caller checks it once per chunk)."""
    def body(carry: TrainState, xs: tuple[jax.Array, jax.Array]):
        idx_row, i = xs
        return train_step_cached(carry, gather_batch(data, idx_row), chunk_step_key(key, i),
                                 aug=aug, **step_kwargs)

    k = indices.shape[0]
    return jax.lax.scan(body, state, (jnp.asarray(indices, jnp.int32), jnp.arange(k)))


def normalize_uint8(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """ToTensor + Normalize on the device, the same float32 ops as `augment.normalize`:
    (x * (1/255) - mean) * (1/std)."""
    x = images.astype(jnp.float32) * jnp.float32(1 / 255)
    m = jnp.asarray(mean, jnp.float32)
    inv = jnp.float32(1.0) / jnp.asarray(std, jnp.float32)
    return (x - m) * inv


def evaluate_resident(state: TrainState, images: jax.Array, labels: jax.Array, *,
                      batch_size: int, mean: Sequence[float], std: Sequence[float],
                      label_smoothing: float) -> Metrics:
    """Sums (loss_sum, correct_sum, top5_sum, count) over a resident eval set.

    images (M, S, S, 3) uint8 are already resized to the eval size; batches of batch_size are
    gathered and normalised inside a `lax.scan` over `steps.eval_step`. The tail batch reads
    clipped indices and masks them out, so the eval set is never copied to pad it."""
    m = images.shape[0]
    n_batches = -(-m // batch_size)
    labels = jnp.asarray(labels, jnp.int32)

    def body(sums: Metrics, b: jax.Array):
        idx = b * batch_size + jnp.arange(batch_size)
        mask = (idx < m).astype(jnp.float32)
        idx = jnp.minimum(idx, m - 1)
        batch = {'image': normalize_uint8(jnp.take(images, idx, axis=0), mean, std),
                 'label': jnp.take(labels, idx, axis=0), 'mask': mask}
        out = eval_step(state, batch, label_smoothing=label_smoothing)
        return {k: sums[k] + out[k] for k in sums}, None

    zero = jnp.zeros((), jnp.float32)
    init = {'loss_sum': zero, 'correct_sum': zero, 'top5_sum': zero, 'count': zero}
    sums, _ = jax.lax.scan(body, init, jnp.arange(n_batches))
    return sums


def make_fused_steps(config: ml_collections.ConfigDict, aug: AugmentConfig,
                     num_classes: int) -> FusedSteps:
    """train_chunk / evaluate_resident / device_epoch_indices with the config bound, jitted.

    The state is donated to the chunk (parameters updated in place); the resident dataset is
    not. One compile per distinct chunk length K: run full chunks plus at most one shorter tail
    (or choose K dividing the epoch's steps). Single device (no mesh)."""
    hyper = mix_hyperparameters(config)
    batch_size, weighted = int(config.batch_size), bool(config.weighted_sampling)
    chunk = jax.jit(functools.partial(train_chunk, aug=aug, **hyper), donate_argnums=(0,))
    evaluate = jax.jit(functools.partial(evaluate_resident, batch_size=batch_size,
                                         mean=tuple(aug.mean), std=tuple(aug.std),
                                         label_smoothing=hyper['label_smoothing']))

    def epoch_indices(key: jax.Array, labels: jax.Array, num_steps: int) -> jax.Array:
        return device_epoch_indices(key, labels, num_steps, batch_size, weighted, num_classes)

    return FusedSteps(chunk, evaluate, epoch_indices)
