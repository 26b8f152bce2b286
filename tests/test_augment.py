"""cars_jax.data.augment: each op against a hand-computed expectation on a tiny image, the
sampled parameter distributions, and the composed train/eval transforms."""
import colorsys
import dataclasses
import itertools
import math
import pickle
import types

import numpy as np
import pytest
from PIL import Image

from cars_jax.data import augment as A

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _cfg(**overrides):
    return dataclasses.replace(A.AugmentConfig(), **overrides)


def _rgb(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _identity_params(size, **overrides):
    """Draws under which every train op is the identity (sigma 0.1: kernel weights ~1e-22)."""
    p = A.TrainParams(crop=(0, 0, size, size), flip=False, angle=0.0, jitter_order=(0, 1, 2, 3),
                      brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, translate=(0, 0),
                      shear=(0.0, 0.0), sigma=0.1, grayscale=False, erase=None)
    return dataclasses.replace(p, **overrides)


# ---- config ------------------------------------------------------------------------------

def test_config_from_base_py():
    from configs import base
    cfg = A.AugmentConfig.from_config(base.get_config())
    assert cfg == A.AugmentConfig()                       # the defaults are the seed's values
    assert cfg.translate == (0.1, 0.1) and cfg.rrc_ratio == (3 / 4, 4 / 3)
    assert cfg.mean == MEAN and cfg.std == STD and cfg.eval_resize == 'squash'
    hash(cfg)                                             # frozen


def test_config_normalises_types_and_validates():
    ns = types.SimpleNamespace(**dataclasses.asdict(A.AugmentConfig()))
    ns.rrc_scale, ns.translate, ns.image_size = [0.5, 1], 0.2, 64.0
    cfg = A.AugmentConfig.from_config(ns)
    assert cfg.rrc_scale == (0.5, 1.0) and cfg.translate == (0.2, 0.2) and cfg.image_size == 64
    for bad in (dict(eval_resize='crop'), dict(blur_kernel=4), dict(hue=0.6), dict(std=(1, 0, 1)),
                dict(hflip_prob=1.5), dict(rrc_scale=(0.9, 0.1)), dict(image_size=0),
                dict(rrc_ratio=(0, 1)), dict(blur_sigma=(0.0, 1.0))):
        with pytest.raises(ValueError):
            _cfg(**bad)
    del ns.hue
    with pytest.raises(ValueError, match='hue'):
        A.AugmentConfig.from_config(ns)


# ---- geometric ops -----------------------------------------------------------------------

def test_hflip_reverses_columns():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    out = A.hflip(img)
    np.testing.assert_array_equal(out[:, 0], img[:, 2])
    np.testing.assert_array_equal(out[:, 2], img[:, 0])
    np.testing.assert_array_equal(out[:, 1], img[:, 1])


def test_resized_crop_box_and_bilinear_ramp():
    img = _rgb(np.random.default_rng(0), 12, 15)
    # output size = box size: exactly the box, rows top:top+h, cols left:left+w
    np.testing.assert_array_equal(A.resized_crop(img, 2, 3, 5, 7, (5, 7)), img[2:7, 3:10])
    # 2x downscale of a horizontal ramp v = 5x + 10: interior output column j averages input
    # columns around 2j + 0.5 (triangle filter, support 2 input px), i.e. the ramp there.
    ramp = np.broadcast_to((5 * np.arange(40) + 10).astype(np.uint8)[None, :, None], (40, 40, 3))
    out = A.resized_crop(np.ascontiguousarray(ramp), 0, 0, 40, 40, 20)
    assert out.shape == (20, 20, 3) and out.dtype == np.uint8
    j = np.arange(1, 19)
    np.testing.assert_allclose(out[5, 1:19, 0], 5 * (2 * j + 0.5) + 10, atol=1)
    assert (out == out[:1]).all()                         # no vertical change on a row-constant image
    with pytest.raises(ValueError):
        A.resized_crop(img, 10, 0, 5, 5, 4)


@pytest.mark.parametrize('n', [3, 4])
def test_rotate_90_is_rot90_counter_clockwise(n):
    img = np.arange(n * n * 3, dtype=np.uint8).reshape(n, n, 3)
    np.testing.assert_array_equal(A.rotate(img, 90), np.rot90(img, 1))     # CCW
    np.testing.assert_array_equal(A.rotate(img, -90), np.rot90(img, -1))
    np.testing.assert_array_equal(A.rotate(img, 180), np.rot90(img, 2))
    np.testing.assert_array_equal(A.rotate(img, 0), img)
    # the top-right pixel moves to the top-left under a positive (CCW) angle
    np.testing.assert_array_equal(A.rotate(img, 90)[0, 0], img[0, n - 1])


def test_rotate_45_fills_corners_with_zero():
    img = np.full((9, 9, 3), 200, np.uint8)
    out = A.rotate(img, 45)
    assert (out[0, 0] == 0).all() and (out[8, 8] == 0).all() and (out[4, 4] == 200).all()
    assert (A.rotate(img.astype(np.float32), 45) == out.astype(np.float32)).all()  # dtype-agnostic


def test_rotate_and_affine_match_pil_bit_for_bit():
    """torchvision's PIL path is Image.rotate / Image.transform(AFFINE, NEAREST, fillcolor 0)."""
    rng = np.random.default_rng(1)
    for trial in range(60):
        h, w = (int(v) for v in rng.integers(2, 40, 2))
        img = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)
        angle = float(rng.choice([90.0, -90.0, 180.0])) if trial % 4 == 0 else float(rng.uniform(-180, 180))
        pil = Image.fromarray(img).rotate(angle, Image.Resampling.NEAREST, expand=False,
                                          fillcolor=(0, 0, 0))
        np.testing.assert_array_equal(A.rotate(img, angle), np.asarray(pil))
        tx, ty = (int(v) for v in rng.integers(-4, 5, 2))
        shear = float(rng.uniform(-20, 20))
        m = A.inverse_affine_matrix((w * 0.5, h * 0.5), 0.0, (tx, ty), 1.0, (shear, 0.0))
        pil = Image.fromarray(img).transform((w, h), Image.Transform.AFFINE, m,
                                             Image.Resampling.NEAREST, fillcolor=(0, 0, 0))
        np.testing.assert_array_equal(A.affine(img, 0.0, (tx, ty), 1.0, (shear, 0.0)), np.asarray(pil))


