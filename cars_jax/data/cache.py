"""Decode once: every image of a split as a fixed-size uint8 array, kept in a memory-mapped file.

The seed's pipeline decodes each JPEG and runs its transforms per image per epoch; on a GPU
that, not the network, sets the pace. Here each image is decoded ONCE, squashed to C x C
(C ~ S * 8/7: 256 for 224 px training) and stored with its original (height, width), so that
the random augmentation can run on the device (`device_augment.py`): the crop is drawn on the
original size and mapped to cache coordinates, so its areas and aspect ratios are the seed's.

* JPEGs are decoded with PIL's draft mode: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT while
  staying at least C on each side, several times faster than a full decode + resize for
  full-size photos; the resize to C x C is then PIL's antialiased bilinear.
* The cache is one `.npy` file per (split, size, bbox setting) under `cache_dir`, written to a
  temporary name and renamed when complete, with a `.json` fingerprint of the records; a
  changed file list, size or bbox setting rebuilds it, a torn one is never read.
* An image that fails to decode (it passed the start-up scan, so it changed since) is logged,
  counted and replaced by the next readable record, as the per-epoch pipeline does.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import time
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
from PIL import Image

from cars_jax.data.augment import resize
from cars_jax.data.sources import Record, _pil_to_rgb, decode_image
from cars_jax.fileio import atomic_write, write_json_atomic

_VERSION = 1


class DecodedCache(NamedTuple):
    """images (N, C, C, 3) uint8 (a read-only memmap when file-backed), orig_hw (N, 2) int32:
    each image's size before the squash (after the bbox crop when bboxes are used)."""
    images: np.ndarray
    orig_hw: np.ndarray
    path: Optional[str]


def cache_size_for(image_size: int, cache_size: int = 0) -> int:
    """The cache side: `cache_size`, or 8/7 of the train size (256 for 224), the ratio of
    torchvision's classic Resize(256) + crop 224, so a crop of scale >= 0.8 is never upsampled
    by more than ~1.05x."""
    return int(cache_size) if cache_size > 0 else int(round(image_size * 8 / 7))


