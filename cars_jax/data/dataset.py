"""From a config to the train / validation / test records: source, scan, split."""
from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from cars_jax.data import sources
from cars_jax.data.sources import DataError, Record


@dataclasses.dataclass
class DataBundle:
    train: Sequence[Record]
    val: Sequence[Record]
    test: Sequence[Record]            # empty when the source has no labelled test split
    class_names: list[str]
    skipped: list[tuple[str, str]]    # (file, reason) of unreadable files left out
    notes: list[str]                  # what the user should know about the protocol
    val_is_test: bool = False         # validation is the test split (val_split='test')

    @property
    def train_labels(self) -> np.ndarray:
        return sources.labels_of(self.train)

    def describe(self) -> str:
        """'920 train / 280 val images (validation = the test split)': what each split is."""
        if self.val_is_test:
            return (f'{len(self.train)} train / {len(self.val)} val images (validation = the '
                    'test split)')
        if not len(self.test):
            return (f'{len(self.train)} train / {len(self.val)} val images (held out of train), '
                    'no test split')
        return (f'{len(self.train)} train / {len(self.val)} val (held out of train) / '
                f'{len(self.test)} test images')


class _Subset(Sequence):
    """records[indices] without copying (a TFDS source stays lazy)."""

    def __init__(self, records: Sequence[Record], indices: np.ndarray):
        self.records, self.indices = records, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.records[int(self.indices[i])]

    def labels(self) -> np.ndarray:
        return sources.labels_of(self.records)[self.indices]


def scan_cache_path(data_dir: str) -> str:
    """The bad-file scan is cached beside the data when writable, else under ~/.cache."""
    data_dir = os.path.abspath(data_dir)
    if os.access(data_dir, os.W_OK):
        return os.path.join(data_dir, '.cars_jax_scan.json')
    digest = hashlib.sha1(data_dir.encode()).hexdigest()[:16]
    cache = Path(os.environ.get('XDG_CACHE_HOME', Path.home() / '.cache')) / 'cars_jax'
    cache.mkdir(parents=True, exist_ok=True)
    return str(cache / f'scan-{digest}.json')


def load_source(config: ml_collections.ConfigDict) -> sources.Splits:
    """The records of the configured layout (generating the demo data on first use)."""
    if config.data_source == 'demo':
        from cars_jax.data.synthetic import ensure_demo_dataset
        ensure_demo_dataset(config.data_dir, seed=0)
        return sources.load_image_folders(config.data_dir)
    if config.data_source == 'folders':
        return sources.load_image_folders(config.data_dir)
    if config.data_source == 'devkit':
        return sources.load_devkit(config.data_dir)
    if config.data_source == 'tfds':
        return sources.load_tfds(config.tfds_name, config.data_dir or None)
    raise DataError(f'unknown data_source {config.data_source!r}')


def build_data(config: ml_collections.ConfigDict) -> DataBundle:
    """Records for training, model selection (val) and the final report (test)."""
    splits = load_source(config)
    notes: list[str] = list(splits.warnings)
    skipped: list[tuple[str, str]] = []
    train, test = splits.train, splits.test   # lazy sequences for TFDS: never listed whole
    if config.data_source != 'tfds':
        cache = scan_cache_path(config.data_dir)
        train, bad_train = sources.scan_records(train, cache_path=cache)
        test, bad_test = sources.scan_records(test, cache_path=cache)
        skipped = bad_train + bad_test     # reported by the caller (train: log + JSON)
    if config.use_bbox:
        notes.extend(_bbox_note(list(train) + list(test)))
    if config.num_classes and config.num_classes != len(splits.class_names):
        raise DataError(
            f'--config.num_classes={config.num_classes} but {config.data_dir} has '
            f'{len(splits.class_names)} classes; set --config.num_classes=0 to take it from the data.')
    if len(train) == 0:
        raise DataError(f'no readable training images under {config.data_dir}.')
    if config.val_split == 'holdout' or len(test) == 0:
        if config.val_split == 'test':
            notes.append('The source has no labelled test split: validating on a stratified '
                         f'{config.val_fraction:.0%} of train instead (val_split=holdout).')
        tr_idx, val_idx = sources.stratified_split(sources.labels_of(train), config.val_fraction,
                                                   config.seed)
        val = _Subset(train, val_idx)
        train = _Subset(train, tr_idx)
        notes.append(f'Validation = a seeded, stratified {config.val_fraction:.0%} of the train '
                     'split; the test split (if any) is evaluated once, with the best checkpoint.')
    else:
        val = test
        notes.append('Validation = the test split, as the seed did (model selection on test is '
                     'optimistic; use --config.val_split=holdout for an honest test number).')
    return DataBundle(train=train, val=val, test=test if config.val_split == 'holdout' else [],
                      class_names=list(splits.class_names), skipped=skipped, notes=notes,
                      val_is_test=val is test)


def _bbox_note(records: Sequence[Record]) -> list[str]:
    """One line on the boxes that pass their image's edge (crop_box clips them), if any."""
    boxed = [r for r in records if r.bbox is not None and isinstance(r.image, str)]
    past, outside = sources.count_boxes_past_the_edge(boxed)
    if not past:
        return []
    return [f'{past} of {len(boxed)} bounding boxes extend past their image and are clipped to '
            f'it ({outside} lie{"s" if outside == 1 else ""} entirely outside it: the whole '
            'image is used).' if outside else
            f'{past} of {len(boxed)} bounding boxes extend past their image and are clipped to '
            'it.']
