"""Record sources: image folders, the original Stanford Cars devkit, and TFDS.

Every source returns the same thing, a `Splits` of `Record`s: where the image is (a path,
encoded bytes or a decoded array), its 0-based class index, an optional bounding box in the
image's pixel coordinates, and a stable key for logs. Decoding is done later, per record,
by `decode_image` (in the input pipeline's workers); `scan_records` finds the files that
cannot be decoded before training starts, so one corrupt JPEG never stops a run midway.

    splits = load_image_folders('data/stanford_cars')   # <dir>/train|test/<class>/*.jpg
    splits = load_devkit('data/stanford_cars_devkit')   # cars_train/, devkit/*.mat
    splits = load_tfds('cars196', data_dir=...)         # a prepared ArrayRecord TFDS dataset
    good, skipped = scan_records(splits.train, cache_path='runs/x/scan_cache.json')
    if skipped: print(format_skipped(skipped))
    train_idx, val_idx = stratified_split(labels_of(good), 0.2, seed=0)
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import logging
import math
import os
from collections.abc import Sequence
import numpy as np
from PIL import Image

from cars_jax.fileio import write_json_atomic

__all__ = [
    'DataError', 'ImageDecodeError', 'Record', 'Splits', 'IMAGE_EXTENSIONS',
    'load_image_folders', 'load_devkit', 'load_tfds', 'TfdsRecords', 'labels_of',
    'stratified_split', 'decode_image', 'scan_records', 'format_skipped',
]

# Image files the folder source takes as records (lower-cased suffixes).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')

DEMO_HINT = ('To try the project without any data, `python main.py --config=configs/demo.py` '
             'trains on generated demo data instead.')

_FOLDERS_LAYOUT = ('<data_dir>/train/<class name>/*.jpg and <data_dir>/test/<class name>/*.jpg '
                   '(one folder per class; the same class folders in train and test)')

_DEVKIT_LAYOUT = ('<data_dir>/cars_train/*.jpg, <data_dir>/devkit/cars_meta.mat, '
                  '<data_dir>/devkit/cars_train_annos.mat and, for the official test split, '
                  '<data_dir>/cars_test/*.jpg with <data_dir>/cars_test_annos_withlabels.mat '
                  '(or in devkit/)')


class DataError(ValueError):
    """A problem with the user's data: the message names the path and what to do."""


class ImageDecodeError(DataError):
    """An image that cannot be read or decoded (corrupt, truncated, empty, not an image).
    `reason` is the short cause without the file name."""

    def __init__(self, message: str, reason: str = ''):
        super().__init__(message)
        self.reason = reason or message


@dataclasses.dataclass(frozen=True)
class Record:
    """One example. `image` is a file path, encoded bytes, or a decoded HxWx3 uint8 array."""
    image: str | bytes | np.ndarray
    label: int                                                # 0-based class index
    bbox: tuple[float, float, float, float] | None = None     # x1, y1, x2, y2 in pixels
    key: str = ''                                             # stable id for logs


@dataclasses.dataclass
class Splits:
    """The records of a source. `warnings` holds messages for the caller to print (e.g. that
    there is no test split, so a holdout split of train must be used)."""
    train: Sequence[Record]
    test: Sequence[Record]
    class_names: list[str]
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ------------------------------------------------------------------------------------------
# Image folders (torchvision ImageFolder layout)
# ------------------------------------------------------------------------------------------

def _is_image_file(name: str) -> bool:
    return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _class_dirs(split_dir: str) -> list[str]:
    # torchvision's find_classes: sorted(entry.name ... if entry.is_dir()), a case-sensitive
    # sort. Hidden folders (.ipynb_checkpoints, ...) are not classes here.
    with os.scandir(split_dir) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith('.'))


