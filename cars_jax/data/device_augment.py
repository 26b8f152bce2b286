"""The seed's train transform on the accelerator: pure jax, batched, jit-able with a static config.

The CPU path (`augment.py`) decodes each JPEG and runs the whole torchvision chain per image in
numpy/PIL. Here the loader decodes once, squashes every image to a fixed cache size Ch x Cw
(e.g. 256 x 256 for 224 px training) and hands the train step a uint8 batch (B, Ch, Cw, 3) plus
each image's ORIGINAL (height, width). The random draws and the chain then run on the device:

* `sample_device_params(key, orig_hw, cfg)` draws the same distributions as
  `augment.sample_train_params` (RandomResizedCrop's 10 rejection tries with the centre-crop
  fallback, on the ORIGINAL size, so aspect ratios and areas are the CPU path's; RandomErasing's
  10 tries on the S x S output), vectorised over B and over the tries (first valid try wins).
* `params_from_train_params(list_of_TrainParams, orig_hw)` converts CPU draws, so the same draws
  can be fed to both paths.
* `augment_batch(images, params, cfg)` composes crop+resize, flip, rotation and translate+shear
  into one affine map per image (output pixel -> cache coordinate) and samples the cache ONCE,
  bilinearly; then colour jitter (each image's op order), Gaussian blur (reflect padding),
  grayscale, Normalize and RandomErasing, all as whole-batch array ops.

Coordinates are continuous (pixel k covers [k, k+1), centre k + .5), as PIL's warps and resize.
Output point p (S x S) -> affine source p1 = A p (translate/shear, centre S/2) -> rotation source
p2 = R p1 (centre S/2) -> flipped crop (S - x if flipped) -> crop box (left + x w/S, top + y h/S)
in the original -> cache (x Cw/W, y Ch/H). The crop box is kept in ORIGINAL pixels in
`DeviceParams`, so the params do not depend on the cache size; the cache size is read from the
image array.

Matches the CPU path (tests/test_device_augment.py measures it):
* the draws: same distributions (two-sample KS tests, rates), same formulas (rounding of the
  crop/erase sides with round-half-even, integer translate, uniform permutation of the jitter);
* the value ops bit-for-bit up to float32 rounding (< 1e-5): brightness/contrast/saturation blends
  with clamping, hue through HSV, the 1-D Gaussian kernel, reflect padding, ITU-R 601 grayscale,
  Normalize, erasing with `cfg.erasing_value` (0: exactly 0 in normalised space);
* fill 0: output pixels whose affine source falls outside the S x S image are exactly 0 after
  the jitter (as RandomAffine's fill), pixels whose rotation source falls outside are 0 BEFORE
  the jitter (as RandomRotation's fill), so contrast then lifts them to (1 - f) * mean as on CPU.

Accepted differences (all small on natural images; the tests bound them on a smooth image):
* one bilinear resample instead of PIL's antialiased bilinear resize of the crop followed by two
  NEAREST warps: edges of the fill masks move by a fraction of a pixel, and sharp detail is
  interpolated rather than nearest-picked. No antialiasing: the cache is already a (CPU,
  antialiased) downscale, and with Ch ~ S * 8/7 and crop area >= 0.8 the crop is at most ~1.2x
  downscaled, where a bilinear tap without prefilter aliases very little. Much smaller caches or
  crop scales (e.g. torchvision's default 0.08) make the device path alias where the CPU does not.
* the source is the uint8 cache (already a resize of the original), not the original itself.
* contrast's mean: the CPU takes it over the whole rotated S x S image (incl. its black corners)
  BEFORE translate/shear. Without translate/shear in cfg the device output is that image and the
  mean is exact; with them, the mean is taken over an extra `contrast_grid`^2 grid of points of
  that pre-affine image (sampled with the same map, masked the same, jittered alongside), which
  estimates it (default grid min(S, max(32, S/4)): 56 x 56 points for S = 224; the test
  image's error at a 32 px output is ~1e-3 with a 16 x 16 grid, 4x worse with 8 x 8, because the
  black rotation corners are sharp); the output moves by (1 - f) times the mean's error.
* no uint8 rounding between the crop resize and ToTensor (the CPU path has one, < 1/255).
* the draws use float32 and jax.random, so the same key does not give the CPU path's numbers;
  only the distributions match.

Cost: per image one 4-tap gather per output pixel plus elementwise ops; colour jitter evaluates
hue at each of the 4 order positions (a select, no per-image branching), ~4 x the elementwise
work of one hue op, which XLA fuses.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cars_jax.data.augment import (AugmentConfig, BRIGHTNESS, CONTRAST, GRAY_WEIGHTS, HUE,
                                   SATURATION, TrainParams)

N_TRIES = 10   # torchvision's RandomResizedCrop / RandomErasing attempts


class DeviceParams(NamedTuple):
    """Every random draw of a batch, one row per image (a pytree of (B, ...) arrays).

    Disabled jitter ops hold their identity value (factor 1, hue 0)."""
    orig_hw: jax.Array        # (B, 2) int32: the ORIGINAL (height, width) the crop box refers to
    crop: jax.Array           # (B, 4) int32: RandomResizedCrop (top, left, height, width), original px
    flip: jax.Array           # (B,) bool
    angle: jax.Array          # (B,) float32: rotation, degrees counter-clockwise
    jitter_order: jax.Array   # (B, 4) int32: permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE
    brightness: jax.Array     # (B,) float32 factor
    contrast: jax.Array       # (B,) float32 factor
    saturation: jax.Array     # (B,) float32 factor
    hue: jax.Array            # (B,) float32 shift in [-0.5, 0.5]
    translate: jax.Array      # (B, 2) float32 (tx, ty) output pixels (integer-valued)
    shear: jax.Array          # (B, 2) float32 (x, y) degrees
    sigma: jax.Array          # (B,) float32 GaussianBlur sigma
    grayscale: jax.Array      # (B,) bool
    erase: jax.Array          # (B,) bool: RandomErasing happens (and a box fitted)
    erase_box: jax.Array      # (B, 4) int32 (top, left, height, width) on the S x S output


# ---------------------------------------------------------------------------------------------
# parameter sampling
# ---------------------------------------------------------------------------------------------

def _first_valid(ok: jax.Array, *values: jax.Array) -> Tuple[jax.Array, ...]:
    """Per row, the values at the first True of ok (B, T) (index 0 when none)."""
    first = jnp.argmax(ok, axis=1)[:, None]
    return tuple(jnp.take_along_axis(v, first, axis=1)[:, 0] for v in values)


def _rand_offset(key: jax.Array, room: jax.Array) -> jax.Array:
    """Uniform integer in [0, room] (room >= 0), as rng.integers(0, room + 1)."""
    u = jax.random.uniform(key, room.shape)
    return jnp.minimum(jnp.floor(u * (room + 1).astype(jnp.float32)).astype(jnp.int32), room)


def _rrc_boxes(key: jax.Array, hw: jax.Array, scale: Sequence[float],
               ratio: Sequence[float]) -> jax.Array:
    """RandomResizedCrop.get_params for every row of hw (B, 2): (B, 4) int32 boxes."""
    b = hw.shape[0]
    height, width = hw[:, 0], hw[:, 1]
    hf, wf = height.astype(jnp.float32), width.astype(jnp.float32)
    k_s, k_r, k_i, k_j = jax.random.split(key, 4)
    share = jax.random.uniform(k_s, (b, N_TRIES), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_r, (b, N_TRIES), minval=math.log(ratio[0]),
                               maxval=math.log(ratio[1]))
    target = (hf * wf)[:, None] * share
    aspect = jnp.exp(log_r)
    w = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    h = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    ok = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    h1, w1 = _first_valid(ok, h, w)
    i1 = _rand_offset(k_i, jnp.maximum(height - h1, 0))
    j1 = _rand_offset(k_j, jnp.maximum(width - w1, 0))
    # fallback: the centre crop clamped to the ratio range
    rmin, rmax = min(ratio), max(ratio)
    in_ratio = wf / hf
    w0 = jnp.where(in_ratio < rmin, width,
                   jnp.where(in_ratio > rmax, jnp.round(hf * rmax).astype(jnp.int32), width))
    h0 = jnp.where(in_ratio < rmin, jnp.round(wf / rmin).astype(jnp.int32), height)
    any_ok = ok.any(axis=1)
    box_try = jnp.stack([i1, j1, h1, w1], axis=1)
    box_fallback = jnp.stack([(height - h0) // 2, (width - w0) // 2, h0, w0], axis=1)
    return jnp.where(any_ok[:, None], box_try, box_fallback).astype(jnp.int32)


def _erasing_boxes(key: jax.Array, b: int, size: int, scale: Sequence[float],
                   ratio: Sequence[float]) -> Tuple[jax.Array, jax.Array]:
    """RandomErasing.get_params on a size x size image: (fitted (B,) bool, (B, 4) int32 box)."""
    k_s, k_r, k_i, k_j = jax.random.split(key, 4)
    share = jax.random.uniform(k_s, (b, N_TRIES), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_r, (b, N_TRIES), minval=math.log(ratio[0]),
                               maxval=math.log(ratio[1]))
    target = float(size * size) * share
    aspect = jnp.exp(log_r)
    h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)   # aspect is h / w here
    w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    ok = (h < size) & (w < size)
    h1, w1 = _first_valid(ok, h, w)
    h1, w1 = jnp.clip(h1, 0, size), jnp.clip(w1, 0, size)
    i1 = _rand_offset(k_i, size - h1)
    j1 = _rand_offset(k_j, size - w1)
    return ok.any(axis=1), jnp.stack([i1, j1, h1, w1], axis=1).astype(jnp.int32)


def _factor(key: jax.Array, b: int, amount: float) -> jax.Array:
    if amount == 0:
        return jnp.ones((b,), jnp.float32)
    return jax.random.uniform(key, (b,), minval=max(0.0, 1.0 - amount), maxval=1.0 + amount)


@functools.partial(jax.jit, static_argnames=('cfg',))
def sample_device_params(key: jax.Array, orig_hw: jax.Array, cfg: AugmentConfig) -> DeviceParams:
    """All random draws for a batch whose images had ORIGINAL sizes orig_hw (B, 2) = (h, w);
    the distributions of `augment.sample_train_params`, drawn deterministically from key."""
    orig_hw = jnp.asarray(orig_hw, jnp.int32)
    b = orig_hw.shape[0]
    s = cfg.image_size
    ks = jax.random.split(key, 14)
    uni = lambda k, lo, hi, shape=(b,): jax.random.uniform(k, shape, minval=lo, maxval=hi)
    crop = _rrc_boxes(ks[0], orig_hw, cfg.rrc_scale, cfg.rrc_ratio)
    flip = jax.random.uniform(ks[1], (b,)) < cfg.hflip_prob
    angle = uni(ks[2], -cfg.rotation_degrees, cfg.rotation_degrees)
    order = jnp.argsort(jax.random.uniform(ks[3], (b, 4)), axis=1).astype(jnp.int32)
    hue = (uni(ks[7], -cfg.hue, cfg.hue) if cfg.hue > 0 else jnp.zeros((b,), jnp.float32))
    max_d = jnp.asarray([cfg.translate[0] * s, cfg.translate[1] * s], jnp.float32)
    translate = jnp.round(uni(ks[8], -max_d, max_d, (b, 2)))
    shear_x = uni(ks[9], -cfg.shear_degrees, cfg.shear_degrees)
    shear = jnp.stack([shear_x, jnp.zeros_like(shear_x)], axis=1)
    sigma = uni(ks[10], cfg.blur_sigma[0], cfg.blur_sigma[1])
    gray = jax.random.uniform(ks[11], (b,)) < cfg.grayscale_prob
    fitted, erase_box = _erasing_boxes(ks[13], b, s, cfg.erasing_scale, cfg.erasing_ratio)
    erase = (jax.random.uniform(ks[12], (b,)) < cfg.erasing_prob) & fitted
    return DeviceParams(
        orig_hw=orig_hw, crop=crop, flip=flip, angle=angle, jitter_order=order,
        brightness=_factor(ks[4], b, cfg.brightness), contrast=_factor(ks[5], b, cfg.contrast),
        saturation=_factor(ks[6], b, cfg.saturation), hue=hue, translate=translate, shear=shear,
        sigma=sigma, grayscale=gray, erase=erase,
        erase_box=jnp.where(erase[:, None], erase_box, 0))


def params_from_train_params(params: Sequence[TrainParams], orig_hw: np.ndarray) -> DeviceParams:
    """CPU draws (one `TrainParams` per image, drawn on the ORIGINAL sizes orig_hw (B, 2)) as
    `DeviceParams`, so both paths can run on the same draws."""
    orig_hw = np.asarray(orig_hw, np.int32).reshape(-1, 2)
    if len(params) != len(orig_hw):
        raise ValueError(f'{len(params)} params for {len(orig_hw)} image sizes')
    f32 = lambda v: jnp.asarray(np.asarray(v, np.float32))
    ident = lambda v, default: default if v is None else v
    return DeviceParams(
        orig_hw=jnp.asarray(orig_hw),
        crop=jnp.asarray(np.asarray([p.crop for p in params], np.int32).reshape(-1, 4)),
        flip=jnp.asarray(np.asarray([p.flip for p in params], bool)),
        angle=f32([p.angle for p in params]),
        jitter_order=jnp.asarray(np.asarray([p.jitter_order for p in params], np.int32).reshape(-1, 4)),
        brightness=f32([ident(p.brightness, 1.0) for p in params]),
        contrast=f32([ident(p.contrast, 1.0) for p in params]),
        saturation=f32([ident(p.saturation, 1.0) for p in params]),
        hue=f32([ident(p.hue, 0.0) for p in params]),
        translate=f32([p.translate for p in params]).reshape(-1, 2),
        shear=f32([p.shear for p in params]).reshape(-1, 2),
        sigma=f32([p.sigma for p in params]),
        grayscale=jnp.asarray(np.asarray([p.grayscale for p in params], bool)),
        erase=jnp.asarray(np.asarray([p.erase is not None for p in params], bool)),
        erase_box=jnp.asarray(np.asarray([p.erase if p.erase is not None else (0, 0, 0, 0)
                                          for p in params], np.int32).reshape(-1, 4)))


# ---------------------------------------------------------------------------------------------
# geometry: one affine map per image, one bilinear resample
# ---------------------------------------------------------------------------------------------

def _mat(a, b, c, d, e, f) -> jax.Array:
    """(B, 3, 3) from the six (B,) entries of x' = a x + b y + c, y' = d x + e y + f."""
    a = jnp.asarray(a, jnp.float32)
    zero, one = jnp.zeros_like(a), jnp.ones_like(a)
    rows = [[a, b, c], [d, e, f], [zero, zero, one]]
    return jnp.stack([jnp.stack([jnp.broadcast_to(jnp.asarray(v, jnp.float32), a.shape)
                                 for v in row], -1) for row in rows], -2)


def geometry_matrices(params: DeviceParams, size: int,
                      cache_hw: Tuple[int, int]) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The continuous-coordinate maps of each image, (B, 3, 3) each:
    affine = output -> RandomAffine source (translate + shear, centre S/2, torchvision's
    `_get_inverse_affine_matrix` at angle 0, scale 1); rotation = RandomAffine source ->
    RandomRotation source (PIL's rotate matrix, centre S/2); crop = RandomRotation source ->
    cache (flip, crop box resize, original -> cache squash)."""
    s = float(size)
    c = s * 0.5
    # translate + shear (angle 0, scale 1)
    sx, sy = jnp.deg2rad(params.shear[:, 0]), jnp.deg2rad(params.shear[:, 1])
    tx, ty = params.translate[:, 0], params.translate[:, 1]
    a = jnp.cos(-sy) / jnp.cos(sy)
    b = -jnp.cos(-sy) * jnp.tan(sx) / jnp.cos(sy)
    cc = jnp.sin(-sy) / jnp.cos(sy)
    d = -jnp.sin(-sy) * jnp.tan(sx) / jnp.cos(sy) + 1.0
    m0, m1, m3, m4 = d, -b, -cc, a
    affine = _mat(m0, m1, m0 * (-c - tx) + m1 * (-c - ty) + c,
                  m3, m4, m3 * (-c - tx) + m4 * (-c - ty) + c)
    # rotation, counter-clockwise degrees (PIL Image.rotate's inverse matrix)
    rad = -jnp.deg2rad(params.angle)
    cos, sin = jnp.cos(rad), jnp.sin(rad)
    rotation = _mat(cos, sin, -cos * c - sin * c + c, -sin, cos, sin * c - cos * c + c)
    # flip, crop box -> original pixels, original -> cache
    top, left = params.crop[:, 0].astype(jnp.float32), params.crop[:, 1].astype(jnp.float32)
    bh, bw = params.crop[:, 2].astype(jnp.float32), params.crop[:, 3].astype(jnp.float32)
    oh, ow = params.orig_hw[:, 0].astype(jnp.float32), params.orig_hw[:, 1].astype(jnp.float32)
    fx = cache_hw[1] / ow
    fy = cache_hw[0] / oh
    kx = bw / s * fx
    sign = jnp.where(params.flip, -1.0, 1.0)
    # x_cache = fx * (left + kx' * x_flipped), x_flipped = S - x if flip else x
    crop = _mat(sign * kx, 0.0, (left + jnp.where(params.flip, bw, 0.0)) * fx,
                0.0, bh / s * fy, top * fy)
    return affine, rotation, crop


