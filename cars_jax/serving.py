"""Standalone loader for a model exported by `cars_jax.export.export_model`.

Needs only jax (for `jax.export` and to run the StableHLO; numpy and the rest of what pip
installs with jax), flatbuffers (`jax.export.deserialize` reads the artifact with it) and, to
resize uint8 images, Pillow: `pip install jax flatbuffers pillow`, with a jax at least as new as
the one that exported the model (meta.json's jax_version; an older one may not read newer
StableHLO). Never flax nor the rest of cars_jax. `export_model` copies this very file into
the export directory, so a server can do, without cars_jax installed:

    import sys; sys.path.insert(0, 'exported_model')
    import serving
    predictor = serving.load_exported('exported_model')
    probs = predictor.predict(uint8_images)          # (N, num_classes)
    predictor.top_k(uint8_images, 5)                 # [[(class name, prob), ...], ...]

(Importing it as `cars_jax.serving` works too, but that imports the cars_jax package, flax
included.) The eval preprocessing below copies cars_jax/data/augment.py's `eval_transform`
(torchvision Resize with PIL's bilinear filter, optional centre crop, ToTensor, Normalize);
tests check it matches that one exactly.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

FORMAT = 'cars_jax.exported_classifier'
VERSION = 1
MODULE_FILE = 'model.jax_exported'   # jax.export serialization (StableHLO + calling convention)
META_FILE = 'meta.json'
EVAL_RESIZE_MODES = ('squash', 'center_crop')


# ---- eval preprocessing (a copy of cars_jax.data.augment's, numpy + PIL only) --------------

def ensure_rgb(image: np.ndarray) -> np.ndarray:
    """HxW, HxWx1 or HxWx3 -> HxWx3 (grey repeated); anything else (or an empty image) is
    an error. cars_jax.data.augment uses this one too."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f'expected an HxW, HxWx1 or HxWx3 image, got shape {image.shape}')
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f'empty image, shape {image.shape}')
    return image


def resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torchvision Resize((h, w)) of a uint8 PIL image: PIL bilinear (antialiased)."""
    image = np.ascontiguousarray(image)
    if image.shape[:2] == (out_h, out_w):
        return image.copy()
    from PIL import Image
    return np.array(Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BILINEAR))


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision Resize(size): shorter side -> size, the other int(size * long / short)."""
    ih, iw = image.shape[:2]
    if ih <= iw:
        return resize(image, size, int(size * iw / ih))
    return resize(image, int(size * ih / iw), size)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    ih, iw = image.shape[:2]
    top, left = int(round((ih - size) / 2.0)), int(round((iw - size) / 2.0))
    return image[top:top + size, left:left + size]


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """ToTensor + Normalize: (uint8 / 255 - mean) / std, float32, channels last."""
    x = image.astype(np.float32) * np.float32(1 / 255)
    inv = np.float32(1.0) / np.asarray(std, np.float32)
    return (x - np.asarray(mean, np.float32)) * inv


def eval_preprocess(image: np.ndarray, image_size: int, mean: Sequence[float],
                    std: Sequence[float], eval_resize: str = 'squash') -> np.ndarray:
    """uint8 image of any size -> the model's (S, S, 3) float32 input."""
    image = ensure_rgb(image)
    if image.dtype != np.uint8:
        raise ValueError(f'expected a uint8 image, got dtype {image.dtype}')
    if eval_resize == 'squash':
        x = resize(image, image_size, image_size)
    elif eval_resize == 'center_crop':
        x = center_crop(resize_shorter(image, image_size), image_size)
    else:
        raise ValueError(f'eval_resize must be one of {EVAL_RESIZE_MODES}, got {eval_resize!r}')
    return normalize(x, mean, std)


# ---- the predictor --------------------------------------------------------------------------

