"""The seed's torchvision transforms as pure numpy (+ PIL) functions with explicit randomness.

Train, in the seed notebook's order (its §2):

    RandomResizedCrop(S, scale, ratio) -> RandomHorizontalFlip -> RandomRotation(15, NEAREST, fill 0)
    -> ColorJitter(.2, .2, .2, .1) -> RandomAffine(0, translate=(.1, .1), shear=10, NEAREST, fill 0)
    -> GaussianBlur(3, sigma=(.1, 2)) -> RandomGrayscale(.1) -> ToTensor -> Normalize
    -> RandomErasing(.3, scale=(.02, .33), ratio=(.3, 3.3), value=0)

Every random draw of one image is made up front by `sample_train_params` (from an explicit
`np.random.Generator`) into a frozen `TrainParams`; `apply_train_transform` is then a
deterministic function of (image, params, cfg). Nothing touches a global RNG, and every
function and dataclass is top-level, so all of it pickles into grain worker processes.

Semantics follow torchvision (the seed fed it PIL images, so its PIL code paths):
* geometry: the crop is resized with PIL's antialiased bilinear (as `F.resized_crop` on PIL);
  `rotate` and `affine` reproduce PIL's `Image.rotate` / `Image.transform(AFFINE, NEAREST)` bit
  for bit (source pixel floor(M @ (x + .5, y + .5)) in PIL's 16.16 fixed point, centre (w/2, h/2),
  fill 0, output the input's size), with the matrices of `F.rotate` (angle counter-clockwise) and
  `F.affine` / `_get_inverse_affine_matrix` (angle clockwise, translate, shear).
* values: from the colour jitter on, the image is float32 in [0, 1] and the ops are torchvision's
  tensor formulas (blend + clamp to [0, 1], hue through HSV, grayscale with ITU-R 601 weights
  0.299/0.587/0.114, Gaussian kernel and reflect padding of `F.gaussian_blur`). The seed's PIL
  path stayed uint8 until ToTensor; its intermediate uint8 rounding (< 1/255 per op) is not
  reproduced.
* the float stage runs channels-first internally (numpy is several times faster on whole planes
  than on a trailing axis of 3); a 224 px train transform costs a few ms of one CPU core.

Conventions: images are HxWxC numpy arrays (channels last). Geometric ops (`resized_crop`,
`hflip`, `rotate`, `affine`, `erase`) keep the dtype; value ops (`adjust_*`, `gaussian_blur`,
`to_grayscale`, `to_float`, `normalize`) take uint8 (read as /255) or float in [0, 1] and
return float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from cars_jax.serving import ensure_rgb   # one copy; serving.py stays standalone (numpy only)

# ITU-R 601-2 luma, as PIL's convert('L') (torchvision's tensor path uses 0.2989 for red).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)

# ColorJitter's four ops, indexed as in torchvision's `fn_idx` permutation.
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3

EVAL_RESIZE_MODES = ('squash', 'center_crop')

# Normalize(ImageNet): the channel mean and std every image is normalised with by default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Box = Tuple[int, int, int, int]  # (top, left, height, width), torchvision's (i, j, h, w)


# ---------------------------------------------------------------------------------------------
# configuration and parameters
# ---------------------------------------------------------------------------------------------

def _pair(value: Any, name: str) -> Tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f'{name} must be a pair of numbers, got {value!r}') from None
    return a, b


def _triple(value: Any, name: str) -> Tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f'{name} must be a number or 3 numbers, got {value!r}') from None
    if len(out) != 3:
        raise ValueError(f'{name} must be a number or 3 numbers, got {value!r}')
    return out


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The augmentation hyperparameters; field names and meanings as in configs/base.py."""
    image_size: int = 224
    rrc_scale: Tuple[float, float] = (0.8, 1.0)
    rrc_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    rotation_degrees: float = 15.0          # angle ~ U[-d, d], counter-clockwise positive
    brightness: float = 0.2                 # factor ~ U[max(0, 1 - b), 1 + b]; 0 disables
    contrast: float = 0.2                   # idem
    saturation: float = 0.2                 # idem
    hue: float = 0.1                        # shift ~ U[-h, h] (fraction of the hue circle)
    translate: Tuple[float, float] = (0.1, 0.1)  # max |shift| as a share of (width, height)
    shear_degrees: float = 10.0             # x-shear ~ U[-s, s]; no y-shear
    blur_kernel: int = 3
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    grayscale_prob: float = 0.1
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    erasing_prob: float = 0.3
    erasing_scale: Tuple[float, float] = (0.02, 0.33)
    erasing_ratio: Tuple[float, float] = (0.3, 3.3)
    erasing_value: Union[float, Tuple[float, float, float]] = 0.0
    eval_resize: str = 'squash'             # 'squash' (the seed) | 'center_crop'

    def __post_init__(self):
        # Normalise types (ml_collections / CLI overrides may give lists or ints) and validate.
        set_ = lambda k, v: object.__setattr__(self, k, v)
        set_('image_size', int(self.image_size))
        if self.image_size < 1:
            raise ValueError(f'image_size must be >= 1, got {self.image_size}')
        for name in ('rrc_scale', 'rrc_ratio', 'blur_sigma', 'erasing_scale', 'erasing_ratio'):
            lo, hi = _pair(getattr(self, name), name)
            # area shares may start at 0; ratios (log-uniform) and sigmas must be positive
            if not (0 <= lo if name.endswith('scale') else 0 < lo) or lo > hi:
                raise ValueError(f'{name} must satisfy 0 {"<=" if name.endswith("scale") else "<"} '
                                 f'low <= high, got {(lo, hi)}')
            set_(name, (lo, hi))
        if self.rrc_scale[1] > 1 or self.erasing_scale[1] > 1:
            raise ValueError('rrc_scale and erasing_scale are area shares, at most 1')
        t = self.translate
        t = (float(t), float(t)) if isinstance(t, (int, float)) else _pair(t, 'translate')
        if not all(0 <= v <= 1 for v in t):
            raise ValueError(f'translate shares must be in [0, 1], got {t}')
        set_('translate', t)
        for name in ('hflip_prob', 'grayscale_prob', 'erasing_prob'):
            p = float(getattr(self, name))
            if not 0 <= p <= 1:
                raise ValueError(f'{name} must be in [0, 1], got {p}')
            set_(name, p)
        for name in ('rotation_degrees', 'brightness', 'contrast', 'saturation', 'hue',
                     'shear_degrees'):
            v = float(getattr(self, name))
            if v < 0:
                raise ValueError(f'{name} must be >= 0, got {v}')
            set_(name, v)
        if self.hue > 0.5:
            raise ValueError(f'hue must be in [0, 0.5], got {self.hue}')
        set_('blur_kernel', int(self.blur_kernel))
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f'blur_kernel must be a positive odd integer, got {self.blur_kernel}')
        set_('mean', _triple(self.mean, 'mean'))
        set_('std', _triple(self.std, 'std'))
        if any(s <= 0 for s in self.std):
            raise ValueError(f'std must be positive, got {self.std}')
        v = self.erasing_value
        set_('erasing_value', float(v) if isinstance(v, (int, float)) else _triple(v, 'erasing_value'))
        if self.eval_resize not in EVAL_RESIZE_MODES:
            raise ValueError(f'eval_resize must be one of {EVAL_RESIZE_MODES}, got {self.eval_resize!r}')

    @classmethod
    def from_config(cls, config: Any) -> 'AugmentConfig':
        """Builds from anything with configs/base.py's attribute names (ConfigDict, namespace)."""
        kwargs = {}
        for field in dataclasses.fields(cls):
            if not hasattr(config, field.name):
                raise ValueError(f'config has no field {field.name!r} (see configs/base.py)')
            kwargs[field.name] = getattr(config, field.name)
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class TrainParams:
    """Every random draw of one train transform (plain Python numbers; picklable)."""
    crop: Box                           # RandomResizedCrop box in the input image
    flip: bool                          # RandomHorizontalFlip
    angle: float                        # RandomRotation, degrees counter-clockwise
    jitter_order: Tuple[int, int, int, int]  # permutation of BRIGHTNESS, CONTRAST, SATURATION, HUE
    brightness: Optional[float]         # ColorJitter factors (None: op disabled)
    contrast: Optional[float]
    saturation: Optional[float]
    hue: Optional[float]                # hue shift in [-0.5, 0.5]
    translate: Tuple[int, int]          # RandomAffine (tx, ty) pixels
    shear: Tuple[float, float]          # RandomAffine (x, y) shear, degrees
    sigma: float                        # GaussianBlur sigma
    grayscale: bool                     # RandomGrayscale
    erase: Optional[Box]                # RandomErasing box on the SxS output, None = no erase