def _compose(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b for (B, 3, 3) stacks, elementwise in full float32: `@` may run at TF32 / bf16
    precision on accelerators, which would move cache coordinates (~256) by a fraction of a px."""
    return (a[:, :, :, None] * b[:, None, :, :]).sum(axis=2)


def _apply(m: jax.Array, x: jax.Array, y: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Maps points (x, y) of shape (N,) or (B, N) with (B, 3, 3) matrices: (B, N) each."""
    col = lambda k: m[:, k[0], k[1], None]
    return (col((0, 0)) * x + col((0, 1)) * y + col((0, 2)),
            col((1, 0)) * x + col((1, 1)) * y + col((1, 2)))


def _inside(x: jax.Array, y: jax.Array, size: int) -> jax.Array:
    """PIL NEAREST's test: floor of the source point inside [0, size)^2."""
    return (x >= 0) & (x < size) & (y >= 0) & (y < size)


def bilinear_sample(images: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """images (B, H, W, 3) at continuous points (x, y) (B, N) (pixel k centred at k + .5),
    bilinear, clamped to the edge pixels: float32 (B, N, 3), in the images' units."""
    bsz, h, w, ch = images.shape
    u, v = x - 0.5, y - 0.5
    x0, y0 = jnp.floor(u), jnp.floor(v)
    fx, fy = (u - x0)[..., None], (v - y0)[..., None]
    x0 = x0.astype(jnp.int32)
    y0 = y0.astype(jnp.int32)
    xa, xb = jnp.clip(x0, 0, w - 1), jnp.clip(x0 + 1, 0, w - 1)
    ya, yb = jnp.clip(y0, 0, h - 1), jnp.clip(y0 + 1, 0, h - 1)
    flat = images.reshape(bsz, h * w, ch)
    take = lambda yy, xx: jnp.take_along_axis(flat, (yy * w + xx)[..., None], axis=1).astype(jnp.float32)
    top = take(ya, xa) * (1 - fx) + take(ya, xb) * fx
    bot = take(yb, xa) * (1 - fx) + take(yb, xb) * fx
    return top * (1 - fy) + bot * fy


def _pixel_centres(n: int, size: int) -> Tuple[jax.Array, jax.Array]:
    """Centres of an n x n grid covering [0, size)^2, flattened row-major: (n*n,) x, y."""
    t = (jnp.arange(n, dtype=jnp.float32) + 0.5) * (size / n)
    yy, xx = jnp.meshgrid(t, t, indexing='ij')
    return xx.reshape(-1), yy.reshape(-1)


# ---------------------------------------------------------------------------------------------
# value ops on (B, N, 3) float32 in [0, 1]
# ---------------------------------------------------------------------------------------------

def _gray(x: jax.Array) -> jax.Array:
    r, g, b = GRAY_WEIGHTS
    return jnp.float32(r) * x[..., 0:1] + jnp.float32(g) * x[..., 1:2] + jnp.float32(b) * x[..., 2:3]


def _hue(x: jax.Array, shift: jax.Array) -> jax.Array:
    """augment._hue_chw on (B, N, 3) with a per-image shift (B,)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    minc = jnp.minimum(jnp.minimum(r, g), b)
    delta = maxc - minc
    inv = 1.0 / (delta + (delta == 0))
    h = jnp.where(maxc == r, (g - b) * inv,
                  jnp.where(maxc == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h = h + (6.0 * shift)[:, None]
    out = []
    for n in (5.0, 3.0, 1.0):
        k = h + n
        k = k - 6.0 * jnp.floor(k * (1 / 6))
        k = jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)
        out.append(maxc - delta * k)
    return jnp.stack(out, axis=-1)


def color_jitter(x: jax.Array, params: DeviceParams, cfg: AugmentConfig,
                 mean_from: Optional[int] = None) -> jax.Array:
    """ColorJitter on (B, N, 3) float32 in [0, 1], each image in its own op order.
    Contrast blends with the mean gray of points mean_from: (default: all N points).
    Every order position blends with the selected op's factor (brightness: 0, contrast: the mean,
    saturation: the gray image; hue there: factor 1 = identity) and, when cfg.hue > 0, selects
    the hue rotation where that position is HUE."""
    if cfg.brightness == 0 and cfg.contrast == 0 and cfg.saturation == 0 and cfg.hue == 0:
        return x
    col = lambda v: v[:, None, None]
    for k in range(4):
        op = params.jitter_order[:, k]
        factor = jnp.where(op == BRIGHTNESS, params.brightness,
                           jnp.where(op == CONTRAST, params.contrast,
                                     jnp.where(op == SATURATION, params.saturation, 1.0)))
        gray = _gray(x)
        mean = jnp.mean(gray[:, mean_from:] if mean_from is not None else gray, axis=(1, 2))
        other = jnp.where(col(op == SATURATION), gray,
                          jnp.where(col(op == CONTRAST), col(mean), 0.0))
        f = col(factor)
        blended = jnp.clip(f * x + (1.0 - f) * other, 0.0, 1.0)
        if cfg.hue > 0:
            x = jnp.where(col(op == HUE), _hue(x, params.hue), blended)
        else:
            x = blended
    return x


def gaussian_kernels(kernel_size: int, sigma: jax.Array) -> jax.Array:
    """torchvision's _get_gaussian_kernel1d per sigma (B,): (B, kernel_size), rows sum to 1."""
    half = (kernel_size - 1) * 0.5
    t = jnp.linspace(-half, half, kernel_size, dtype=jnp.float32)
    pdf = jnp.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return pdf / pdf.sum(axis=1, keepdims=True)


def gaussian_blur(x: jax.Array, kernel_size: int, sigma: jax.Array) -> jax.Array:
    """Separable blur of (B, H, W, C) with a per-image sigma (B,), torch 'reflect' padding
    (H and W must exceed kernel_size // 2)."""
    if kernel_size == 1:
        return x
    k = gaussian_kernels(kernel_size, sigma)
    p = kernel_size // 2
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (p, p), (0, 0), (0, 0)), mode='reflect')
    x = sum(k[:, t, None, None, None] * xp[:, t:t + h] for t in range(kernel_size))
    xp = jnp.pad(x, ((0, 0), (0, 0), (p, p), (0, 0)), mode='reflect')
    return sum(k[:, t, None, None, None] * xp[:, :, t:t + w] for t in range(kernel_size))


