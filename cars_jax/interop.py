"""Weights in and out of the seed's PyTorch `VehicleResNet` (its `best_high_acc_model.pt`).

The seed notebook saves `model.state_dict()`; this module maps it onto `cars_jax.model.ResNet`
variables and back, name for name as tabled in the docstring of cars_jax/model.py:

    conv weights   OIHW  <->  HWIO        (w.transpose(2, 3, 1, 0))
    fc.weight      (out, in) <-> (in, out)
    BN weight / bias / running_mean / running_var  <->  scale / bias / mean / var
    num_batches_tracked: ignored on the way in, 0 (int64) on the way out

Everything is numpy; torch is imported only by `load_torch_checkpoint` (to unpickle a .pt file),
so converting an already-loaded dict of arrays needs no torch. Structure is checked against the
model's own `jax.eval_shape` of its init, and all problems (missing, unexpected, mis-shaped keys)
are reported together in one `InteropError`.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np

from cars_jax.model import ResNet, init_variables

BN_LEAVES = {  # flax (collection, leaf) -> torch suffix
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}
MODULE_NAMES = {'down_conv': 'down.0', 'down_bn': 'down.1'}
_BLOCK = re.compile(r'^l(\d+)_(\d+)$')
_TORCH_BLOCK = re.compile(r'^l(\d+)\.(\d+)\.conv1\.weight$')
WRAPPER_KEYS = ('state_dict', 'model_state_dict')
PREFIX = 'module.'


class InteropError(ValueError):
    """A checkpoint that does not fit the model, or one that cannot be read."""


# ---- names and layouts --------------------------------------------------------------------

def _torch_module(path: tuple[str, ...]) -> str:
    """flax module path ('l2_0', 'down_conv') -> torch module name 'l2.0.down.0'."""
    parts = []
    for name in path:
        block = _BLOCK.match(name)
        parts.append(f'l{block[1]}.{block[2]}' if block else MODULE_NAMES.get(name, name))
    return '.'.join(parts)


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """The state_dict key of the flax leaf `variables[collection][path[0]]...[path[-1]]`."""
    *module, leaf = path
    prefix = _torch_module(tuple(module))
    if leaf == 'kernel':
        return f'{prefix}.weight'
    if (collection, leaf) in BN_LEAVES:
        return f'{prefix}.{BN_LEAVES[(collection, leaf)]}'
    raise InteropError(f'no PyTorch name for {collection}/{"/".join(path)}')


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    """flax HWIO conv kernel / (in, out) dense kernel -> torch OIHW / (out, in); others as is."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
        return array.T
    return array


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:
        return tuple(reversed(flax_shape))
    return tuple(flax_shape)


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, prefix + (name,)))
        else:
            out[prefix + (name,)] = value
    return out


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return out


def _numpy(value: Any) -> np.ndarray:
    """A torch tensor (any device, bfloat16 included) or array-like -> numpy, without importing torch."""
    if hasattr(value, 'detach'):   # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) == 'torch.bfloat16':   # numpy has no bfloat16
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, Any]:
    """Drop DataParallel's 'module.' from every key, if all keys carry it."""
    keys = list(state_dict)
    if keys and all(k.startswith(prefix) for k in keys):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


# ---- conversion ---------------------------------------------------------------------------

def expected_structure(model: ResNet) -> dict[str, dict]:
    """{'params': ..., 'batch_stats': ...} of jax.ShapeDtypeStruct: the model's init, not run."""
    return jax.eval_shape(lambda rng: init_variables(model, rng, 224), jax.random.PRNGKey(0))


def torch_state_dict_to_variables(state_dict: Mapping[str, Any], model: ResNet) -> dict:
    """The seed's state_dict (numpy arrays or torch tensors) -> {'params', 'batch_stats'}.

    Raises InteropError naming every missing key, every unexpected key and every key whose
    shape differs (checkpoint vs model, both in PyTorch layout), all in one message.
    """
    state_dict = strip_prefix(state_dict)
    expected = expected_structure(model)
    out: dict[str, dict] = {}
    used: set[str] = set()
    bn_modules: set[str] = set()
    missing, misshaped = [], []
    for collection in ('params', 'batch_stats'):
        flat = {}
        for path, struct in _flat(expected[collection]).items():
            key = torch_key(collection, path)
            if collection == 'batch_stats':
                bn_modules.add(key.rsplit('.', 1)[0])
            if key not in state_dict:
                missing.append(key)
                continue
            used.add(key)
            value = _numpy(state_dict[key])
            want = _torch_shape(struct.shape)
            if tuple(value.shape) != want:
                misshaped.append(f'{key}: checkpoint {tuple(value.shape)}, model {want}')
                continue
            flat[path] = np.ascontiguousarray(_to_flax_layout(value).astype(struct.dtype))
        out[collection] = _nest(flat)
    ignored = {f'{m}.num_batches_tracked' for m in bn_modules}
    unexpected = sorted(k for k in state_dict if k not in used and k not in ignored)
    if missing or unexpected or misshaped:
        lines = ['the PyTorch state_dict does not fit the model '
                 f'(stage_sizes={tuple(model.stage_sizes)}, widths={tuple(model.widths)}, '
                 f'num_classes={model.num_classes}):']
        if missing:
            lines.append(f'  missing keys ({len(missing)}): ' + ', '.join(missing))
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): ' + ', '.join(unexpected))
        if misshaped:
            lines.append(f'  mis-shaped keys ({len(misshaped)}): ' + '; '.join(misshaped))
        try:
            arch = infer_architecture(state_dict)
            lines.append(f'  the checkpoint looks like stage_sizes={arch["stage_sizes"]}, '
                         f'widths={arch["widths"]}, num_classes={arch["num_classes"]}')
        except InteropError:
            pass
        raise InteropError('\n'.join(lines))
    return out