# ---------------------------------------------------------------------------------------------
# parameter sampling (torchvision's get_params, on an explicit numpy Generator)
# ---------------------------------------------------------------------------------------------

def rrc_params(rng: np.random.Generator, height: int, width: int,
               scale: Sequence[float], ratio: Sequence[float]) -> Box:
    """RandomResizedCrop.get_params: 10 tries of (area share, log-uniform aspect w/h), then
    the fallback centre crop clamped to the ratio range."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def erasing_params(rng: np.random.Generator, height: int, width: int,
                   scale: Sequence[float], ratio: Sequence[float]) -> Optional[Box]:
    """RandomErasing.get_params (given that erasing happens): 10 tries of (area share,
    log-uniform aspect h/w) with the box strictly smaller than the image; None if none fit."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        erase_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        h = int(round(math.sqrt(erase_area * aspect)))
        w = int(round(math.sqrt(erase_area / aspect)))
        if not (h < height and w < width):
            continue
        i = int(rng.integers(0, height - h + 1))
        j = int(rng.integers(0, width - w + 1))
        return i, j, h, w
    return None


def _factor(rng: np.random.Generator, amount: float) -> Optional[float]:
    if amount == 0:
        return None
    return float(rng.uniform(max(0.0, 1.0 - amount), 1.0 + amount))