class Predictor:
    """Probabilities from raw uint8 images (any size: resized as in evaluation) or from
    already preprocessed float32 (N, S, S, 3) inputs (normalised with `mean` / `std`)."""

    def __init__(self, exported: Any, meta: dict):
        import jax
        self.exported = exported
        self.meta = meta
        self.class_names: list[str] = list(meta['class_names'])
        self.image_size: int = int(meta['image_size'])
        self.mean = tuple(meta['mean'])
        self.std = tuple(meta['std'])
        self.eval_resize: str = meta['eval_resize']
        self.batch_size: int | None = meta['batch_size']   # None: any batch size
        self._call = explain_version_errors(jax.jit(exported.call), meta.get('jax_version'))

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """One uint8 HxW(x3) image -> (S, S, 3) float32 model input."""
        return eval_preprocess(image, self.image_size, self.mean, self.std, self.eval_resize)

    def _inputs(self, images: Any) -> np.ndarray:
        if isinstance(images, np.ndarray) and images.ndim in (2, 3):
            images = [images]   # one image
        items = [np.asarray(im) for im in images]
        if not items:
            return np.zeros((0, self.image_size, self.image_size, 3), np.float32)
        out = []
        shape = (self.image_size, self.image_size, 3)
        for im in items:
            if im.dtype == np.uint8:
                out.append(self.preprocess(im))
            elif np.issubdtype(im.dtype, np.floating):
                if im.shape != shape:
                    raise ValueError(f'float images are taken as preprocessed model inputs of '
                                     f'shape {shape}, got {im.shape}; pass uint8 images to '
                                     'have them resized and normalised')
                if not np.all(np.isfinite(im)):
                    raise ValueError('preprocessed float images must be finite (no NaN/inf)')
                out.append(im.astype(np.float32))
            else:
                raise ValueError(f'images must be uint8 (raw) or float (preprocessed), '
                                 f'got {im.dtype}')
        return np.stack(out)

    def predict(self, images: Any) -> np.ndarray:
        """(N, num_classes) float32 probabilities; `images` is one image, a batch array or a
        list of images (uint8 raw of any size, or float32 preprocessed)."""
        x = self._inputs(images)
        n = x.shape[0]
        if n == 0:
            return np.zeros((0, len(self.class_names)), np.float32)
        if self.batch_size is None:
            return np.asarray(self._call(x))
        b = self.batch_size   # fixed-batch export: run in chunks, the last one zero-padded
        chunks = []
        for start in range(0, n, b):
            chunk = x[start:start + b]
            pad = b - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            chunks.append(np.asarray(self._call(chunk))[:b - pad])
        return np.concatenate(chunks)

    def top_k(self, images: Any, k: int = 5) -> list[list[tuple[str, float]]]:
        """For each image, its k most probable (class name, probability), best first.

        images: one image, an (N, H, W, 3) batch array or a list of images, each either
          - raw: uint8 RGB (H, W, 3) or grey (H, W), values 0..255, any size: resized and
            normalised as in evaluation (`preprocess`); or
          - preprocessed: float32 (S, S, 3) with S = `image_size`, already normalised with
            `mean` / `std` (so roughly -2..2.6, not 0..1: a float image in [0, 1] must be
            given as uint8 instead).
        k: an integer >= 1; a k above the number of classes lists every class.
        Raises ValueError naming the problem (bad k, dtype, shape, non-finite values).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f'k must be an integer >= 1 (the classes listed per image), '
                             f'got {k!r}')
        probs = self.predict(images)
        order = np.argsort(-probs, axis=1, kind='stable')[:, :k]
        return [[(self.class_names[c], float(p[c])) for c in row] for p, row in zip(probs, order)]


def _version(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split('.')[:3]:
        digits = ''.join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def explain_version_errors(call: Any, exported_with: str | None) -> Any:
    """`call`, or, when the installed jax is older than the one that exported the model (an
    older jax may not read newer StableHLO: jax 0.10.2 cannot run a jax 0.12 export), `call`
    with its errors turned into one that names both versions and the fix."""
    import jax
    if not exported_with or _version(jax.__version__) >= _version(exported_with):
        return call

    def checked(*args):
        try:
            return call(*args)
        except Exception as e:  # noqa: BLE001 - XLA's errors for unreadable StableHLO vary
            raise RuntimeError(
                f'this model was exported with jax {exported_with} and cannot run on the '
                f'installed jax {jax.__version__} (an older jax may not read newer StableHLO): '
                f'install jax>={exported_with}, or export the model again with this jax '
                f'({type(e).__name__}: {" ".join(str(e).split())[:200]})') from e
    return checked


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META_FILE)) as f:
        meta = json.load(f)
    if meta.get('format') != FORMAT:
        raise ValueError(f'{path} is not a cars_jax export (format {meta.get("format")!r})')
    if meta.get('version', 0) > VERSION:
        raise ValueError(f'{path} was written by a newer exporter (version {meta["version"]} '
                         f'> {VERSION})')
    return meta


def load_exported(path: str) -> Predictor:
    """The Predictor of an export directory (meta.json + model.jax_exported)."""
    from jax import export
    meta = read_meta(path)
    with open(os.path.join(path, MODULE_FILE), 'rb') as f:
        exported = export.deserialize(bytearray(f.read()))
    return Predictor(exported, meta)
