"""Grad-CAM for the project's ResNet: pure maps, localisation scores, and the figure.

The seed ran `pytorch_grad_cam.GradCAM` on `model.l4` with the predicted class as target
(the notebook's §5). Here it is written out:

    A      = the stage's output (N, h, w, C), flax name 'stage4' for the seed's model.l4
    g      = d logit_target / d A, through the zero perturbation `model.perturb` adds there
    w_k    = mean over (h, w) of g[..., k]                  (per image, per channel)
    cam    = ReLU(sum_k w_k A_k)                           -> 'cam_lowres' (N, h, w)
    then a bilinear upsampling to the input size and a per-image min-max to [0, 1] -> 'cam'.

The target is the pre-softmax logit; inference mode (BN running statistics, no dropout), so
the images of a batch do not interact and one `jax.grad` of the summed target logits gives
every image's own gradient. (pytorch_grad_cam normalises before resizing; resizing first, as
here, keeps the upsampled map's own maximum at exactly 1.)

For this architecture (global average pool -> fc) Grad-CAM on the last stage is the class
activation map ReLU(sum_k W[k, c] A_k) scaled by 1/(h w) (tests/test_gradcam.py checks it).

Box scores (`pointing_game`, `mass_inside`, `box_area_share`) are numpy on maps of any
resolution; boxes are [x1, y1, x2, y2] pixel edges of that resolution, used like the slices
x1:x2, y1:y2 (rounded to whole pixels and clipped to the map). `scale_box` carries annotated
boxes onto the squash-resized eval image. `overlay` / `plot_gradcam_grid` are the drawing
side (matplotlib Agg), given images already de-normalised with
`cars_jax.data.augment.denormalize` (the seed used mean/std 0.5 there and got tinted pictures).
"""
from __future__ import annotations

import textwrap
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cars_jax.fileio import save_figure_atomic
from cars_jax.metrics import shorten_name
from cars_jax.model import ResNet

PERTURBABLE = ('stage1', 'stage2', 'stage3', 'stage4')   # the stages with `self.perturb`


# ---- the maps (pure JAX) ------------------------------------------------------------------

def activation_and_grad(model: ResNet, variables: dict, images: jax.Array,
                        targets: jax.Array | None = None, layer: str = 'stage4') -> dict:
    """The layer's activation A, d(target logit)/dA, the logits and the targets used.

    Returns {'activation': (N, h, w, C), 'grad': same shape, 'logits': (N, K) float32,
    'targets': (N,) int32}; targets None means each image's argmax class.
    """
    if layer not in PERTURBABLE:
        raise ValueError(f'layer must be one of {PERTURBABLE}, got {layer!r}')
    base = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
    # the activation's shape and dtype, without running anything
    _, shapes = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']), base, images)
    spec = shapes['intermediates'][layer][0]
    zeros = jnp.zeros(spec.shape, spec.dtype)

    def score(eps):
        logits, state = model.apply({**base, 'perturbations': {layer: eps}}, images,
                                    train=False, mutable=['intermediates'])
        t = jnp.argmax(logits, axis=-1) if targets is None else jnp.asarray(targets)
        t = t.astype(jnp.int32)
        picked = jnp.take_along_axis(logits, t[:, None], axis=1)
        return jnp.sum(picked), (logits, state['intermediates'][layer][0], t)

    grad, (logits, act, t) = jax.grad(score, has_aux=True)(zeros)
    return {'activation': act, 'grad': grad, 'logits': logits, 'targets': t}


def cam_from_activation(activation: jax.Array, grad: jax.Array) -> jax.Array:
    """ReLU(sum_k mean_hw(grad_k) A_k): (N, h, w, C) twice -> (N, h, w) float32."""
    a = activation.astype(jnp.float32)
    w = jnp.mean(grad.astype(jnp.float32), axis=(1, 2))                 # (N, C)
    return jax.nn.relu(jnp.einsum('nhwc,nc->nhw', a, w))