def variables_to_torch_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """{'params', 'batch_stats'} -> the seed's state_dict as numpy arrays (strict-loadable in
    torch after `{k: torch.from_numpy(v) ...}`); num_batches_tracked = 0 (int64). The seed's
    model max-pools after the stem: weights trained with `stem_pool=False` load there but
    compute another function. A space-to-depth stem has no counterpart there: refused."""
    conv1 = np.shape(variables['params']['conv1']['kernel'])
    if conv1[:3] != (7, 7, 3):
        raise InteropError(f'these weights have a {conv1[0]}x{conv1[1]} stem conv over '
                           f'{conv1[2]} channels (stem=space_to_depth): the seed\'s network has '
                           'a 7x7 conv over RGB, so no seed state_dict can hold them.')
    out: dict[str, np.ndarray] = {}
    for collection in ('params', 'batch_stats'):
        for path, value in _flat(variables[collection]).items():
            key = torch_key(collection, path)
            out[key] = np.array(_to_torch_layout(np.asarray(value)), order='C')  # writable
            if collection == 'batch_stats':
                out[key.rsplit('.', 1)[0] + '.num_batches_tracked'] = np.array(0, np.int64)
    return out


def infer_architecture(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """{'num_classes', 'stage_sizes', 'widths'} read off a seed-style state_dict's keys/shapes."""
    state_dict = strip_prefix(state_dict)
    if 'fc.weight' not in state_dict:
        raise InteropError('not a VehicleResNet state_dict: no fc.weight key '
                           f'(first keys: {", ".join(list(state_dict)[:5])})')
    blocks: dict[int, dict[int, int]] = {}
    for key, value in state_dict.items():
        m = _TORCH_BLOCK.match(key)
        if m:
            blocks.setdefault(int(m[1]), {})[int(m[2])] = int(_numpy(value).shape[0])
    stages = sorted(blocks)
    if not stages or stages != list(range(1, len(stages) + 1)):
        raise InteropError(f'stages l1..ln expected in the state_dict, found {stages}')
    stage_sizes, widths = [], []
    for i in stages:
        idx = sorted(blocks[i])
        if idx != list(range(len(idx))):
            raise InteropError(f'blocks of stage l{i} are not numbered 0..n-1: {idx}')
        stage_sizes.append(len(idx))
        widths.append(blocks[i][0])
    fc = _numpy(state_dict['fc.weight'])
    return {'num_classes': int(fc.shape[0]), 'stage_sizes': tuple(stage_sizes),
            'widths': tuple(widths)}


# ---- files --------------------------------------------------------------------------------

def load_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
    """A .pt file (bare state_dict, or a dict holding one under 'state_dict' /
    'model_state_dict') -> {key: numpy array}, DataParallel's 'module.' prefix removed.

    Uses torch.load(weights_only=True), so no code in the file is run."""
    try:
        import torch
    except ImportError as e:
        raise InteropError('reading a PyTorch .pt checkpoint needs torch: '
                           '`pip install torch` (the CPU build is enough)') from e
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:   # unpickling errors come in many types
        raise InteropError(f'cannot read {path} as a PyTorch checkpoint: {e}') from e
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(hasattr(v, 'shape') for v in obj.values()):
        raise InteropError(f'{path} holds no state_dict (expected a dict of tensors, or one '
                           f'under {" / ".join(WRAPPER_KEYS)}); save model.state_dict()')
    return {k: _numpy(v) for k, v in strip_prefix(obj).items()}


def seed_checkpoint_config(config, arch: Mapping[str, Any]):
    """An unlocked copy of `config` shaped as a seed checkpoint's network: stage_sizes / widths
    from the checkpoint (dropout, dtype, conv_impl, BN eps stay the config's), the stem
    max-pool whatever `config.stem_pool` says (the seed's VehicleResNet always pools; its
    weights without the pool are another function), the seed's 7x7 stem and no BlurPool (the
    weights' own function) and no EMA (a state_dict is one set of weights, served as it is)."""
    import ml_collections
    out = ml_collections.ConfigDict(config.to_dict())
    out.stage_sizes, out.widths = tuple(arch['stage_sizes']), tuple(arch['widths'])
    out.stem_pool, out.ema_decay = True, 0.0
    out.stem, out.blur_pool = 'conv7', False      # the seed's stem, no anti-aliasing blur
    return out


def model_from_torch_checkpoint(path_or_state_dict: str | Mapping[str, Any], config
                                ) -> tuple[ResNet, dict, dict[str, Any]]:
    """(model, variables, architecture) for a seed checkpoint: `build_model` of
    `seed_checkpoint_config(config, ...)` with the checkpoint's num_classes."""
    from cars_jax.model import build_model
    state_dict = (load_torch_checkpoint(path_or_state_dict)
                  if isinstance(path_or_state_dict, str) else strip_prefix(path_or_state_dict))
    arch = infer_architecture(state_dict)
    model = build_model(seed_checkpoint_config(config, arch), arch['num_classes'])
    return model, torch_state_dict_to_variables(state_dict, model), arch