def test_affine_translate_shear_and_clockwise_angle():
    img = np.arange(1, 4 * 5 * 3 + 1, dtype=np.uint8).reshape(4, 5, 3)
    out = A.affine(img, translate=(2, -1))                # 2 px right, 1 px up, zero fill
    expected = np.zeros_like(img)
    expected[:3, 2:] = img[1:, :3]
    np.testing.assert_array_equal(out, expected)
    # F.affine's angle is clockwise (F.rotate's counter-clockwise)
    sq = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    np.testing.assert_array_equal(A.affine(sq, angle=90), np.rot90(sq, -1))
    # x-shear: the inverse map is x_in = x + tan(s) * (y - cy), so rows shift in proportion to
    # their distance from the centre row and the centre row itself stays put
    wide = np.zeros((5, 11, 3), np.uint8)
    wide[:, 5] = 255                                       # a vertical line through the centre
    sheared = A.affine(wide, shear=(45.0, 0.0))
    cols = [int(np.flatnonzero(sheared[y, :, 0])[0]) for y in range(5)]
    assert cols == [7, 6, 5, 4, 3]                         # tan(45) = 1 px per row, top leans right


def test_inverse_affine_matrix_identity_and_translation():
    np.testing.assert_allclose(A.inverse_affine_matrix((4, 3), 0, (0, 0), 1, (0, 0)),
                               (1, 0, 0, 0, 1, 0), atol=1e-12)
    np.testing.assert_allclose(A.inverse_affine_matrix((4, 3), 0, (2, -1), 1, (0, 0)),
                               (1, 0, -2, 0, 1, 1), atol=1e-12)


