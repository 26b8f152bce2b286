"""Grain input pipelines: class-weighted sampling, decode + augment per image, batching.

One train epoch is a `grain.MapDataset` fixed by (seed, epoch): the sampled indices, every
augmentation draw and the batch order follow from them, so an iterator's `get_state()` (a
position) plus the epoch number is everything a resumed run needs to continue exactly.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grain
from absl import flags
import numpy as np

from cars_jax.distributed import shard_rows
from cars_jax.data.augment import AugmentConfig, eval_transform, train_transform
from cars_jax.data.sources import Record, decode_image

Batch = dict[str, np.ndarray]


def class_balanced_probabilities(labels: np.ndarray) -> np.ndarray:
    """Per-sample probability proportional to 1 / (size of its class), as the seed's sampler."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return weights / weights.sum()


def epoch_indices(labels: np.ndarray, seed: int, epoch: int, weighted: bool = True) -> np.ndarray:
    """Record indices of one epoch, deterministic from (seed, epoch).

    weighted: len(labels) draws WITH replacement, p ~ 1/class count (PyTorch's
    WeightedRandomSampler(weights, num_samples=len(weights), replacement=True)).
    Otherwise a plain shuffle (DataLoader(shuffle=True)).
    """
    rng = np.random.default_rng([seed, epoch, 0x5A3])
    n = len(labels)
    if weighted:
        return rng.choice(n, size=n, replace=True, p=class_balanced_probabilities(labels))
    return rng.permutation(n)