def normalize_maps(maps: jax.Array) -> jax.Array:
    """Per-map min-max to [0, 1]; a constant map (all zeros included) gives zeros, not NaN."""
    lo = jnp.min(maps, axis=(1, 2), keepdims=True)
    span = jnp.max(maps, axis=(1, 2), keepdims=True) - lo
    ok = span > 0
    return jnp.where(ok, (maps - lo) / jnp.where(ok, span, 1.0), 0.0)


def upsample(maps: jax.Array, height: int, width: int) -> jax.Array:
    """(N, h, w) -> (N, height, width), bilinear with half-pixel centres (edges clamped)."""
    return jax.image.resize(maps, (maps.shape[0], height, width), method='bilinear')


def gradcam(model: ResNet, variables: dict, images: jax.Array, targets: jax.Array | None = None,
            layer: str = 'stage4') -> dict:
    """Grad-CAM of `images` (N, H, W, 3, normalised) for `targets` (None: predicted classes).

    Returns {'cam': (N, H, W) float32 in [0, 1], 'cam_lowres': (N, h, w) before upsampling
    and normalising, 'logits': (N, K), 'probs': (N, K), 'targets': (N,) int32}. Traceable:
    jit it with `model` and `layer` static (`make_gradcam_fn`), vmap over extra leading axes.
    """
    out = activation_and_grad(model, variables, images, targets, layer)
    low = cam_from_activation(out['activation'], out['grad'])
    cam = normalize_maps(upsample(low, images.shape[1], images.shape[2]))
    return {'cam': cam.astype(jnp.float32), 'cam_lowres': low, 'logits': out['logits'],
            'probs': jax.nn.softmax(out['logits'], axis=-1), 'targets': out['targets']}


def make_gradcam_fn(model: ResNet, layer: str = 'stage4') -> Callable[..., dict]:
    """jit(gradcam) with model and layer bound: fn(variables, images, targets=None) -> dict.

    A call with targets=None and one with targets compile separately (None is a static
    pytree); each new batch shape compiles once.
    """
    @jax.jit
    def fn(variables, images, targets=None):
        return gradcam(model, variables, images, targets, layer)
    return fn


# ---- localisation scores (numpy) ----------------------------------------------------------

def _int_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, 4) whole-pixel edges clipped to the map; x2 >= x1, y2 >= y1."""
    b = np.rint(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4)
    x1 = np.clip(b[:, 0], 0, width)
    y1 = np.clip(b[:, 1], 0, height)
    x2 = np.clip(b[:, 2], x1, width)
    y2 = np.clip(b[:, 3], y1, height)
    return np.stack([x1, y1, x2, y2], axis=1).astype(np.int64)


def pointing_game(cams: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N,) bool: is each map's maximum pixel inside its box (x1 <= x < x2, y1 <= y < y2)?

    A constant map (no maximum to point with, e.g. all zero) counts as a miss rather than
    pointing at its (0, 0) corner.
    """
    cams = np.asarray(cams)
    n, h, w = cams.shape
    b = _int_boxes(boxes, h, w)
    flat = cams.reshape(n, -1)
    y, x = np.unravel_index(np.argmax(flat, axis=1), (h, w))
    inside = (b[:, 0] <= x) & (x < b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 3])
    return inside & (flat.max(axis=1) > flat.min(axis=1))


