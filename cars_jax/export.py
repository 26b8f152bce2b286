"""A self-contained inference artifact: the trained network as serialized StableHLO.

`export_model` writes a directory

    model.jax_exported   jax.export serialization of  images -> softmax(model.apply(...)),
                         weights baked in; images: normalised NHWC float32 (b, S, S, 3) with a
                         symbolic batch b (any size) unless a fixed `batch_size` is asked for
    meta.json            class names, image_size, mean, std, eval_resize, batch_size, platforms
    serving.py           a copy of cars_jax/serving.py: the loader, jax + flatbuffers (+ Pillow) only

so serving needs neither flax nor cars_jax: `serving.load_exported(dir).predict(uint8_images)`.
Loading is `jax.export.deserialize`, which also needs the `flatbuffers` package.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cars_jax import serving
from cars_jax.data.augment import IMAGENET_MEAN, IMAGENET_STD
from cars_jax.fileio import write_json_atomic
from cars_jax.model import ResNet



def _setting(config_like: Any, name: str, default: Any = None) -> Any:
    """A field of a ConfigDict, AugmentConfig, dict or namespace (None: `default`)."""
    if config_like is None:
        return default
    if isinstance(config_like, Mapping):
        return config_like.get(name, default)
    return getattr(config_like, name, default)


def inference_fn(model: ResNet, variables: Mapping) -> Callable[[jax.Array], jax.Array]:
    """images (N, S, S, 3) normalised float32 -> (N, K) float32 probabilities, eval mode."""
    variables = {'params': variables['params'], 'batch_stats': variables['batch_stats']}

    def probs(images: jax.Array) -> jax.Array:
        logits = model.apply(variables, images.astype(jnp.float32), train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs


def export_model(variables: Mapping, model: ResNet, class_names: Sequence[str],
                 config_like: Any, path: str, image_size: int | None = None, *,
                 batch_size: int | None = None,
                 platforms: Sequence[str] | None = None) -> str:
    """Write the export directory `path` (see the module docstring); returns `path`.

    config_like gives mean, std, eval_resize (and image_size when not passed): a config,
    an AugmentConfig or a dict. batch_size None exports a symbolic batch dimension.
    platforms: e.g. ('cpu', 'cuda') for one artifact serving on both; default the current
    backend. (conv_impl='auto' picks its conv form from the backend exporting.)
    """
    class_names = [str(c) for c in class_names]
    if len(class_names) != model.num_classes:
        raise ValueError(f'{len(class_names)} class names for a model with '
                         f'{model.num_classes} classes')
    image_size = int(image_size or _setting(config_like, 'image_size', 0))
    if image_size <= 0:
        raise ValueError('export_model needs image_size (argument or config field)')
    eval_resize = _setting(config_like, 'eval_resize', 'squash')
    if eval_resize not in serving.EVAL_RESIZE_MODES:
        raise ValueError(f'eval_resize must be one of {serving.EVAL_RESIZE_MODES}, '
                         f'got {eval_resize!r}')
    if batch_size is not None and batch_size < 1:
        raise ValueError(f'batch_size must be >= 1 or None, got {batch_size}')
    mean = [float(v) for v in _setting(config_like, 'mean', IMAGENET_MEAN)]
    std = [float(v) for v in _setting(config_like, 'std', IMAGENET_STD)]

    batch = jax.export.symbolic_shape('b')[0] if batch_size is None else batch_size
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
    fn = jax.jit(inference_fn(model, variables))
    kwargs = {} if platforms is None else {'platforms': tuple(platforms)}
    exported = jax.export.export(fn, **kwargs)(spec)
    blob = exported.serialize()

    meta = {
        'format': serving.FORMAT, 'version': serving.VERSION,
        'class_names': class_names, 'num_classes': len(class_names),
        'image_size': image_size, 'mean': mean, 'std': std, 'eval_resize': eval_resize,
        'input': 'float32 (batch, image_size, image_size, 3), (x/255 - mean) / std',
        'output': 'float32 (batch, num_classes) softmax probabilities',
        'batch_size': batch_size, 'platforms': list(exported.platforms),
        'jax_version': jax.__version__,
        'model': {'stage_sizes': list(model.stage_sizes), 'widths': list(model.widths)},
    }
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, serving.MODULE_FILE), 'wb') as f:
        f.write(bytes(blob))
    write_json_atomic(os.path.join(path, serving.META_FILE), meta, indent=1)
    shutil.copyfile(serving.__file__, os.path.join(path, 'serving.py'))
    return path


def load_exported(path: str) -> serving.Predictor:
    """cars_jax.serving.load_exported (re-exported for convenience)."""
    return serving.load_exported(path)


def reference_probs(model: ResNet, variables: Mapping, images: np.ndarray) -> np.ndarray:
    """The probabilities the export should reproduce, computed directly with flax."""
    return np.asarray(jax.jit(inference_fn(model, variables))(jnp.asarray(images)))