class _FolderScan:
    """Lists the images of every class folder of a data tree so that each real file counts
    once, under its own class folder, whatever the symlinks.

    Policy (as torchvision's ImageFolder, symlinks are followed, but with these guards):
    - a class folder that is itself a symlink is followed (once);
    - a symlinked file is followed, unless it resolves into another class's folder (of
      either split) or to a file already listed (e.g. via a second link, a hard link);
    - a subfolder (symlinked or not) is skipped when it resolves to a folder already
      walked (a loop, a second link to the same place), to a class folder or one that
      holds class folders (an ancestor such as `..`, a split folder), or into another
      class's folder.
    Skipped links are counted and listed in one warning; the first occurrence in sorted
    order (train before test, classes in index order) is the one kept.
    """

    def __init__(self, class_dirs: Sequence[str]):
        self.owner: dict[str, str] = {}          # real path of a class folder -> its path
        for d in class_dirs:
            self.owner.setdefault(os.path.realpath(d), d)
        self.holders = {parent for real in self.owner for parent in _parents(real)}
        self.walked: set[str] = set()            # real paths of the folders walked
        self.files: set[tuple[int, int]] = set()  # (st_dev, st_ino) of the files listed
        self.skipped: list[tuple[str, str]] = []  # (path, why)

    def _class_of(self, real: str) -> str | None:
        """The class folder a real path lies in (the innermost), None outside them all."""
        for p in [real, *_parents(real)]:
            if p in self.owner:
                return self.owner[p]
        return None

    def images(self, class_dir: str) -> list[str]:
        """Image paths under class_dir in torchvision's make_dataset order (sorted folder
        paths, then sorted names), without the links the policy skips."""
        real_root = os.path.realpath(class_dir)
        me = self.owner.get(real_root)
        if me != class_dir or real_root in self.walked:   # the same folder as another class
            self.skipped.append((class_dir, 'the same folder as another class folder'))
            return []
        found: list[tuple[str, list[os.DirEntry]]] = []
        stack = [(class_dir, real_root)]
        self.walked.add(real_root)
        while stack:
            path, real = stack.pop()
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError:
                continue
            files, subdirs = [], []
            for e in entries:
                if e.name.startswith('.'):
                    continue
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    if _is_image_file(e.name):
                        files.append(e)
                    continue
                sub_real = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, e.name)
                why = self._skip_folder(sub_real, me)
                if why:
                    self.skipped.append((e.path, why))
                else:
                    self.walked.add(sub_real)
                    subdirs.append((e.path, sub_real))
            found.append((path, files))
            stack.extend(reversed(subdirs))
        listed = [e for _, files in sorted(found, key=lambda f: f[0]) for e in files]
        # Real files claim their identity before links to them (the link is the duplicate).
        why = {e.path: self._skip_file(e, me) for e in listed if not e.is_symlink()}
        why.update({e.path: self._skip_file(e, me) for e in listed if e.is_symlink()})
        self.skipped.extend((e.path, why[e.path]) for e in listed if why[e.path])
        return [e.path for e in listed if not why[e.path]]

    def _skip_folder(self, real: str, me: str) -> str | None:
        if real in self.walked:
            return 'a folder already listed (a loop or a second link)'
        if real in self.owner or real in self.holders:
            return 'a class folder or a folder holding class folders'
        if self._class_of(real) not in (None, me):
            return "inside another class's folder"
        return None

    def _skip_file(self, e: os.DirEntry, me: str) -> str | None:
        if e.is_symlink() and self._class_of(os.path.dirname(os.path.realpath(e.path))) not in (
                None, me):
            return "a file of another class's folder"
        try:
            st = e.stat()
        except OSError:
            return None          # a broken link: kept, so the bad-file scan reports it
        if (st.st_dev, st.st_ino) in self.files:
            return 'a file already listed'
        self.files.add((st.st_dev, st.st_ino))
        return None

    def warning(self, data_dir: str) -> str | None:
        if not self.skipped:
            return None
        n = len(self.skipped)
        shown = '; '.join(f'{os.path.relpath(p, data_dir)} ({why})' for p, why in self.skipped[:5])
        return (f'{n} symlink{"s" if n != 1 else ""} or folder{"s" if n != 1 else ""} under '
                f'{data_dir!r} not followed, so that each image counts once, in its own class '
                f'folder: {shown}' + (f' and {n - 5} more' if n > 5 else '') + '.')


def _parents(path: str) -> list[str]:
    """The ancestors of an absolute path, nearest first."""
    out = []
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return out
        out.append(parent)
        path = parent