def test_erase_zeroes_exactly_the_box():
    x = np.ones((6, 7, 3), np.float32)
    out = A.erase(x, (1, 2, 3, 4), 0.0)
    mask = np.zeros((6, 7), bool)
    mask[1:4, 2:6] = True
    assert (out[mask] == 0).all() and (out[~mask] == 1).all() and (x == 1).all()
    out = A.erase(x, (0, 0, 2, 2), (0.1, 0.2, 0.3))
    np.testing.assert_allclose(out[1, 1], [0.1, 0.2, 0.3])


# ---- value ops ---------------------------------------------------------------------------

def test_brightness_multiplies_and_clamps():
    img = np.array([[[0, 100, 200]]], np.uint8)
    np.testing.assert_allclose(A.adjust_brightness(img, 1.5), [[[0, 150 / 255, 1.0]]], atol=1e-6)
    np.testing.assert_allclose(A.adjust_brightness(img, 0.5), [[[0, 50 / 255, 100 / 255]]], atol=1e-6)


def test_contrast_blends_with_grayscale_mean():
    img = np.array([[[255, 0, 0], [0, 0, 0]]], np.uint8)  # gray values 0.299 and 0 -> mean 0.1495
    m = 0.1495
    expected = np.array([[[0.5 + 0.5 * m, 0.5 * m, 0.5 * m], [0.5 * m] * 3]])
    np.testing.assert_allclose(A.adjust_contrast(img, 0.5), expected, atol=1e-6)
    np.testing.assert_allclose(A.adjust_contrast(img, 0.0), np.full((1, 2, 3), m), atol=1e-6)
    np.testing.assert_allclose(A.adjust_contrast(img, 3.0)[0, 0], [1, 0, 0], atol=1e-6)  # clamped


def test_saturation_zero_is_grayscale_one_is_identity():
    img = _rgb(np.random.default_rng(2), 5, 4)
    np.testing.assert_allclose(A.adjust_saturation(img, 0.0), A.to_grayscale(img), atol=1e-6)
    np.testing.assert_allclose(A.adjust_saturation(img, 1.0), img / 255, atol=1e-6)


def test_hue_identity_red_to_cyan_and_colorsys():
    img = _rgb(np.random.default_rng(3), 6, 5)
    np.testing.assert_allclose(A.adjust_hue(img, 0.0), img / 255, atol=1e-6)
    red = np.array([[[255, 0, 0]]], np.uint8)
    np.testing.assert_allclose(A.adjust_hue(red, 0.5), [[[0, 1, 1]]], atol=1e-6)
    np.testing.assert_allclose(A.adjust_hue(red, -0.5), [[[0, 1, 1]]], atol=1e-6)
    np.testing.assert_allclose(A.adjust_hue(red, 1 / 3), [[[0, 1, 0]]], atol=1e-6)  # red -> green
    for f in (0.1, -0.37):
        ref = np.empty(img.shape)
        for y, x in itertools.product(range(6), range(5)):
            h, s, v = colorsys.rgb_to_hsv(*(img[y, x] / 255))
            ref[y, x] = colorsys.hsv_to_rgb((h + f) % 1.0, s, v)
        np.testing.assert_allclose(A.adjust_hue(img, f), ref, atol=1e-5)
    with pytest.raises(ValueError):
        A.adjust_hue(img, 0.6)