def mass_inside(cams: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(N,) share of each (non-negative) map's total mass inside its box; 0 for a zero map."""
    cams = np.asarray(cams, dtype=np.float64)
    n, h, w = cams.shape
    b = _int_boxes(boxes, h, w)
    out = np.zeros(n)
    for i, (x1, y1, x2, y2) in enumerate(b):
        total = cams[i].sum()
        if total > 0:
            out[i] = cams[i, y1:y2, x1:x2].sum() / total
    return out


def box_area_share(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,) the box's share of the map's area: the chance level of `mass_inside` (a uniform
    map) and of `pointing_game` (a uniformly random maximum)."""
    b = _int_boxes(boxes, height, width)
    return ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / float(height * width)


def scale_box(box: Sequence[float] | np.ndarray, src_wh: tuple[float, float],
              dst_wh: tuple[float, float]) -> np.ndarray:
    """[x1, y1, x2, y2] (or (N, 4)) from a (W, H) image onto the same image squash-resized to
    dst (W', H'): x * W'/W, y * H'/H, as float. Pixel edges map exactly; Stanford Cars'
    annotations are inclusive pixel indices, so add 1 to x2, y2 first for edge semantics."""
    b = np.asarray(box, dtype=np.float64)
    sx = dst_wh[0] / src_wh[0]
    sy = dst_wh[1] / src_wh[1]
    return b * np.array([sx, sy, sx, sy])


# ---- drawing ------------------------------------------------------------------------------

def _jet(values: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps
    return np.asarray(colormaps['jet'](values)[..., :3], dtype=np.float32)


def overlay(image_rgb01: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """JET heat map over an RGB image in [0, 1]: alpha * jet(cam) + (1 - alpha) * image, then
    divided by its maximum, as pytorch_grad_cam's show_cam_on_image (image_weight = 1 - alpha;
    matplotlib's 256-level 'jet' instead of OpenCV's). float32 (H, W, 3) in [0, 1]."""
    img = np.asarray(image_rgb01, dtype=np.float32)
    cam = np.asarray(cam, dtype=np.float32)
    if img.shape[:2] != cam.shape:
        raise ValueError(f'image {img.shape} and cam {cam.shape} differ in size')
    if img.size and (img.max() > 1.0 or img.min() < 0.0):
        raise ValueError('image_rgb01 must be in [0, 1]: de-normalise it first')
    out = np.float32(alpha) * _jet(np.clip(cam, 0.0, 1.0)) + np.float32(1.0 - alpha) * img
    top = out.max()
    return out / top if top > 0 else out


def shorten(name: str, max_chars: int = 26) -> str:
    """Cut a long class name to max_chars from the middle (`metrics.shorten_name`)."""
    return shorten_name(name, max_chars)


def _wrap(name: str, width: int = 30) -> str:
    """Class names differ in their middle ('... Grille-H Rect-Amber 2012'): wrap onto two
    lines rather than cut the end."""
    lines = textwrap.wrap(str(name), width)
    return '\n'.join(lines[:1] + [shorten(' '.join(lines[1:]), width)] if len(lines) > 1 else lines)


def plot_gradcam_grid(images_rgb01: np.ndarray, cams: np.ndarray,
                      true_names: Sequence[str] | None, pred_names: Sequence[str],
                      confidences: Sequence[float], path: str, ncols: int = 5,
                      title: str = 'Grad-CAM', captions: Sequence[str] | None = None) -> None:
    """A grid of overlays, each titled 'pred (93%): NAME\\ntrue: NAME', green when the
    prediction is right and red when wrong. true_names None (unlabelled images): titled
    'CAPTION\\npred (93%): NAME' in black, the caption being e.g. the file name. Written
    atomically as PNG."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    n = len(images_rgb01)
    captions = list(captions) if captions is not None else [''] * n
    if not (len(cams) == len(pred_names) == len(confidences) == len(captions) == n
            and (true_names is None or len(true_names) == n)):
        raise ValueError('images, cams, names and confidences must have the same length')
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis('off')
    for i in range(n):
        ax = axes.ravel()[i]
        ax.imshow(overlay(images_rgb01[i], cams[i]))
        pred = f'pred ({100 * float(confidences[i]):.0f}%): {_wrap(pred_names[i])}'
        if true_names is None:
            ax.set_title(f'{shorten(captions[i], 30)}\n{pred}', color='black', fontsize=8)
        else:
            correct = str(pred_names[i]) == str(true_names[i])
            ax.set_title(f'{pred}\ntrue: {_wrap(true_names[i])}',
                         color='green' if correct else 'red', fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=80, fmt='png')