def load_image_folders(data_dir: str | os.PathLike) -> Splits:
    """Reads `<data_dir>/train/<class>/*` and `<data_dir>/test/<class>/*`.

    Class index = position in the sorted folder names (torchvision ImageFolder order). Only
    files with an image extension are records (case-insensitive); hidden files and other
    files are ignored. A missing test/ gives an empty test split and a warning.

    Symlinks: a symlinked class folder is followed once, and so are symlinked files and
    subfolders, but every real file counts once and only under its own class folder: a link
    that loops (`loop -> ..`), reaches a split or class folder, points into another class's
    folder or repeats an image already listed is skipped and counted in one warning (see
    `_FolderScan`).
    """
    data_dir = os.fspath(data_dir)
    train_dir = os.path.join(data_dir, 'train')
    test_dir = os.path.join(data_dir, 'test')
    if not os.path.isdir(data_dir):
        raise DataError(f'Data folder {data_dir!r} does not exist. Expected the image-folder '
                        f'layout {_FOLDERS_LAYOUT}. {DEMO_HINT}')
    if not os.path.isdir(train_dir):
        raise DataError(f'No train/ folder in {data_dir!r} (looked for {train_dir!r}). Expected '
                        f'the image-folder layout {_FOLDERS_LAYOUT}; for the original Stanford '
                        f'Cars files (cars_train/ + devkit/) use the devkit source. {DEMO_HINT}')
    class_names = _class_dirs(train_dir)
    if not class_names:
        raise DataError(f'{train_dir!r} has no class folders. Expected the image-folder layout '
                        f'{_FOLDERS_LAYOUT}. {DEMO_HINT}')
    warnings = []
    stray = [f for f in os.listdir(train_dir)
             if _is_image_file(f) and os.path.isfile(os.path.join(train_dir, f))]
    if stray:
        warnings.append(f'{len(stray)} image(s) directly in {train_dir!r} (not in a class folder) '
                        f'are ignored, e.g. {sorted(stray)[0]!r}.')
    if os.path.isdir(test_dir):
        test_classes = _class_dirs(test_dir)
        if test_classes != class_names:
            only_train = sorted(set(class_names) - set(test_classes))
            only_test = sorted(set(test_classes) - set(class_names))
            raise DataError(
                f'train/ and test/ in {data_dir!r} have different class folders: '
                f'only in train: {_short_list(only_train)}; only in test: '
                f'{_short_list(only_test)}. Both must hold the same class folders (an empty '
                f'folder in test is fine).')
    else:
        test_classes = []
        warnings.append(f'No test/ folder in {data_dir!r}: there is no test split; validate '
                        f'on a holdout split of train (val_split=holdout).')

    scan = _FolderScan([os.path.join(d, name) for d in (train_dir, test_dir)
                        for name in (class_names if d == train_dir else test_classes)])

    def records(split_dir, split):
        out = []
        empty = []
        for label, name in enumerate(class_names):
            paths = scan.images(os.path.join(split_dir, name))
            if not paths:
                empty.append(name)
            out.extend(Record(image=p, label=label, key=os.path.relpath(p, data_dir))
                       for p in paths)
        if empty and split == 'train':
            raise DataError(
                f'{len(empty)} class folder(s) in {split_dir!r} have no images (the model '
                f'cannot learn them): {_short_list(empty)}. Add images ('
                f'{", ".join(IMAGE_EXTENSIONS)}) or remove the folder from train/ and test/.')
        return out

    train = records(train_dir, 'train')
    test = records(test_dir, 'test') if test_classes else []
    if scan.warning(data_dir):
        warnings.append(scan.warning(data_dir))
    return Splits(train=train, test=test, class_names=class_names, warnings=warnings)


def _short_list(items: Sequence[str], limit: int = 10) -> str:
    if not items:
        return '(none)'
    shown = ', '.join(repr(s) for s in items[:limit])
    return shown + (f' and {len(items) - limit} more' if len(items) > limit else '')


# ------------------------------------------------------------------------------------------
# Original Stanford Cars devkit (.mat annotations)
# ------------------------------------------------------------------------------------------

def _find(data_dir: str, name: str) -> str | None:
    for sub in ('devkit', ''):
        p = os.path.join(data_dir, sub, name) if sub else os.path.join(data_dir, name)
        if os.path.isfile(p):
            return p
    return None


def _loadmat(path: str) -> dict:
    import scipy.io  # pylint: disable=import-outside-toplevel
    try:
        return scipy.io.loadmat(path)
    except Exception as e:  # pylint: disable=broad-except
        raise DataError(f'Cannot read the MATLAB file {path!r} ({type(e).__name__}: {e}). '
                        f'Replace it with the original file from the Stanford Cars devkit.') from e


def _read_class_names(path: str) -> list[str]:
    m = _loadmat(path)
    if 'class_names' not in m:
        raise DataError(f'{path!r} has no `class_names` variable; it is not the devkit\'s '
                        f'cars_meta.mat.')
    return [str(np.asarray(c).ravel()[0]) for c in np.asarray(m['class_names']).ravel()]