def test_gaussian_blur_of_a_delta_is_the_kernel():
    sigma = 0.8
    k = np.exp(-0.5 * (np.array([-1.0, 0.0, 1.0]) / sigma) ** 2)
    k /= k.sum()
    np.testing.assert_allclose(A.gaussian_kernel1d(3, sigma), k, rtol=1e-6)
    img = np.zeros((5, 5, 3), np.uint8)
    img[2, 2] = 255
    out = A.gaussian_blur(img, 3, sigma)
    expected = np.zeros((5, 5))
    expected[1:4, 1:4] = np.outer(k, k)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], expected, atol=1e-6)
    # reflect padding (edge pixel not repeated): a delta in the corner keeps k1^2 there
    img = np.zeros((4, 4, 3), np.uint8)
    img[0, 0] = 255
    out = A.gaussian_blur(img, 3, sigma)[..., 0]
    np.testing.assert_allclose(out[:2, :2], [[k[1] ** 2, k[0] * k[1]], [k[0] * k[1], k[0] ** 2]],
                               atol=1e-6)
    flat = np.full((3, 8, 3), 77, np.uint8)
    np.testing.assert_allclose(A.gaussian_blur(flat, 5, 2.0), 77 / 255, atol=1e-6)


def test_grayscale_weights_and_three_channels():
    img = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    out = A.to_grayscale(img)
    assert out.shape == (1, 4, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0], [0.299, 0.587, 0.114, 1.0], atol=1e-6)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_normalize_and_denormalize():
    img = _rgb(np.random.default_rng(4), 3, 2)
    out = A.normalize(img, MEAN, STD)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (img / 255 - np.array(MEAN)) / np.array(STD), atol=1e-5)
    np.testing.assert_allclose(A.denormalize(out[None], MEAN, STD)[0], img / 255, atol=1e-6)
    assert A.denormalize(np.full((1, 1, 3), 100.0), MEAN, STD).max() == 1.0  # clipped for display


# ---- parameter sampling ------------------------------------------------------------------

@pytest.mark.parametrize('height,width,scale', [(600, 800, (0.8, 1.0)), (700, 700, (0.08, 1.0))])
def test_rrc_params_area_and_aspect_within_range(height, width, scale):
    rng = np.random.default_rng(5)
    area = height * width
    shares, aspects = [], []
    for _ in range(2000):
        i, j, h, w = A.rrc_params(rng, height, width, scale, (3 / 4, 4 / 3))
        assert 0 <= i and 0 <= j and i + h <= height and j + w <= width
        # w, h are sqrt(area * aspect), sqrt(area / aspect) rounded to whole pixels (+-0.5)
        assert (w + 0.5) * (h + 0.5) >= scale[0] * area and (w - 0.5) * (h - 0.5) <= scale[1] * area
        assert (w + 0.5) / (h - 0.5) >= 3 / 4 and (w - 0.5) / (h + 0.5) <= 4 / 3
        shares.append(h * w / area)
        aspects.append(w / h)
    shares, aspects = np.array(shares), np.array(aspects)
    if scale[0] < 0.5:   # small crops can take any aspect in the range, and spread over the area
        assert aspects.min() < 0.76 and aspects.max() > 1.32 and shares.mean() < 0.6
    else:                # >= 80% of a 4:3 image: at least 640 px wide, so w/h >= 640/600
        assert aspects.min() > 1.06 and shares.mean() > 0.85


def test_rrc_params_fallback_centre_crop():
    # a 10x200 strip fits no crop of >= 80% area with aspect <= 4/3: centre crop at ratio 4/3
    assert A.rrc_params(np.random.default_rng(0), 10, 200, (0.8, 1.0), (3 / 4, 4 / 3)) == (0, 93, 10, 13)
    assert A.rrc_params(np.random.default_rng(0), 200, 10, (0.8, 1.0), (3 / 4, 4 / 3)) == (93, 0, 13, 10)