def sample_train_params(rng: np.random.Generator, height: int, width: int,
                        cfg: AugmentConfig) -> TrainParams:
    """All random draws for one image of size height x width (before any transform)."""
    if height < 1 or width < 1:
        raise ValueError(f'image must be at least 1x1, got {height}x{width}')
    s = cfg.image_size
    crop = rrc_params(rng, height, width, cfg.rrc_scale, cfg.rrc_ratio)
    flip = bool(rng.random() < cfg.hflip_prob)
    angle = float(rng.uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
    order = tuple(int(k) for k in rng.permutation(4))
    brightness = _factor(rng, cfg.brightness)
    contrast = _factor(rng, cfg.contrast)
    saturation = _factor(rng, cfg.saturation)
    hue = float(rng.uniform(-cfg.hue, cfg.hue)) if cfg.hue > 0 else None
    # RandomAffine.get_params on the SxS image: (degrees 0), translate, shear.
    max_dx, max_dy = cfg.translate[0] * s, cfg.translate[1] * s
    tx = int(round(rng.uniform(-max_dx, max_dx)))
    ty = int(round(rng.uniform(-max_dy, max_dy)))
    shear_x = float(rng.uniform(-cfg.shear_degrees, cfg.shear_degrees))
    sigma = float(rng.uniform(cfg.blur_sigma[0], cfg.blur_sigma[1]))
    gray = bool(rng.random() < cfg.grayscale_prob)
    erase = None
    if rng.random() < cfg.erasing_prob:
        erase = erasing_params(rng, s, s, cfg.erasing_scale, cfg.erasing_ratio)
    return TrainParams(crop=crop, flip=flip, angle=angle, jitter_order=order,
                       brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                       translate=(tx, ty), shear=(shear_x, 0.0), sigma=sigma, grayscale=gray,
                       erase=erase)


# ---------------------------------------------------------------------------------------------
# geometric ops (dtype-preserving)
# ---------------------------------------------------------------------------------------------

def _size2(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize(image: np.ndarray, size: Union[int, Sequence[int]]) -> np.ndarray:
    """Bilinear resize of a uint8 image to size (h, w) (an int: square), PIL's antialiased
    filter, as torchvision's Resize((h, w)) on a PIL image."""
    out_h, out_w = _size2(size)
    image = np.ascontiguousarray(image)
    if image.shape[:2] == (out_h, out_w):
        return image.copy()
    pil = Image.fromarray(image)
    return np.array(pil.resize((out_w, out_h), Image.Resampling.BILINEAR))


def resized_crop(image: np.ndarray, top: int, left: int, height: int, width: int,
                 size: Union[int, Sequence[int]]) -> np.ndarray:
    """F.resized_crop: crop rows top:top+height, cols left:left+width, then bilinear `resize`.
    The crop happens first, so the filter never reads pixels outside the box."""
    ih, iw = image.shape[:2]
    if not (0 <= top and 0 <= left and height > 0 and width > 0
            and top + height <= ih and left + width <= iw):
        raise ValueError(f'crop box {(top, left, height, width)} outside a {ih}x{iw} image')
    return resize(image[top:top + height, left:left + width], size)


def center_crop(image: np.ndarray, size: Union[int, Sequence[int]]) -> np.ndarray:
    """F.center_crop for a crop no larger than the image (offsets rounded as torchvision)."""
    ch, cw = _size2(size)
    ih, iw = image.shape[:2]
    if ch > ih or cw > iw:
        raise ValueError(f'centre crop {ch}x{cw} larger than the {ih}x{iw} image')
    top = int(round((ih - ch) / 2.0))
    left = int(round((iw - cw) / 2.0))
    return image[top:top + ch, left:left + cw]


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
    """torchvision Resize(size) with an int: shorter side -> size, longer int(size*long/short)."""
    ih, iw = image.shape[:2]
    if ih <= iw:
        out_h, out_w = size, int(size * iw / ih)
    else:
        out_h, out_w = int(size * ih / iw), size
    return resize(image, (out_h, out_w))


def hflip(image: np.ndarray) -> np.ndarray:
    """Mirror left-right (reverses the columns)."""
    return image[:, ::-1]


def inverse_affine_matrix(center: Sequence[float], angle: float, translate: Sequence[float],
                          scale: float, shear: Sequence[float]) -> Tuple[float, ...]:
    """torchvision's `_get_inverse_affine_matrix`: the 2x3 matrix mapping output to input
    coordinates of  T * C * R(angle) * S(scale) * SHy * SHx * C^-1  (angle clockwise, degrees)."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty)
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty)
    m[2] += cx
    m[5] += cy
    return tuple(m)


# The float stage runs channels-first (3, H, W) internally (`_*_chw`); public ops wrap it in HxWxC.

def _chw(image: np.ndarray) -> np.ndarray:
    return image.transpose(2, 0, 1)


def _hwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(1, 2, 0))


def _fix16(v: float) -> int:
    return math.floor(v * 65536.0 + 0.5)


def source_indices(matrix: Sequence[float], height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Integer source (x, y) of every output pixel of PIL's Image.transform(AFFINE, NEAREST):
    floor(M @ (x + .5, y + .5, 1)), evaluated as PIL does -- in 16.16 fixed point when the corners
    fit (always, for sane matrices), else in double precision. Out-of-range values mean `fill`."""
    a, b, c, d, e, f = (float(v) for v in matrix)
    xs = np.arange(width, dtype=np.int64)
    ys = np.arange(height, dtype=np.int64)[:, None]
    corners = [(0, 0), (width, height), (0, height), (width, 0)]
    if (not (b == 0 and d == 0)
            and all(abs(x * a + y * b + c) < 32768.0 and abs(x * d + y * e + f) < 32768.0
                    for x, y in corners)):
        sx = (_fix16(c + a * 0.5 + b * 0.5) + _fix16(b) * ys) + _fix16(a) * xs
        sy = (_fix16(f + d * 0.5 + e * 0.5) + _fix16(e) * ys) + _fix16(d) * xs
        return sx >> 16, sy >> 16
    xc, yc = xs + 0.5, ys + 0.5
    sx = np.floor(a * xc + (b * yc + c)).astype(np.int64)
    sy = np.floor(d * xc + (e * yc + f)).astype(np.int64)
    return sx, sy


def _warp_chw(x: np.ndarray, matrix: Sequence[float], fill: float) -> np.ndarray:
    c, h, w = x.shape
    sx, sy = source_indices(matrix, h, w)
    # anything outside the image reads a 1-pixel border of `fill`
    np.clip(sx, -1, w, out=sx)
    np.clip(sy, -1, h, out=sy)
    sy += 1
    sy *= w + 2
    sy += sx
    sy += 1
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=fill)
    return np.take(padded.reshape(c, -1), sy.ravel(), axis=1).reshape(c, h, w)


def _affine_chw(x: np.ndarray, angle: float, translate: Sequence[float], scale: float,
                shear: Sequence[float], fill: float) -> np.ndarray:
    _, h, w = x.shape
    if angle == 0 and scale == 1 and not any(translate) and not any(shear):
        return x.copy()
    return _warp_chw(x, inverse_affine_matrix((w * 0.5, h * 0.5), angle, translate, scale, shear),
                     fill)


def warp_nearest(image: np.ndarray, matrix: Sequence[float], fill: float = 0) -> np.ndarray:
    """Output pixel (x, y) takes input pixel floor(M @ (x + .5, y + .5, 1)) -- PIL's
    Image.transform(AFFINE, NEAREST) -- or `fill` where that falls outside. Same size, dtype."""
    return _hwc(_warp_chw(_chw(image), matrix, fill))


def affine(image: np.ndarray, angle: float = 0.0, translate: Sequence[float] = (0, 0),
           scale: float = 1.0, shear: Sequence[float] = (0.0, 0.0), fill: float = 0) -> np.ndarray:
    """F.affine on a PIL image: centre (w/2, h/2), angle CLOCKWISE in degrees, translate in
    pixels (x right, y down), shear (x, y) in degrees, nearest neighbour, fill, same size."""
    return _hwc(_affine_chw(_chw(image), angle, translate, scale, shear, fill))


def rotation_matrix(angle: float, height: int, width: int) -> Tuple[float, ...]:
    """PIL Image.rotate's inverse matrix (expand=False, centre (w/2, h/2)), angle CCW degrees."""
    rad = -math.radians(angle % 360.0)
    cos, sin = round(math.cos(rad), 15), round(math.sin(rad), 15)
    cx, cy = width / 2, height / 2
    return (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


def _rotate_chw(x: np.ndarray, angle: float, fill: float) -> np.ndarray:
    if angle % 360.0 == 0:
        return x.copy()
    return _warp_chw(x, rotation_matrix(angle, x.shape[1], x.shape[2]), fill)


def rotate(image: np.ndarray, angle: float, fill: float = 0) -> np.ndarray:
    """F.rotate on a PIL image (= PIL Image.rotate, expand=False, centre, NEAREST, fill):
    angle in degrees COUNTER-clockwise."""
    return _hwc(_rotate_chw(_chw(image), angle, fill))


def _erase_chw(x: np.ndarray, box: Box, value: Union[float, Sequence[float]]) -> np.ndarray:
    top, left, h, w = box
    out = x.copy()
    v = np.asarray(value, dtype=x.dtype)
    out[:, top:top + h, left:left + w] = v.reshape(-1, 1, 1) if v.ndim else v
    return out


def erase(image: np.ndarray, box: Box, value: Union[float, Sequence[float]] = 0.0) -> np.ndarray:
    """F.erase: a copy with rows top:top+h, cols left:left+w set to value (scalar or per channel)."""
    top, left, h, w = box
    out = image.copy()
    out[top:top + h, left:left + w] = value
    return out


# ---------------------------------------------------------------------------------------------
# value ops (float32 in [0, 1] out)
# ---------------------------------------------------------------------------------------------

def to_float(image: np.ndarray) -> np.ndarray:
    """ToTensor's scaling: uint8 -> float32 / 255; float input is taken as already in [0, 1]."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) * np.float32(1 / 255)
    return np.asarray(image, dtype=np.float32)


def _gray_chw(x: np.ndarray) -> np.ndarray:
    r, g, b = GRAY_WEIGHTS
    return np.float32(r) * x[0] + np.float32(g) * x[1] + np.float32(b) * x[2]


def _blend(x: np.ndarray, other: Union[np.ndarray, float], factor: float) -> np.ndarray:
    out = np.float32(factor) * x
    if not (isinstance(other, float) and other == 0.0):
        out += np.float32(1.0 - factor) * other
    return np.clip(out, 0.0, 1.0, out=out)


def _grayscale_chw(x: np.ndarray) -> np.ndarray:
    return np.repeat(_gray_chw(x)[None], 3, axis=0)


def _brightness_chw(x: np.ndarray, factor: float) -> np.ndarray:
    return _blend(x, 0.0, factor)


def _contrast_chw(x: np.ndarray, factor: float) -> np.ndarray:
    return _blend(x, np.float32(_gray_chw(x).mean(dtype=np.float64)), factor)


def _saturation_chw(x: np.ndarray, factor: float) -> np.ndarray:
    return _blend(x, _gray_chw(x)[None], factor)


def _hue_chw(x: np.ndarray, hue_factor: float) -> np.ndarray:
    if not -0.5 <= hue_factor <= 0.5:
        raise ValueError(f'hue_factor must be in [-0.5, 0.5], got {hue_factor}')
    r, g, b = x[0], x[1], x[2]
    maxc = np.maximum(np.maximum(r, g), b)
    minc = np.minimum(np.minimum(r, g), b)
    delta = maxc - minc
    inv = np.float32(1.0) / (delta + (delta == 0))
    # hue in sextants: red 0, green 2, blue 4 (grays 0), as torchvision's _rgb2hsv
    h = np.where(maxc == r, (g - b) * inv,
                 np.where(maxc == g, (b - r) * inv + np.float32(2), (r - g) * inv + np.float32(4)))
    h += np.float32(6.0 * hue_factor)
    # hsv -> rgb, the compact form of _hsv2rgb's six-sector table: channel (R, G, B) with
    # n = (5, 3, 1) is v - delta * clip(min(k, 4 - k), 0, 1), k = (n + h) mod 6.
    out = np.empty_like(x)
    for ch, n in enumerate((5.0, 3.0, 1.0)):
        k = h + np.float32(n)
        k -= np.float32(6) * np.floor(k * np.float32(1 / 6))
        np.minimum(k, np.float32(4) - k, out=k)
        np.clip(k, 0.0, 1.0, out=k)
        np.subtract(maxc, delta * k, out=out[ch])
    return out


def to_grayscale(image: np.ndarray) -> np.ndarray:
    """RandomGrayscale's op: 3 identical channels of 0.299 R + 0.587 G + 0.114 B."""
    return _hwc(_grayscale_chw(_chw(to_float(image))))


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black: clip(factor * x, 0, 1)."""
    return _hwc(_brightness_chw(_chw(to_float(image)), factor))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean of the grayscale image: clip(f * x + (1 - f) * mean(gray(x)), 0, 1)."""
    return _hwc(_contrast_chw(_chw(to_float(image)), factor))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grayscale image: clip(f * x + (1 - f) * gray(x), 0, 1)."""
    return _hwc(_saturation_chw(_chw(to_float(image)), factor))


def adjust_hue(image: np.ndarray, hue_factor: float) -> np.ndarray:
    """Rotate the hue by hue_factor (a fraction of the circle, in [-0.5, 0.5]) through HSV, as
    torchvision's _rgb2hsv / (h + f) % 1 / _hsv2rgb; saturation and value are unchanged."""
    return _hwc(_hue_chw(_chw(to_float(image)), hue_factor))


def gaussian_kernel1d(kernel_size: int, sigma: float) -> np.ndarray:
    """torchvision's _get_gaussian_kernel1d: exp(-x^2 / 2 sigma^2) on linspace(-(k-1)/2, (k-1)/2),
    normalised to sum 1."""
    half = (kernel_size - 1) * 0.5
    x = np.linspace(-half, half, kernel_size)
    pdf = np.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).astype(np.float32)


def _blur_axis(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    """1-D convolution of x along axis with the symmetric kernel k, torch 'reflect' padding."""
    p = len(k) // 2
    n = x.shape[axis]
    at = lambda sl: (slice(None),) * axis + (sl,)
    if n <= p:
        # torch cannot reflect-pad this (it raises); mirror with the edge, or repeat a 1-px side.
        xp = np.pad(x, [(p, p) if a == axis else (0, 0) for a in range(x.ndim)],
                    mode='symmetric' if n > 1 else 'edge')
        out = k[0] * xp[at(slice(0, n))]
        for t in range(1, len(k)):
            out += k[t] * xp[at(slice(t, t + n))]
        return out
    out = x * k[p]
    for t in range(1, p + 1):
        wt = k[p - t]
        out[at(slice(t, None))] += wt * x[at(slice(None, n - t))]
        out[at(slice(None, n - t))] += wt * x[at(slice(t, None))]
        # reflected taps: i < t reads x[t - i]; i >= n - t reads x[2n - 2 - i - t]
        out[at(slice(None, t))] += wt * x[at(slice(t, 0, -1))]
        out[at(slice(n - t, None))] += wt * np.flip(x[at(slice(n - 1 - t, n - 1))], axis)
    return out


def _blur_chw(x: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    k = gaussian_kernel1d(kernel_size, sigma)
    if kernel_size == 1:
        return x * k[0]
    return _blur_axis(_blur_axis(x, k, 1), k, 2)


def gaussian_blur(image: np.ndarray, kernel_size: int, sigma: float) -> np.ndarray:
    """F.gaussian_blur with a square kernel and equal sigmas: separable, reflect padding."""
    return _hwc(_blur_chw(_chw(to_float(image)), kernel_size, sigma))


def _normalize_chw(x: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    m = np.asarray(mean, np.float32).reshape(-1, 1, 1)
    inv = (np.float32(1.0) / np.asarray(std, np.float32)).reshape(-1, 1, 1)
    return (x - m) * inv


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(x - mean) / std per channel, x = to_float(image) (so uint8 is (v/255 - mean) / std)."""
    return _hwc(_normalize_chw(_chw(to_float(image)), mean, std))


def denormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Inverse of `normalize` for display: x * std + mean clipped to [0, 1], channels last,
    any leading batch dims. (The seed un-normalised with mean 0.5 / std 0.5, which is wrong.)"""
    x = np.asarray(images, dtype=np.float32)
    out = x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


# ---------------------------------------------------------------------------------------------
# the composed transforms
# ---------------------------------------------------------------------------------------------

def _check_uint8(image: np.ndarray) -> np.ndarray:
    image = ensure_rgb(image)
    if image.dtype != np.uint8:
        raise ValueError(f'expected a uint8 image, got dtype {image.dtype}')
    return image


def _jitter_chw(x: np.ndarray, params: TrainParams) -> np.ndarray:
    for op in params.jitter_order:
        if op == BRIGHTNESS and params.brightness is not None:
            x = _brightness_chw(x, params.brightness)
        elif op == CONTRAST and params.contrast is not None:
            x = _contrast_chw(x, params.contrast)
        elif op == SATURATION and params.saturation is not None:
            x = _saturation_chw(x, params.saturation)
        elif op == HUE and params.hue is not None:
            x = _hue_chw(x, params.hue)
    return x


def color_jitter(image: np.ndarray, params: TrainParams) -> np.ndarray:
    """ColorJitter with the drawn factors in the drawn order (params.jitter_order); float32 out."""
    return _hwc(_jitter_chw(_chw(to_float(image)), params))


def apply_train_transform(image: np.ndarray, params: TrainParams, cfg: AugmentConfig) -> np.ndarray:
    """The seed's train pipeline with the given draws: uint8 HxWx3 -> float32 (S, S, 3)."""
    image = _check_uint8(image)
    x = resized_crop(image, *params.crop, size=cfg.image_size)          # uint8 (S, S, 3)
    if params.flip:
        x = hflip(x)
    x = np.ascontiguousarray(_chw(x)).astype(np.float32)                # (3, S, S)
    x *= np.float32(1 / 255)   # ToTensor's scaling, done early: the ops below are float ops
    x = _rotate_chw(x, params.angle, fill=0)
    x = _jitter_chw(x, params)
    x = _affine_chw(x, 0.0, params.translate, 1.0, params.shear, fill=0)
    x = _blur_chw(x, cfg.blur_kernel, params.sigma)
    if params.grayscale:
        x = _grayscale_chw(x)
    x = _normalize_chw(x, cfg.mean, cfg.std)
    if params.erase is not None:
        x = _erase_chw(x, params.erase, cfg.erasing_value)
    return _hwc(x)


def train_transform(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """sample_train_params + apply_train_transform."""
    image = _check_uint8(image)
    params = sample_train_params(rng, image.shape[0], image.shape[1], cfg)
    return apply_train_transform(image, params, cfg)


def eval_transform(image: np.ndarray, cfg: AugmentConfig) -> np.ndarray:
    """Deterministic eval: 'squash' = Resize((S, S)) (the seed); 'center_crop' = Resize(S) on the
    shorter side + CenterCrop(S). Then ToTensor + Normalize: float32 (S, S, 3)."""
    image = _check_uint8(image)
    s = cfg.image_size
    if cfg.eval_resize == 'squash':
        x = resize(image, s)
    else:
        x = center_crop(resize_shorter(image, s), s)
    return normalize(x, cfg.mean, cfg.std)