def _read_annotations(path: str, num_classes: int, need_class: bool = True) -> list[tuple]:
    """Rows (fname, class_0_based, (x1, y1, x2, y2)) of a devkit annotations file."""
    m = _loadmat(path)
    if 'annotations' not in m:
        raise DataError(f'{path!r} has no `annotations` variable; it is not a devkit '
                        f'annotations file.')
    annos = np.asarray(m['annotations']).ravel()
    fields = annos.dtype.names or ()
    required = ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'fname') + (
        ('class',) if need_class else ())
    missing = [f for f in required if f not in fields]
    if missing:
        hint = (' (cars_test_annos.mat has no labels: use cars_test_annos_withlabels.mat)'
                if missing == ['class'] else '')
        raise DataError(f'{path!r} lacks the field(s) {missing} (has {list(fields)}){hint}.')
    rows = []
    for i, a in enumerate(annos):
        try:
            fname = str(np.asarray(a['fname']).ravel()[0])
            box = tuple(float(np.asarray(a[f]).item())
                        for f in ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2'))
            cls = int(np.asarray(a['class']).item())
        except Exception as e:  # pylint: disable=broad-except
            raise DataError(f'Annotation {i} of {path!r} is malformed ({e}).') from e
        if not 1 <= cls <= num_classes:
            raise DataError(f'Annotation {i} ({fname}) of {path!r} has class {cls}, outside '
                            f'1..{num_classes} (the classes of cars_meta.mat).')
        rows.append((fname, cls - 1, box))
    return rows


def _devkit_records(image_dir, rows, warnings):
    sub = os.path.basename(image_dir)
    present = set(os.listdir(image_dir))
    missing = [r[0] for r in rows if r[0] not in present]
    if missing and len(missing) == len(rows):
        raise DataError(f'None of the {len(rows)} annotated images is in {image_dir!r} (e.g. '
                        f'{missing[0]!r}). Expected the devkit layout {_DEVKIT_LAYOUT}.')
    if missing:
        warnings.append(f'{len(missing)} of the {len(rows)} images annotated for {sub}/ are '
                        f'missing from {image_dir!r} and left out: {_short_list(missing, 5)}.')
    return [Record(image=os.path.join(image_dir, f), label=c, bbox=b, key=f'{sub}/{f}')
            for f, c, b in rows if f in present]


def load_devkit(data_dir: str | os.PathLike, *, use_test_labels: bool = True) -> Splits:
    """Reads the original Stanford Cars distribution.

    Needs `cars_train/`, `devkit/cars_meta.mat` and `devkit/cars_train_annos.mat` (the .mat
    files are also found directly in data_dir). The test split comes from `cars_test/` and
    `cars_test_annos_withlabels.mat` (in data_dir/ or devkit/); without them (or with
    use_test_labels=False) `test` is empty and `warnings` says to use a holdout split.
    Labels are the devkit's 1-based classes minus one; names in cars_meta.mat's order;
    bboxes are the annotated pixel boxes (x1, y1, x2, y2) of the original images.
    """
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise DataError(f'Data folder {data_dir!r} does not exist. Expected the Stanford Cars '
                        f'devkit layout {_DEVKIT_LAYOUT}. {DEMO_HINT}')

    def need(name):
        p = _find(data_dir, name)
        if p is None:
            raise DataError(f'Missing {os.path.join(data_dir, "devkit", name)!r} (also looked '
                            f'for {os.path.join(data_dir, name)!r}). Expected the Stanford Cars '
                            f'devkit layout {_DEVKIT_LAYOUT}. {DEMO_HINT}')
        return p

    train_dir = os.path.join(data_dir, 'cars_train')
    if not os.path.isdir(train_dir):
        raise DataError(f'Missing the image folder {train_dir!r}. Expected the Stanford Cars '
                        f'devkit layout {_DEVKIT_LAYOUT}. {DEMO_HINT}')
    meta_path = need('cars_meta.mat')
    train_annos_path = need('cars_train_annos.mat')
    class_names = _read_class_names(meta_path)
    if not class_names:
        raise DataError(f'{meta_path!r} lists no classes.')
    warnings: list[str] = []
    train = _devkit_records(train_dir,
                            _read_annotations(train_annos_path, len(class_names)), warnings)

    test: list[Record] = []
    test_dir = os.path.join(data_dir, 'cars_test')
    test_annos_path = _find(data_dir, 'cars_test_annos_withlabels.mat')
    no_test = 'there is no test split: validate on a holdout split of train (val_split=holdout).'
    if not use_test_labels:
        warnings.append(f'Test labels not used (use_test_labels=False): {no_test}')
    elif test_annos_path is None:
        warnings.append(f'No cars_test_annos_withlabels.mat in {data_dir!r} or its devkit/ '
                        f'(cars_test_annos.mat has no labels): {no_test}')
    elif not os.path.isdir(test_dir):
        warnings.append(f'No test image folder {test_dir!r}: {no_test}')
    else:
        test = _devkit_records(test_dir,
                               _read_annotations(test_annos_path, len(class_names)), warnings)
    return Splits(train=train, test=test, class_names=class_names, warnings=warnings)


# ------------------------------------------------------------------------------------------
# TFDS (random access through tfds.data_source; ArrayRecord)
# ------------------------------------------------------------------------------------------

def _image_size(image: bytes | np.ndarray) -> tuple[int, int]:
    """(width, height), from the header only for encoded bytes."""
    if isinstance(image, np.ndarray):
        return int(image.shape[1]), int(image.shape[0])
    with Image.open(io.BytesIO(image)) as im:
        return im.size


def _tfds_bbox(norm, width: int, height: int) -> tuple[float, float, float, float] | None:
    """TFDS BBoxFeature [ymin, xmin, ymax, xmax] in [0, 1] -> pixel (x1, y1, x2, y2)."""
    if norm is None:
        return None
    ymin, xmin, ymax, xmax = (float(v) for v in np.asarray(norm, np.float64).ravel()[:4])
    return (xmin * width, ymin * height, xmax * width, ymax * height)


def _str(v) -> str:
    if isinstance(v, np.ndarray):
        v = v.item()
    return v.decode('utf-8', 'replace') if isinstance(v, bytes) else str(v)


class TfdsRecords(Sequence):
    """A lazy, picklable sequence of `Record`s over one split of a TFDS data source.

    `image` is the example's encoded image bytes (decoded later by `decode_image`), or the
    decoded array with decode=True; `bbox` is TFDS's normalised box in pixels; `key` is
    '<split>/<tfds id>'. `labels()` reads all labels once (without decoding images).
    """

    def __init__(self, source, split: str, *, decode: bool = False):
        self._source = source
        self.split = split
        self.decode = decode
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._source)

    def _to_record(self, ex: dict, index: int) -> Record:
        image = ex['image']
        if isinstance(image, np.ndarray) and image.dtype == object:
            image = image.item()
        if self.decode:
            image = decode_image(image)
        bbox = ex.get('bbox')
        if bbox is not None:
            bbox = _tfds_bbox(bbox, *_image_size(image))
        key = f'{self.split}/{_str(ex["id"])}' if 'id' in ex else f'{self.split}/{index}'
        return Record(image=image, label=int(ex['label']), bbox=bbox, key=key)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f'index {index} out of range for {n} records')
        return self._to_record(self._source[i], i)

    def __getitems__(self, indices: Sequence[int]) -> list[Record]:
        exs = self._source.__getitems__([int(i) for i in indices])
        return [self._to_record(ex, int(i)) for ex, i in zip(exs, indices)]

    def labels(self, chunk: int = 1024) -> np.ndarray:
        """All labels as int32, read once (images are not decoded) and memoised."""
        if self._labels is None:
            n = len(self)
            out = np.empty(n, np.int32)
            for start in range(0, n, chunk):
                idx = list(range(start, min(n, start + chunk)))
                exs = self._source.__getitems__(idx)
                out[start:start + len(idx)] = [int(ex['label']) for ex in exs]
            self._labels = out
        return self._labels

    def __repr__(self):
        return f'TfdsRecords(split={self.split!r}, n={len(self)})'