def test_erasing_params():
    rng = np.random.default_rng(6)
    for _ in range(500):
        box = A.erasing_params(rng, 224, 224, (0.02, 0.33), (0.3, 3.3))
        if box is None:
            continue
        i, j, h, w = box
        assert h < 224 and w < 224 and i + h <= 224 and j + w <= 224
        assert 0.02 - 0.003 < h * w / 224 ** 2 < 0.33 + 0.003
        assert 0.3 * 0.95 < h / w < 3.3 * 1.05
    # nothing of >= 90% area fits strictly inside a 2x2 image: torchvision then erases nothing
    assert A.erasing_params(rng, 2, 2, (0.9, 1.0), (0.3, 3.3)) is None


def test_sampled_distributions():
    cfg = A.AugmentConfig()
    rng = np.random.default_rng(7)
    n = 4000
    ps = [A.sample_train_params(rng, 375, 500, cfg) for _ in range(n)]
    tol = lambda p: 5 * math.sqrt(p * (1 - p) / n)       # 5 sigma
    angles = np.array([p.angle for p in ps])
    assert angles.min() >= -15 and angles.max() <= 15
    assert abs(angles.mean()) < 5 * 15 / math.sqrt(3 * n)
    assert np.allclose(np.quantile(angles, [0.25, 0.5, 0.75]), [-7.5, 0, 7.5], atol=1.0)
    assert abs(np.mean([p.flip for p in ps]) - 0.5) < tol(0.5)
    assert abs(np.mean([p.grayscale for p in ps]) - 0.1) < tol(0.1)
    assert abs(np.mean([p.erase is not None for p in ps]) - 0.3) < tol(0.3)
    for name, lo, hi in [('brightness', 0.8, 1.2), ('contrast', 0.8, 1.2),
                         ('saturation', 0.8, 1.2), ('hue', -0.1, 0.1), ('sigma', 0.1, 2.0)]:
        v = np.array([getattr(p, name) for p in ps])
        assert v.min() >= lo and v.max() <= hi and abs(v.mean() - (lo + hi) / 2) < 0.05 * (hi - lo)
    tx = np.array([p.translate for p in ps])
    assert np.abs(tx).max() <= 22 and np.abs(tx).max() >= 20 and tx.dtype.kind == 'i'
    shear = np.array([p.shear for p in ps])
    assert np.abs(shear[:, 0]).max() <= 10 and (shear[:, 1] == 0).all()
    orders = {p.jitter_order for p in ps}
    assert len(orders) == 24 and all(sorted(o) == [0, 1, 2, 3] for o in orders)


def test_zero_strength_disables_ops():
    cfg = _cfg(brightness=0, contrast=0, saturation=0, hue=0, rotation_degrees=0, shear_degrees=0,
               translate=0, hflip_prob=0, grayscale_prob=0, erasing_prob=0)
    p = A.sample_train_params(np.random.default_rng(0), 30, 40, cfg)
    assert (p.brightness, p.contrast, p.saturation, p.hue) == (None,) * 4
    assert p.angle == 0 and p.translate == (0, 0) and p.shear == (0.0, 0.0)
    assert not p.flip and not p.grayscale and p.erase is None


# ---- composed transforms -----------------------------------------------------------------

def test_identity_params_give_just_normalize():
    cfg = _cfg(image_size=16)
    img = _rgb(np.random.default_rng(8), 16, 16)
    out = A.apply_train_transform(img, _identity_params(16), cfg)
    np.testing.assert_allclose(out, A.normalize(img, MEAN, STD), atol=1e-5)
    # each drawn op then acts as its own function, in the pipeline's order
    p = _identity_params(16, flip=True, angle=30.0, erase=(1, 2, 3, 4))
    expected = A.erase(A.normalize(A.rotate(A.hflip(img), 30.0), MEAN, STD), (1, 2, 3, 4), 0.0)
    np.testing.assert_allclose(A.apply_train_transform(img, p, cfg), expected, atol=1e-5)
    p = _identity_params(16, grayscale=True, brightness=1.1, contrast=0.9, jitter_order=(1, 0, 2, 3))
    expected = A.normalize(A.to_grayscale(A.adjust_brightness(A.adjust_contrast(img, 0.9), 1.1)),
                           MEAN, STD)
    np.testing.assert_allclose(A.apply_train_transform(img, p, cfg), expected, atol=1e-5)