# ---------------------------------------------------------------------------------------------
# the composed transform
# ---------------------------------------------------------------------------------------------

def _uses_affine(cfg: AugmentConfig) -> bool:
    return any(cfg.translate) or cfg.shear_degrees > 0


def _trace_config(cfg: AugmentConfig) -> AugmentConfig:
    """cfg with every field that only shapes the draws (not the traced computation) set to a
    fixed value, so configs that differ only in ranges / probabilities share one compile."""
    on = lambda v: float(v > 0)
    return dataclasses.replace(
        cfg, rrc_scale=(1.0, 1.0), rrc_ratio=(1.0, 1.0), hflip_prob=0.0, rotation_degrees=0.0,
        brightness=on(cfg.brightness), contrast=on(cfg.contrast), saturation=on(cfg.saturation),
        hue=0.1 * on(cfg.hue), translate=(float(_uses_affine(cfg)),) * 2, shear_degrees=0.0,
        blur_sigma=(1.0, 1.0), grayscale_prob=on(cfg.grayscale_prob),
        erasing_prob=on(cfg.erasing_prob), erasing_scale=(0.0, 1.0), erasing_ratio=(1.0, 1.0),
        eval_resize='squash')


def augment_batch(images: jax.Array, params: DeviceParams, cfg: AugmentConfig,
                  contrast_grid: Optional[int] = None) -> jax.Array:
    """The seed's train transform on a cached batch: images (B, Ch, Cw, 3) (uint8, or float in
    [0, 1]) squashed from originals of size params.orig_hw -> float32 (B, S, S, 3) normalised,
    S = cfg.image_size (the size the translate and erase draws refer to). Jitted; cfg is static.

    contrast_grid: side of the point grid over the pre-translate/shear image whose mean gray is
    contrast's blend target (default min(S, max(32, S // 4)); only used when cfg has contrast and
    translate or shear; see the module docstring)."""
    s = cfg.image_size
    grid = 0
    if cfg.contrast > 0 and _uses_affine(cfg):
        grid = min(s, max(32, s // 4)) if contrast_grid is None else int(contrast_grid)
        if grid < 1:
            raise ValueError(f'contrast_grid must be >= 1, got {contrast_grid}')
    return _augment_batch(images, params, _trace_config(cfg), grid)


@functools.partial(jax.jit, static_argnames=('cfg', 'contrast_grid'))
def _augment_batch(images: jax.Array, params: DeviceParams, cfg: AugmentConfig,
                   contrast_grid: int) -> jax.Array:
    bsz, ch, cw, _ = images.shape
    s = cfg.image_size
    scale = 1.0 / 255.0 if images.dtype == jnp.uint8 else 1.0
    affine, rotation, crop = geometry_matrices(params, s, (ch, cw))
    # one map output -> cache; the intermediate maps only give the fill masks
    total = _compose(crop, _compose(rotation, affine))
    px, py = _pixel_centres(s, s)
    x1, y1 = _apply(affine, px, py)
    x2, y2 = _apply(_compose(rotation, affine), px, py)
    cx, cy = _apply(total, px, py)
    valid_affine = _inside(x1, y1, s)[..., None]
    valid_rotation = _inside(x2, y2, s)[..., None]
    n_out = s * s
    grid = contrast_grid             # 0: contrast's mean over the output itself
    if grid:
        gx, gy = _pixel_centres(grid, s)
        gx2, gy2 = _apply(rotation, gx, gy)
        gcx, gcy = _apply(_compose(crop, rotation), gx, gy)
        cx, cy = jnp.concatenate([cx, gcx], 1), jnp.concatenate([cy, gcy], 1)
        valid_rotation = jnp.concatenate([valid_rotation, _inside(gx2, gy2, s)[..., None]], 1)
    x = bilinear_sample(images, cx, cy) * jnp.float32(scale)
    x = jnp.where(valid_rotation, x, 0.0)                       # RandomRotation's fill
    x = color_jitter(x, params, cfg, mean_from=n_out if grid else None)
    x = jnp.where(valid_affine, x[:, :n_out], 0.0)              # RandomAffine's fill
    x = x.reshape(bsz, s, s, 3)
    x = gaussian_blur(x, cfg.blur_kernel, params.sigma)
    if cfg.grayscale_prob > 0:
        x = jnp.where(params.grayscale[:, None, None, None], jnp.repeat(_gray(x), 3, -1), x)
    mean = jnp.asarray(cfg.mean, jnp.float32)
    inv_std = 1.0 / jnp.asarray(cfg.std, jnp.float32)
    x = (x - mean) * inv_std
    if cfg.erasing_prob > 0:
        rows = jnp.arange(s)[None, :]
        top, left, eh, ew = (params.erase_box[:, k, None] for k in range(4))
        in_rows = (rows >= top) & (rows < top + eh)                 # (B, S)
        in_cols = (rows >= left) & (rows < left + ew)
        box = in_rows[:, :, None] & in_cols[:, None, :] & params.erase[:, None, None]
        value = jnp.broadcast_to(jnp.asarray(cfg.erasing_value, jnp.float32), (3,))
        x = jnp.where(box[..., None], value, x)
    return x