def load_tfds(name: str = 'cars196', data_dir: str | os.PathLike | None = None, *,
              decode: bool = False) -> Splits:
    """Opens a prepared TFDS dataset for random access (tfds.data_source, download=False).

    The dataset must already be prepared in `data_dir` with file_format='array_record' (or
    parquet); preparing cars196 needs TensorFlow, which this project does not install.
    """
    data_dir = os.fspath(data_dir) if data_dir else None
    where = data_dir or '~/tensorflow_datasets (the TFDS default)'
    how = (f'TFDS needs TensorFlow to prepare {name}; prepare it on a machine with TensorFlow '
           f'(`pip install tensorflow tensorflow-datasets`, then `tfds.builder({name!r}, '
           f'data_dir=DIR).download_and_prepare(file_format="array_record")`) and copy DIR here, '
           f'or use the devkit source (the original cars_train/ + devkit/ files) or the '
           f'image-folder source instead. {DEMO_HINT}')
    try:
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise DataError(f'The tfds source needs tensorflow-datasets (`pip install '
                        f'tensorflow-datasets`): {e}') from e
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # pylint: disable=broad-except
        raise DataError(f'TFDS has no dataset {name!r} ({type(e).__name__}: {e}).') from e
    if not builder.is_prepared():
        raise DataError(f'The TFDS dataset {name!r} is not prepared in {where} (looked for '
                        f'{os.fspath(builder.data_dir)!r}; nothing is downloaded here). {how}')
    fmt = getattr(builder.info.file_format, 'value', str(builder.info.file_format))
    if str(fmt) not in ('array_record', 'parquet'):
        raise DataError(f'The TFDS dataset {name!r} in {os.fspath(builder.data_dir)!r} is '
                        f'stored as {fmt}, which has no random access. Prepare it again with '
                        f'file_format="array_record" (in another data_dir). {how}')
    features = builder.info.features
    if 'label' not in features or 'image' not in features:
        raise DataError(f'The TFDS dataset {name!r} has no image/label features '
                        f'({list(features.keys())}).')
    class_names = list(features['label'].names)
    split_names = list(builder.info.splits.keys())

    def open_split(split):
        src = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                               decoders={'image': tfds.decode.SkipDecoding()})
        return TfdsRecords(src, split, decode=decode)

    if 'train' not in split_names:
        raise DataError(f'The TFDS dataset {name!r} has no train split (splits: {split_names}).')
    warnings = []
    train = open_split('train')
    if 'test' in split_names:
        test = open_split('test')
    else:
        test = []
        warnings.append(f'The TFDS dataset {name!r} has no test split: validate on a holdout '
                        f'split of train (val_split=holdout).')
    return Splits(train=train, test=test, class_names=class_names, warnings=warnings)