def same_class_partners(labels: np.ndarray, indices: np.ndarray, seed: int,
                        epoch: int) -> np.ndarray:
    """For each drawn record index, another record of the same class, uniformly at random
    (itself only when it is alone in its class), deterministic from (seed, epoch): the pairs
    of class-wise self-knowledge distillation (CS-KD's PairBatchSampler draws from the whole
    class, itself included; here never itself, so every pair is two different photos)."""
    labels, indices = np.asarray(labels), np.asarray(indices)
    rng = np.random.default_rng([seed, epoch, 0xC5D])
    by_class = np.argsort(labels, kind='stable')            # records grouped by class
    counts = np.bincount(labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.empty(len(labels), np.int64)                  # each record's place in its class
    slot[by_class] = np.arange(len(labels)) - starts[labels[by_class]]
    cls, own = labels[indices], slot[indices]
    size = counts[cls]
    draw = (rng.random(len(indices)) * np.maximum(size - 1, 1)).astype(np.int64)
    draw = np.where(size > 1, draw + (draw >= own), own)     # skip over itself
    return by_class[starts[cls] + draw]


def _decode_or_substitute(records: Sequence[Record], index: int, use_bbox: bool,
                          margin: int) -> tuple[int, np.ndarray]:
    """Decodes a record; if it became unreadable since the start-up scan, logs it and uses the
    next readable record instead, so a bad file never ends an epoch."""
    for k in range(min(len(records), 16)):
        j = (index + k) % len(records)
        rec = records[j]
        try:
            bbox = rec.bbox if use_bbox else None
            return j, decode_image(rec, bbox=bbox, bbox_margin=margin)
        except Exception as e:  # noqa: BLE001 - any decode failure is a skipped file
            logging.warning('Skipping unreadable image %s (%s); using the next record.',
                            rec.key or index, e)
    raise RuntimeError(f'16 consecutive records from {index} are unreadable; check the data.')


@dataclasses.dataclass(frozen=True)
class TrainMap(grain.transforms.Map):
    """Decode + the seed's augmentation. An element is (global position in the epoch, record
    index); the draws come from (seed, epoch, position), so they do not depend on how the
    epoch is split over processes or workers."""
    records: Sequence[Record]
    aug: AugmentConfig
    seed: int
    epoch: int
    use_bbox: bool = False
    bbox_margin: int = 0
    two_views: bool = False   # also 'image2': a second, independent augmentation (SimCLR)

    def map(self, element: np.ndarray) -> dict:
        """element: (position, record) or, with CS-KD pairs, (position, record, partner)."""
        position, record = int(element[0]), int(element[1])
        rng = np.random.default_rng([self.seed, self.epoch, 0xA06, position])
        index, image = _decode_or_substitute(self.records, record, self.use_bbox,
                                             self.bbox_margin)
        out = {'image': train_transform(image, rng, self.aug),
               'label': np.int32(self.records[index].label),
               'index': np.int32(index)}
        if self.two_views:
            rng2 = np.random.default_rng([self.seed, self.epoch, 0xA06, position, 2])
            out['image2'] = train_transform(image, rng2, self.aug)
        if len(element) > 2:
            # a partner that became unreadable is replaced by the next readable record (which
            # may be of another class: rare, logged, and only weakens that one image's target)
            _, partner = _decode_or_substitute(self.records, int(element[2]), self.use_bbox,
                                               self.bbox_margin)
            rng3 = np.random.default_rng([self.seed, self.epoch, 0xA06, position, 3])
            out['pair_image'] = train_transform(partner, rng3, self.aug)
        return out


@dataclasses.dataclass(frozen=True)
class EvalMap(grain.transforms.Map):
    """Decode + the eval resize. An element >= len(records) is padding (of a sharded eval):
    record element % n, with mask 0."""
    records: Sequence[Record]
    aug: AugmentConfig
    use_bbox: bool = False
    bbox_margin: int = 0

    def map(self, element: int) -> dict:
        n = len(self.records)
        index, image = _decode_or_substitute(self.records, int(element) % n, self.use_bbox,
                                             self.bbox_margin)
        return {'image': eval_transform(image, self.aug),
                'label': np.int32(self.records[index].label),
                'index': np.int32(index),
                'mask': np.float32(int(element) < n)}


def _read_options(num_workers: int, prefetch: int) -> grain.ReadOptions:
    # In-process threads are the fastest option on few cores (PIL releases the GIL).
    return grain.ReadOptions(num_threads=max(2, 2 * num_workers), prefetch_buffer_size=max(prefetch, 1) * 8)


def _to_iter(ds: grain.MapDataset, num_workers: int, prefetch: int) -> grain.IterDataset:
    it = ds.to_iter_dataset(_read_options(num_workers, prefetch))
    if num_workers > 0:
        # Grain's worker processes read absl flags; outside `app.run` (notebooks, pytest) they
        # are unparsed and grain raises UnparsedFlagAccessError. Use the flag defaults then.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=max(prefetch, 1)))
    return it


def epoch_batch_sizes(num_records: int, batch_size: int, max_steps: int = 0,
                      drop_last: bool = False, num_devices: int = 1) -> list[int]:
    """The global batch sizes of one train epoch, in order.

    As the seed's DataLoader(drop_last=False): full batches, then the remainder as one last
    partial batch (ceil(N / batch_size) steps). drop_last: full batches only (N // batch_size).
    num_devices (of the data-parallel mesh, every process's): the partial batch is split over
    them, so it is cut down to a multiple of num_devices; at most num_devices - 1 images of the
    epoch's draw go unused, and none when the remainder divides. max_steps > 0 cuts the epoch
    to its first max_steps batches (smoke tests)."""
    full, rest = divmod(int(num_records), int(batch_size))
    rest = 0 if drop_last else rest - rest % max(int(num_devices), 1)
    sizes = [int(batch_size)] * full + ([rest] if rest else [])
    return sizes[:max_steps] if max_steps > 0 else sizes


def steps_per_epoch(num_records: int, batch_size: int, max_steps: int = 0,
                    drop_last: bool = False, num_devices: int = 1) -> int:
    """Optimizer steps per epoch: ceil(N / batch_size) (the seed), see `epoch_batch_sizes`."""
    return len(epoch_batch_sizes(num_records, batch_size, max_steps, drop_last, num_devices))


def _epoch_rows(num_records: int, batch_size: int, max_steps: int, drop_last: bool,
                num_devices: int) -> int:
    return sum(epoch_batch_sizes(num_records, batch_size, max_steps, drop_last, num_devices))


def train_epoch_dataset(records: Sequence[Record], labels: np.ndarray, aug: AugmentConfig, *,
                        seed: int, epoch: int, batch_size: int, weighted: bool = True,
                        use_bbox: bool = False, bbox_margin: int = 0, max_steps: int = 0,
                        drop_last: bool = False, num_devices: int = 1,
                        num_workers: int = 0, prefetch: int = 4,
                        shard: tuple[int, int] = (0, 1),
                        two_views: bool = False, partners: bool = False) -> grain.IterDataset:
    """The train batches of one epoch (`epoch_batch_sizes`: full batches and, unless
    drop_last, one last partial batch; the train step compiles once more for its shape).
    shard=(process_index, process_count): this process's rows of each global batch.
    two_views: each image twice, independently augmented ('image', 'image2'; SimCLR).
    partners: also 'pair_image', another image of each one's class (`same_class_partners`;
    CS-KD)."""
    rows = _epoch_rows(len(records), batch_size, max_steps, drop_last, num_devices)
    indices = epoch_indices(labels, seed, epoch, weighted)[:rows]
    # The source is (position in the epoch, record index[, partner index]) rows; the map holds
    # the records, decodes by index and draws the augmentation from the position.
    columns = [np.arange(len(indices)), indices]
    if partners:
        columns.append(same_class_partners(labels, indices, seed, epoch))
    elements = np.stack(columns, axis=1)
    elements = elements[shard_rows(np.arange(len(indices)), batch_size, *shard)]
    batch_size //= shard[1]
    ds = (grain.MapDataset.source(elements)
          .map(TrainMap(records, aug, seed, epoch, use_bbox, bbox_margin, two_views))
          .batch(batch_size, drop_remainder=False))
    return _to_iter(ds, num_workers, prefetch)


def eval_dataset(records: Sequence[Record], aug: AugmentConfig, *, batch_size: int,
                 use_bbox: bool = False, bbox_margin: int = 0, num_workers: int = 0,
                 prefetch: int = 4, shard: tuple[int, int] = (0, 1)) -> grain.IterDataset:
    """Deterministic eval batches; the last one is short (pad it with `pad_batch`).
    Sharded over processes, the records are padded to whole global batches (mask 0) and each
    process reads its rows of each, so every process runs the same number of steps."""
    n = len(records)
    indices = np.arange(n)
    if shard[1] > 1:
        total = -(-n // batch_size) * batch_size
        indices = shard_rows(np.arange(total), batch_size, *shard)   # >= n: padding
        batch_size //= shard[1]
    ds = (grain.MapDataset.source(indices)
          .map(EvalMap(records, aug, use_bbox, bbox_margin))
          .batch(batch_size, drop_remainder=False))
    return _to_iter(ds, num_workers, prefetch)


@dataclasses.dataclass(frozen=True)
class GatherCached(grain.transforms.Map):
    """A batch of indices -> the cached uint8 images (one fancy-index copy per batch), their
    original sizes and labels. Augmentation happens later, on the device. A batch of
    (index, partner) rows also gives the partners' 'pair_image' and 'pair_orig_hw' (CS-KD)."""
    images: np.ndarray
    orig_hw: np.ndarray
    labels: np.ndarray

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        idx = np.sort(rows)                       # sorted reads are kinder to a memmap
        return np.asarray(self.images[idx])[np.argsort(np.argsort(rows))]

    def map(self, element: np.ndarray) -> dict:
        element = np.asarray(element)
        rows = element[:, 0] if element.ndim == 2 else element
        out = {'image': self._gather(rows),
               'orig_hw': self.orig_hw[rows].astype(np.int32),
               'label': np.asarray(self.labels)[rows].astype(np.int32),
               'index': rows.astype(np.int32)}
        if element.ndim == 2:
            out['pair_image'] = self._gather(element[:, 1])
            out['pair_orig_hw'] = self.orig_hw[element[:, 1]].astype(np.int32)
        return out


def cached_train_epoch_dataset(images: np.ndarray, orig_hw: np.ndarray, labels: np.ndarray, *,
                               seed: int, epoch: int, batch_size: int, weighted: bool = True,
                               max_steps: int = 0, drop_last: bool = False,
                               num_devices: int = 1, prefetch: int = 4,
                               shard: tuple[int, int] = (0, 1),
                               partners: bool = False) -> grain.IterDataset:
    """The train batches of one epoch from a decode-once cache (`cache.build_cache`): the same
    indices as `train_epoch_dataset`, un-augmented uint8 images + orig_hw for the device path.
    The host only copies memory, so in-process threads are enough. partners: as there."""
    labels = np.asarray(labels)
    rows = _epoch_rows(len(labels), batch_size, max_steps, drop_last, num_devices)
    indices = epoch_indices(labels, seed, epoch, weighted)[:rows]
    if partners:
        indices = np.stack([indices, same_class_partners(labels, indices, seed, epoch)], axis=1)
    indices = indices[shard_rows(np.arange(len(indices)), batch_size, *shard)]
    batch_size //= shard[1]
    ds = (grain.MapDataset.source(indices)
          .batch(batch_size, drop_remainder=False)
          .map(GatherCached(images, orig_hw, labels)))
    return _to_iter(ds, 0, prefetch)


def pad_batch(batch: Batch, batch_size: int) -> Batch:
    """Pads a short batch to batch_size and adds `mask` (1 real, 0 padding), so that the eval
    step compiles once for every batch."""
    n = len(batch['label'])
    mask = batch.get('mask', np.ones(n, np.float32))
    out = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
           if n < batch_size else v for k, v in batch.items()}
    out['mask'] = np.concatenate([mask, np.zeros(batch_size - n, np.float32)]).astype(np.float32)
    return out


def iterate(ds: grain.IterDataset, state: dict[str, Any] | None = None) -> Iterator[Batch]:
    """An iterator over `ds`, positioned at a checkpointed `get_state()` when given."""
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return it