def decode_squashed(record: Record, size: int, *, use_bbox: bool = False,
                    bbox_margin: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 (size, size, 3), (h, w) before the squash) for one record.

    Without a bbox a JPEG file is decoded in draft mode (reduced in the DCT to >= size); with
    one, the full image is decoded and cropped first (the box is in full-size pixels)."""
    image = record.image
    if not use_bbox and isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                orig = (im.height, im.width)
                if im.format == 'JPEG':
                    im.draft(im.mode, (size, size))
                im.load()
                arr = _pil_to_rgb(im)
            if arr.dtype == np.uint8 and arr.ndim == 3:
                return resize(arr, size), orig
        except Exception:  # noqa: BLE001 - the full decoder below names the problem
            pass
    arr = decode_image(record, bbox=record.bbox if use_bbox else None, bbox_margin=bbox_margin)
    return resize(arr, size), (arr.shape[0], arr.shape[1])


def fingerprint(records: Sequence[Record], size: int, use_bbox: bool, bbox_margin: int) -> str:
    """A hash of what the cache holds: each record's file (path, size, mtime) or key, label and
    box, and the decode settings. In-memory records (arrays/bytes) hash their content."""
    h = hashlib.sha1(f'v{_VERSION} {size} {use_bbox} {bbox_margin}'.encode())
    for r in records:
        if isinstance(r.image, (str, os.PathLike)):
            try:
                st = os.stat(r.image)
                ident = f'{os.fspath(r.image)}:{st.st_size}:{st.st_mtime_ns}'
            except OSError:
                ident = os.fspath(r.image)
        elif isinstance(r.image, np.ndarray):
            ident = hashlib.sha1(np.ascontiguousarray(r.image).tobytes()).hexdigest()
        else:
            ident = hashlib.sha1(bytes(r.image)).hexdigest()
        h.update(f'{ident}|{r.label}|{r.bbox if use_bbox else None}\n'.encode())
    return h.hexdigest()


def _decode_all(records: Sequence[Record], size: int, out: np.ndarray, orig_hw: np.ndarray, *,
                use_bbox: bool, bbox_margin: int, num_threads: int,
                log: Callable[[str], None]) -> int:
    """Fills out / orig_hw; returns the number of records replaced by a readable neighbour."""
    n = len(records)

    def one(i: int) -> bool:
        for k in range(min(n, 16)):
            j = (i + k) % n
            try:
                out[i], orig_hw[i] = decode_squashed(records[j], size, use_bbox=use_bbox,
                                                     bbox_margin=bbox_margin)
                return k > 0
            except Exception as e:  # noqa: BLE001 - a bad file is a logged, counted skip
                logging.warning('Cache: skipping unreadable image %s (%s); using the next '
                                'record.', records[j].key or j, e)
        raise RuntimeError(f'16 consecutive records from {i} are unreadable; check the data.')

    t0, replaced, done = time.time(), 0, 0
    every = max(n // 10, 1)
    with concurrent.futures.ThreadPoolExecutor(max(num_threads, 1)) as pool:
        for was_replaced in pool.map(one, range(n), chunksize=64):
            replaced += was_replaced
            done += 1
            if done % every == 0 and done < n:
                rate = done / max(time.time() - t0, 1e-9)
                log(f'  decoding {done}/{n} images to {size}x{size}: {rate:.0f} img/s, '
                    f'ETA {(n - done) / rate:.0f}s')
    return replaced


def build_cache(records: Sequence[Record], size: int, *, cache_dir: str | None = None,
                name: str = 'train', use_bbox: bool = False, bbox_margin: int = 0,
                num_threads: int | None = None,
                log: Callable[[str], None] = print) -> DecodedCache:
    """Every record decoded once to (size, size, 3) uint8. With `cache_dir` the arrays live in
    `<cache_dir>/<name>-<size>-<hash>.npy` (memory-mapped, reused while the fingerprint holds);
    without, in memory."""
    n = len(records)
    threads = num_threads or min(8, os.cpu_count() or 1)
    if cache_dir is None:
        images = np.zeros((n, size, size, 3), np.uint8)
        orig_hw = np.zeros((n, 2), np.int32)
        _decode_all(records, size, images, orig_hw, use_bbox=use_bbox, bbox_margin=bbox_margin,
                    num_threads=threads, log=log)
        return DecodedCache(images, orig_hw, None)

    fp = fingerprint(records, size, use_bbox, bbox_margin)
    base = os.path.join(cache_dir, f'{name}-{size}-{fp[:16]}')
    path, meta_path = base + '.npy', base + '.json'
    if os.path.exists(path) and os.path.exists(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            images = np.load(path, mmap_mode='r')
            if meta.get('fingerprint') == fp and images.shape == (n, size, size, 3):
                return DecodedCache(images, np.asarray(meta['orig_hw'], np.int32), path)
        except (OSError, ValueError, KeyError) as e:
            log(f'Cache {path} unreadable ({e}); rebuilding it.')
    os.makedirs(cache_dir, exist_ok=True)
    t0 = time.time()
    log(f'Decoding the {n} {name} images once to {size}x{size} uint8 '
        f'({n * size * size * 3 / 2**30:.2f} GiB) in {path} ...')
    orig_hw = np.zeros((n, 2), np.int32)

    def decode_to(tmp: str) -> int:
        images = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.uint8,
                                           shape=(n, size, size, 3))
        replaced = _decode_all(records, size, images, orig_hw, use_bbox=use_bbox,
                               bbox_margin=bbox_margin, num_threads=threads, log=log)
        images.flush()
        del images
        return replaced
    replaced = atomic_write(path, decode_to)
    write_json_atomic(meta_path, {'fingerprint': fp, 'orig_hw': orig_hw.tolist(),
                                  'replaced': replaced})
    log(f'Decoded {n} images in {time.time() - t0:.1f}s'
        + (f' ({replaced} unreadable, replaced by neighbours)' if replaced else '') + '.')
    return DecodedCache(np.load(path, mmap_mode='r'), orig_hw, path)