# ------------------------------------------------------------------------------------------
# Labels and the stratified holdout split
# ------------------------------------------------------------------------------------------

def labels_of(records: Sequence[Record]) -> np.ndarray:
    """int32 labels of `records` without decoding any image (fast path for TfdsRecords)."""
    fast = getattr(records, 'labels', None)
    if callable(fast):
        return np.asarray(fast(), np.int32)
    return np.fromiter((r.label for r in records), np.int32, count=len(records))


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class holdout: (train_idx, val_idx), disjoint, each sorted ascending.

    Each class c with n_c examples gives floor(fraction * n_c + 0.5) of them (round half up)
    to validation, at least 1 when n_c >= 2 and fraction > 0, and always leaves at least 1
    in train. The same (labels, fraction, seed) always gives the same split.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f'labels must be 1-D, got shape {labels.shape}')
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f'fraction must be in [0, 1), got {fraction}')
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = len(idx)
        k = int(math.floor(fraction * n + 0.5))
        if fraction > 0 and n >= 2:
            k = max(k, 1)
        k = min(k, n - 1)
        if k > 0:
            val.append(rng.permutation(idx)[:k])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[val_idx] = False
    return np.flatnonzero(mask).astype(np.int64), val_idx.astype(np.int64)


# ------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------

_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 HxWx3 RGB.

    Like torchvision's loader (`img.convert('RGB')`), alpha is dropped (not composited);
    16/32-bit integer modes are scaled from 0..65535 to 0..255 (PIL's own conversion would
    clip them at 255); everything else uses PIL's conversion.
    """
    mode = im.mode
    if mode == 'RGB':
        arr = np.asarray(im)
    elif mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(im).astype(np.int64)
        a = (np.clip(a, 0, 65535) + 128) // 257
        arr = np.repeat(a.astype(np.uint8)[..., None], 3, axis=-1)
    else:
        arr = np.asarray(im.convert('RGB'))
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f'mode {mode} converted to {arr.dtype} {arr.shape}, not uint8 RGB')
    return arr


def _array_to_rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.uint8:
        raise ValueError(f'image arrays must be uint8, got {a.dtype}')
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f'image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got {a.shape}')
    if a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    return a[..., :3]


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return repr(os.fspath(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f'<{len(image)} encoded bytes>'
    return f'<{type(image).__name__}>'


def _open_rgb(image) -> np.ndarray:
    """Decodes a path / bytes / array to uint8 RGB; ImageDecodeError on any failure."""
    def fail(reason, cause=None):
        err = ImageDecodeError(f'Cannot decode image {_describe(image)}: {reason}', reason)
        if cause is not None:
            raise err from cause
        raise err

    if isinstance(image, np.ndarray):
        try:
            return _array_to_rgb(image)
        except ValueError as e:
            fail(str(e), e)
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            fail('empty data (0 bytes)')
        src = io.BytesIO(bytes(image))
    elif isinstance(image, (str, os.PathLike)):
        src = os.fspath(image)
        try:
            size = os.path.getsize(src)
        except OSError as e:
            fail(f'cannot read file ({e.strerror or e})', e)
        if size == 0:
            fail('empty file (0 bytes)')
    else:
        raise TypeError(f'cannot decode an image from {type(image).__name__}')
    try:
        with Image.open(src) as im:
            im.load()
            return _pil_to_rgb(im)
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
        fail(_reason(e), e)


def _reason(e: BaseException) -> str:
    if isinstance(e, Image.UnidentifiedImageError):
        return 'not an image (PIL cannot identify the format)'
    msg = str(e)
    if 'truncated' in msg.lower():
        return f'truncated image ({msg})'
    return f'{type(e).__name__}: {msg}'


def crop_box(width: int, height: int, bbox, margin: int = 0) -> tuple[int, int, int, int]:
    """Integer crop (left, top, right, bottom) for a pixel bbox grown by `margin` and clipped
    to the image. A box that is empty after clipping gives the whole image."""
    x1, y1, x2, y2 = (float(v) for v in bbox)
    x1, x2 = min(x1, x2), max(x1, x2)
    y1, y2 = min(y1, y2), max(y1, y2)
    left = max(0, int(math.floor(x1 - margin)))
    top = max(0, int(math.floor(y1 - margin)))
    right = min(width, int(math.ceil(x2 + margin)))
    bottom = min(height, int(math.ceil(y2 + margin)))
    if right <= left or bottom <= top:
        return 0, 0, width, height
    return left, top, right, bottom


def count_boxes_past_the_edge(records: Sequence[Record], num_threads: int = 8
                              ) -> tuple[int, int]:
    """(boxes reaching past their image's edge, those of them lying entirely outside it) of
    path records with a bbox; image sizes from the file headers. `crop_box` clips the first
    kind and uses the whole image for the second, silently: this lets the caller say so.
    Unreadable files are not counted (the bad-file scan reports them)."""
    def status(r: Record) -> tuple[bool, bool]:
        try:
            with Image.open(r.image) as im:
                w, h = im.size
        except Exception:  # pylint: disable=broad-except
            return False, False
        x1, y1, x2, y2 = (float(v) for v in r.bbox)
        x1, x2, y1, y2 = min(x1, x2), max(x1, x2), min(y1, y2), max(y1, y2)
        past = x1 < 0 or y1 < 0 or x2 > w or y2 > h
        return past, x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h
    records = [r for r in records if r.bbox is not None]
    if not records:
        return 0, 0
    with concurrent.futures.ThreadPoolExecutor(max(1, min(num_threads, len(records)))) as pool:
        flags = list(pool.map(status, records))
    return sum(p for p, _ in flags), sum(o for _, o in flags)


def decode_image(record_or_image, *, bbox=None, bbox_margin: int = 0) -> np.ndarray:
    """uint8 HxWx3 RGB from a Record, a path, encoded bytes or an array.

    Any PIL mode becomes RGB (see `_pil_to_rgb`); EXIF orientation is NOT applied (as in
    torchvision's ImageFolder). With `bbox` (x1, y1, x2, y2 in pixels) the image is cropped
    to the box grown by `bbox_margin` pixels on each side and clipped to the image. A
    Record's own bbox is only used when passed as `bbox`. Raises ImageDecodeError (a
    DataError) naming the file when the data cannot be decoded.
    """
    image = record_or_image.image if isinstance(record_or_image, Record) else record_or_image
    try:
        arr = _open_rgb(image)
    except ImageDecodeError as e:
        if isinstance(record_or_image, Record) and record_or_image.key:
            raise ImageDecodeError(f'{e} [record {record_or_image.key}]', e.reason) from e
        raise
    if bbox is not None:
        h, w = arr.shape[:2]
        left, top, right, bottom = crop_box(w, h, bbox, bbox_margin)
        arr = arr[top:bottom, left:right]
    return np.ascontiguousarray(arr)


# ------------------------------------------------------------------------------------------
# Scanning for unreadable files
# ------------------------------------------------------------------------------------------

_CACHE_VERSION = 1


def _check_file(path: str) -> str | None:
    """None when the file decodes, else the reason it does not."""
    try:
        _open_rgb(path)
        return None
    except ImageDecodeError as e:
        return e.reason


def _load_cache(cache_path: str) -> dict:
    try:
        with open(cache_path, encoding='utf-8') as f:
            data = json.load(f)
        if data.get('version') == _CACHE_VERSION and isinstance(data.get('files'), dict):
            return data['files']
        logging.warning('Ignoring scan cache %s (unknown version).', cache_path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as e:
        logging.warning('Ignoring unreadable scan cache %s (%s); rescanning.', cache_path, e)
    return {}


def _save_cache(cache_path: str, files: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    try:
        write_json_atomic(cache_path, {'version': _CACHE_VERSION, 'files': files})
    except OSError as e:
        logging.warning('Could not write the scan cache %s: %s', cache_path, e)


def scan_records(records: Sequence[Record], *, cache_path: str | None = None,
                 num_threads: int = 8,
                 ) -> tuple[Sequence[Record], list[tuple[str, str]]]:
    """Finds the records whose file cannot be decoded: (good records, [(key, reason)]).

    Every path-based record is opened and fully decoded once, in a thread pool. With
    `cache_path`, results are kept in a JSON file keyed by (absolute path, size, mtime), so
    a second scan opens only new or changed files. Records whose image is an array or
    encoded bytes are kept without a scan; a lazy TfdsRecords sequence is returned as is.
    """
    if isinstance(records, TfdsRecords):
        return records, []
    records = list(records)
    cache = _load_cache(cache_path) if cache_path else {}
    results: dict[str, str | None] = {}
    to_check: list[tuple[str, tuple[int, int]]] = []
    seen = set()
    for r in records:
        if not isinstance(r.image, (str, os.PathLike)):
            continue
        path = os.path.abspath(os.fspath(r.image))
        if path in seen:
            continue
        seen.add(path)
        try:
            st = os.stat(path)
        except OSError as e:
            results[path] = f'cannot read file: {e.strerror or e}'
            continue
        sig = (st.st_size, st.st_mtime_ns)
        hit = cache.get(path)
        if hit is not None and [hit.get('size'), hit.get('mtime_ns')] == list(sig):
            results[path] = hit.get('error')
        else:
            to_check.append((path, sig))

    if to_check:
        workers = max(1, min(num_threads, len(to_check)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            reasons = list(pool.map(_check_file, [p for p, _ in to_check]))
        for (path, sig), reason in zip(to_check, reasons):
            results[path] = reason
            cache[path] = {'size': sig[0], 'mtime_ns': sig[1], 'error': reason}
        if cache_path:
            _save_cache(cache_path, cache)

    good, skipped = [], []
    for r in records:
        if isinstance(r.image, (str, os.PathLike)):
            reason = results[os.path.abspath(os.fspath(r.image))]
            if reason is not None:
                skipped.append((r.key or os.fspath(r.image), reason))
                continue
        good.append(r)
    return good, skipped


def format_skipped(skipped: Sequence[tuple[str, str]], limit: int = 20, *,
                   write_full_list_to: str | None = None) -> str:
    """One warning text for the files `scan_records` skipped, listing up to `limit`.

    With `write_full_list_to`, the full list ('key<TAB>reason' lines) is written to that
    file and the text says so.
    """
    n = len(skipped)
    if n == 0:
        return 'Skipped 0 unreadable files.'
    if write_full_list_to:
        d = os.path.dirname(os.path.abspath(write_full_list_to))
        os.makedirs(d, exist_ok=True)
        with open(write_full_list_to, 'w', encoding='utf-8') as f:
            f.writelines(f'{k}\t{r}\n' for k, r in skipped)
    lines = [f'Skipped {n} unreadable file{"s" if n != 1 else ""} (left out of the data):']
    lines += [f'  {k}: {r}' for k, r in list(skipped)[:limit]]
    if n > limit:
        lines.append(f'  ... and {n - limit} more' + (
            f'; full list in {write_full_list_to}' if write_full_list_to else ''))
    elif write_full_list_to:
        lines.append(f'  (list also in {write_full_list_to})')
    return '\n'.join(lines)