def test_train_transform_deterministic_per_seed():
    cfg = _cfg(image_size=32)
    img = _rgb(np.random.default_rng(9), 40, 50)
    a = A.train_transform(img, np.random.default_rng(123), cfg)
    b = A.train_transform(img, np.random.default_rng(123), cfg)
    c = A.train_transform(img, np.random.default_rng(124), cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    params = A.sample_train_params(np.random.default_rng(123), 40, 50, cfg)
    np.testing.assert_array_equal(A.apply_train_transform(img, params, cfg), a)
    # everything a grain worker needs pickles
    f, cfg2, params2 = pickle.loads(pickle.dumps((A.train_transform, cfg, params)))
    assert cfg2 == cfg and params2 == params and f is A.train_transform


@pytest.mark.parametrize('shape', [(20, 13, 3), (13, 20, 3), (1, 1, 3), (20, 13), (20, 13, 1)])
def test_output_shape_dtype_tiny_and_gray_inputs(shape):
    cfg = _cfg(image_size=24)
    rng = np.random.default_rng(10)
    img = rng.integers(0, 256, shape, dtype=np.uint8)
    for _ in range(5):
        out = A.train_transform(img, rng, cfg)
        assert out.shape == (24, 24, 3) and out.dtype == np.float32 and np.isfinite(out).all()
    for mode in A.EVAL_RESIZE_MODES:
        out = A.eval_transform(img, _cfg(image_size=24, eval_resize=mode))
        assert out.shape == (24, 24, 3) and out.dtype == np.float32
    if len(shape) == 2 or shape[2] == 1:   # a gray image comes out with 3 identical channels
        gray = A.denormalize(A.eval_transform(img, _cfg(image_size=24)), MEAN, STD)
        np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-5)


def test_bad_inputs_raise():
    cfg = A.AugmentConfig()
    with pytest.raises(ValueError):
        A.train_transform(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0), cfg)
    with pytest.raises(ValueError):
        A.eval_transform(np.zeros((8, 8, 4), np.uint8), cfg)


def test_eval_squash_hand_checked_pixels():
    # 2x2 with columns 0 and 200 -> 4x4 bilinear: output column centres sit at input x =
    # -0.25, 0.25, 0.75, 1.25 (clamped at the border) -> 0, 50, 150, 200
    img = np.zeros((2, 2, 3), np.uint8)
    img[:, 1] = 200
    out = A.eval_transform(img, _cfg(image_size=4))
    cols = np.array([0, 50, 150, 200]) / 255
    expected = (cols[None, :, None] - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected, (4, 4, 3)), atol=1e-5)


def test_eval_center_crop_vs_squash():
    # 4x8, shorter side already 4: Resize(4) keeps it, CenterCrop(4) takes columns 2..5
    img = np.broadcast_to((np.arange(8) * 30).astype(np.uint8)[None, :, None], (4, 8, 3)).copy()
    crop = A.denormalize(A.eval_transform(img, _cfg(image_size=4, eval_resize='center_crop')), MEAN, STD)
    np.testing.assert_allclose(crop[0, :, 0] * 255, [60, 90, 120, 150], atol=1e-3)
    squash = A.denormalize(A.eval_transform(img, _cfg(image_size=4)), MEAN, STD)
    assert squash[0, 0, 0] * 255 < 30 and squash[0, 3, 0] * 255 > 180   # keeps both ends
    # a larger non-square image: shorter side -> S then the centre; both give (S, S, 3)
    big = _rgb(np.random.default_rng(11), 30, 50)
    assert A.eval_transform(big, _cfg(image_size=16, eval_resize='center_crop')).shape == (16, 16, 3)
    assert A.resize_shorter(big, 16).shape == (16, 26, 3)
