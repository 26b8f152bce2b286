"""cars_jax.data.device_augment: the batched jax train transform against the CPU reference
(cars_jax.data.augment) on the same draws, its samplers' distributions against the CPU
sampler's, exact geometric conventions, and the identities of every disabled op.

Tolerances are in [0, 1] pixel units (normalised differences times std). The baseline
difference of the two paths with every op off is the cache's extra resize (original 48x64 ->
PIL antialiased 40x40 cache -> plain bilinear 32x32, vs PIL antialiased 48x64 -> 32x32 with a
uint8 rounding): median ~0.0015, max ~2/255 on the smooth test image. NEAREST (CPU) vs bilinear
(device) warps add up to ~half a pixel times the image's gradient (<= ~0.03 per px here), and
the fill-mask edges of a composed rotation + translate/shear differ by a fraction of a pixel,
which flips a few edge pixels between content and 0 (counted separately)."""
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cars_jax.data import augment as A
from cars_jax.data import device_augment as D

H, W, C, S = 48, 64, 40, 32          # original size, cache size, output size
STD = np.asarray(A.AugmentConfig().std, np.float32)

# every op off: full-image crop (ratio = the image's 4/3), no flip/rotation/jitter/affine,
# 1-tap blur, no grayscale / erasing
OFF = A.AugmentConfig(image_size=S, rrc_scale=(1.0, 1.0), rrc_ratio=(4 / 3, 4 / 3),
                      hflip_prob=0.0, rotation_degrees=0.0, brightness=0.0, contrast=0.0,
                      saturation=0.0, hue=0.0, translate=(0.0, 0.0), shear_degrees=0.0,
                      blur_kernel=1, grayscale_prob=0.0, erasing_prob=0.0)


def _smooth(h, w):
    """Low-frequency colour image (max gradient ~0.03 per pixel in [0, 1] units)."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w], float)[:, None, None]
    r = 128 + 90 * np.sin(2 * np.pi * (0.8 * x + 0.3 * y))
    g = 128 + 80 * np.cos(2 * np.pi * (0.5 * x - 0.7 * y) + 1)
    b = 128 + 70 * np.sin(2 * np.pi * 1.1 * y + 0.5) * np.cos(np.pi * x)
    return np.clip(np.stack([r, g, b], -1), 0, 255).round().astype(np.uint8)


IMG = _smooth(H, W)
CACHE = A.resize(IMG, C)


def _batch(n):
    return jnp.asarray(np.stack([CACHE] * n)), np.tile([[H, W]], (n, 1))


def _plain_resize_normalized(cache, cfg):
    """Independent reference of the identity: jax.image.resize (bilinear, no antialias) of the
    cache to S x S, then Normalize."""
    x = jax.image.resize(jnp.asarray(cache, jnp.float32) / 255.0, (cache.shape[0], S, S, 3),
                         'bilinear', antialias=False)
    return (np.asarray(x) - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)


# ---- same draws, same image --------------------------------------------------------------

OPS = {
    'none': {},
    'crop': dict(rrc_scale=(0.5, 1.0), rrc_ratio=(3 / 4, 4 / 3)),
    'flip': dict(hflip_prob=1.0),
    'rotation': dict(rotation_degrees=15.0),
    'brightness': dict(brightness=0.2),
    'contrast': dict(contrast=0.5),
    'saturation': dict(saturation=0.5),
    'hue': dict(hue=0.1),
    'affine': dict(translate=(0.1, 0.1), shear_degrees=10.0),
    'blur': dict(blur_kernel=3),
    'grayscale': dict(grayscale_prob=1.0),
    'erasing': dict(erasing_prob=1.0),
    # contrast's mean over the rotated image with black corners, before translate/shear
    'rot_contrast_affine': dict(rotation_degrees=15.0, contrast=0.5, translate=(0.1, 0.1),
                                shear_degrees=10.0),
    'all': {f.name: getattr(A.AugmentConfig(image_size=S), f.name)
            for f in dataclasses.fields(A.AugmentConfig)},
}
GEOMETRIC = ('rotation', 'affine', 'rot_contrast_affine', 'all')


@pytest.mark.parametrize('name', list(OPS))
def test_same_draws_give_the_cpu_image(name):
    cfg = dataclasses.replace(OFF, **OPS[name])
    rng = np.random.default_rng(1)
    n = 8
    draws = [A.sample_train_params(rng, H, W, cfg) for _ in range(n)]
    images, hw = _batch(n)
    out = np.asarray(D.augment_batch(images, D.params_from_train_params(draws, hw), cfg))
    ref = np.stack([A.apply_train_transform(IMG, p, cfg) for p in draws])
    diff = (np.abs(out - ref) * STD).reshape(n, -1)          # [0, 1] pixel units
    median = np.median(diff, axis=1).max()
    p95 = np.percentile(diff, 95, axis=1).max()
    flipped = (diff > 0.1).mean(axis=1).max()                # content vs fill at mask edges
    if name in GEOMETRIC:
        # nearest vs bilinear: <= ~0.7 px x 0.03 / px, times up to 1.5 where contrast (0.5)
        # stretches differences; mask edges flip a few % of pixels (composed warps)
        assert median < 0.015 and p95 < (0.04 if name in ('rotation', 'affine') else 0.08), \
            (median, p95)
        assert flipped < (0.005 if name in ('rotation', 'affine') else 0.05), flipped
    else:
        # only the cache's extra resize: median ~1.5e-3, max ~2/255
        assert median < 0.004 and p95 < 0.012 and diff.max() < 0.03, (median, p95, diff.max())
    if name == 'erasing':   # the same boxes, exactly erasing_value (0) in normalised space
        boxes = np.zeros_like(out[..., 0], bool)
        for k, p in enumerate(draws):
            if p.erase is not None:
                t, l, h, w = p.erase
                boxes[k, t:t + h, l:l + w] = True
        assert boxes.any()
        assert (out[boxes] == 0).all() and (ref[boxes] == 0).all()


def test_exact_geometry_conventions():
    """Crops, flips, 90-degree rotations and integer translations map pixel centres onto pixel
    centres, so the bilinear device path must equal the CPU's NEAREST path exactly (cache = the
    original, so no resize is involved)."""
    img = np.random.default_rng(0).integers(1, 256, (40, 40, 3), dtype=np.uint8)
    cfg = dataclasses.replace(OFF, rotation_degrees=90.0, translate=(0.2, 0.2))
    base = A.TrainParams(crop=(3, 5, S, S), flip=False, angle=0.0, jitter_order=(0, 1, 2, 3),
                         brightness=None, contrast=None, saturation=None, hue=None,
                         translate=(0, 0), shear=(0.0, 0.0), sigma=1.0, grayscale=False, erase=None)
    draws = [base, dataclasses.replace(base, flip=True), dataclasses.replace(base, angle=90.0),
             dataclasses.replace(base, angle=-90.0, flip=True),
             dataclasses.replace(base, translate=(3, -2)),
             dataclasses.replace(base, crop=(8, 0, S, S), angle=180.0, translate=(-4, 5))]
    hw = np.tile([[40, 40]], (len(draws), 1))
    out = np.asarray(D.augment_batch(jnp.asarray(np.stack([img] * len(draws))),
                                     D.params_from_train_params(draws, hw), cfg))
    ref = np.stack([A.apply_train_transform(img, p, cfg) for p in draws])
    np.testing.assert_allclose(out, ref, atol=1e-4)
    np.testing.assert_array_equal(out[4][:2, :] , ref[4][:2, :])        # zero-filled rows agree
    crop = img[3:3 + S, 5:5 + S].astype(np.float32) / 255
    np.testing.assert_allclose(out[1] * STD + A.AugmentConfig().mean, crop[:, ::-1], atol=1e-5)


def test_geometry_matrices_match_cpu_matrices():
    rng = np.random.default_rng(2)
    draws = [A.sample_train_params(rng, H, W, A.AugmentConfig(image_size=S)) for _ in range(5)]
    affine, rotation, _ = D.geometry_matrices(D.params_from_train_params(draws, [(H, W)] * 5),
                                              S, (C, C))
    for k, p in enumerate(draws):
        want_r = A.rotation_matrix(p.angle, S, S)
        want_a = A.inverse_affine_matrix((S / 2, S / 2), 0.0, p.translate, 1.0, p.shear)
        np.testing.assert_allclose(np.asarray(rotation[k, :2]).ravel(), want_r, atol=2e-5)
        np.testing.assert_allclose(np.asarray(affine[k, :2]).ravel(), want_a, atol=2e-5)


# ---- value ops against the CPU ops on the same float data ---------------------------------

def test_color_jitter_matches_cpu_in_every_order():
    rng = np.random.default_rng(3)
    cfg = A.AugmentConfig(image_size=8, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)
    orders = list(itertools.permutations(range(4)))[::3]               # 8 of the 24 orders
    x = rng.random((len(orders), 8, 8, 3)).astype(np.float32)
    draws = [dataclasses.replace(A.sample_train_params(rng, 8, 8, cfg), jitter_order=o)
             for o in orders]
    params = D.params_from_train_params(draws, [(8, 8)] * len(orders))
    out = np.asarray(D.color_jitter(jnp.asarray(x.reshape(len(orders), 64, 3)), params, cfg))
    ref = np.stack([A.color_jitter(x[k], p) for k, p in enumerate(draws)]).reshape(out.shape)
    np.testing.assert_allclose(out, ref, atol=3e-6)
    assert np.abs(out - x.reshape(out.shape)).max() > 0.05                   # it did something


@pytest.mark.parametrize('kernel', [3, 5])
def test_gaussian_blur_matches_cpu(kernel):
    rng = np.random.default_rng(4)
    x = rng.random((3, 7, 9, 3)).astype(np.float32)
    sigmas = np.asarray([0.1, 0.8, 2.0], np.float32)
    out = np.asarray(D.gaussian_blur(jnp.asarray(x), kernel, jnp.asarray(sigmas)))
    ref = np.stack([A.gaussian_blur(x[k], kernel, float(s)) for k, s in enumerate(sigmas)])
    np.testing.assert_allclose(out, ref, atol=2e-6)
    np.testing.assert_allclose(np.asarray(D.gaussian_kernels(kernel, jnp.asarray(sigmas))),
                               np.stack([A.gaussian_kernel1d(kernel, float(s)) for s in sigmas]),
                               atol=1e-6)


def test_erasing_per_channel_value_matches_cpu():
    cfg = dataclasses.replace(OFF, erasing_prob=1.0, erasing_value=(0.5, -1.0, 2.0))
    draws = [A.TrainParams(crop=(0, 0, H, W), flip=False, angle=0.0, jitter_order=(0, 1, 2, 3),
                           brightness=None, contrast=None, saturation=None, hue=None,
                           translate=(0, 0), shear=(0.0, 0.0), sigma=1.0, grayscale=False,
                           erase=box) for box in [(2, 3, 10, 5), None]]
    images, hw = _batch(2)
    out = np.asarray(D.augment_batch(images, D.params_from_train_params(draws, hw), cfg))
    ref = np.stack([A.apply_train_transform(IMG, p, cfg) for p in draws])
    np.testing.assert_array_equal(out[0, 2:12, 3:8], ref[0, 2:12, 3:8])
    np.testing.assert_array_equal(out[0, 2:12, 3:8], np.broadcast_to([0.5, -1.0, 2.0], (10, 5, 3)))
    assert not (out[1] == 2.0).any()
    np.testing.assert_allclose(np.delete(out[0], range(2, 12), 0), np.delete(ref[0], range(2, 12), 0),
                               atol=0.03 / STD.min())


# ---- identities --------------------------------------------------------------------------

IDENTITY = {   # op enabled in cfg, draws at that op's identity value
    'all_off': ({}, {}),
    'crop': (dict(rrc_scale=(0.5, 1.0)), {}),
    'flip': (dict(hflip_prob=0.5), dict(flip=False)),
    'rotation': (dict(rotation_degrees=15.0), dict(angle=0.0)),
    'brightness': (dict(brightness=0.2), dict(brightness=1.0)),
    'contrast': (dict(contrast=0.2), dict(contrast=1.0)),
    'contrast_grid': (dict(contrast=0.2, translate=(0.1, 0.1)), dict(contrast=1.0)),
    'saturation': (dict(saturation=0.2), dict(saturation=1.0)),
    'hue': (dict(hue=0.1), dict(hue=0.0)),
    'affine': (dict(translate=(0.1, 0.1), shear_degrees=10.0), {}),
    'blur': (dict(blur_kernel=3), dict(sigma=0.1)),           # side taps exp(-50) ~ 2e-22
    'grayscale': (dict(grayscale_prob=0.5), dict(grayscale=False)),
    'erasing': (dict(erasing_prob=0.5), dict(erase=None)),
}


@pytest.mark.parametrize('name', list(IDENTITY))
def test_identity_draw_is_plain_resize_and_normalize(name):
    overrides, draw = IDENTITY[name]
    cfg = dataclasses.replace(OFF, **overrides)
    p = A.TrainParams(crop=(0, 0, H, W), flip=False, angle=0.0, jitter_order=(3, 1, 0, 2),
                      brightness=None, contrast=None, saturation=None, hue=None, translate=(0, 0),
                      shear=(0.0, 0.0), sigma=1.0, grayscale=False, erase=None)
    params = D.params_from_train_params([dataclasses.replace(p, **draw)] * 2, [(H, W)] * 2)
    images, _ = _batch(2)
    out = np.asarray(D.augment_batch(images, params, cfg))
    np.testing.assert_allclose(out, _plain_resize_normalized(np.asarray(images), cfg), atol=2e-5)


def test_all_off_sampled_draws_are_the_identity():
    images, hw = _batch(3)
    params = D.sample_device_params(jax.random.key(5), hw, OFF)
    np.testing.assert_array_equal(np.asarray(params.crop), [[0, 0, H, W]] * 3)
    out = np.asarray(D.augment_batch(images, params, OFF))
    np.testing.assert_allclose(out, _plain_resize_normalized(np.asarray(images), OFF), atol=2e-5)


# ---- API: jit, shapes, determinism, conversion -------------------------------------------

def test_shapes_jit_and_determinism():
    cfg = A.AugmentConfig(image_size=S)
    images, hw = _batch(4)

    @jax.jit
    def step(key, images, hw):       # as a train step would: draws and augmentation in one jit
        p = D.sample_device_params(key, hw, cfg)
        return D.augment_batch(images, p, cfg), p

    a, p = step(jax.random.key(0), images, hw)
    assert a.shape == (4, S, S, 3) and a.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a), np.asarray(step(jax.random.key(0), images, hw)[0]))
    assert not np.array_equal(np.asarray(a), np.asarray(step(jax.random.key(1), images, hw)[0]))
    assert np.isfinite(np.asarray(a)).all()
    for field, shape in dict(crop=(4, 4), flip=(4,), jitter_order=(4, 4), translate=(4, 2),
                             erase_box=(4, 4), sigma=(4,)).items():
        assert getattr(p, field).shape == shape, field
    np.testing.assert_array_equal(np.sort(np.asarray(p.jitter_order), 1), [[0, 1, 2, 3]] * 4)
    # float input in [0, 1] is taken as is
    b = D.augment_batch(images.astype(jnp.float32) / 255, p, cfg)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)


def test_params_from_train_params_fields():
    cfg = dataclasses.replace(A.AugmentConfig(image_size=S), brightness=0.0, erasing_prob=1.0)
    draws = [A.sample_train_params(np.random.default_rng(k), H, W, cfg) for k in range(3)]
    p = D.params_from_train_params(draws, [(H, W)] * 3)
    np.testing.assert_array_equal(np.asarray(p.crop), [d.crop for d in draws])
    np.testing.assert_array_equal(np.asarray(p.brightness), 1.0)         # disabled -> identity
    np.testing.assert_allclose(np.asarray(p.hue), [d.hue for d in draws], rtol=1e-6)
    assert np.asarray(p.erase).tolist() == [d.erase is not None for d in draws]
    with pytest.raises(ValueError):
        D.params_from_train_params(draws, [(H, W)] * 2)


# ---- distributions -----------------------------------------------------------------------

N = 4000
KS_C = math.sqrt(-0.5 * math.log(1e-4 / 2))      # two-sample KS critical value, alpha 1e-4


def _rate_ok(a, b):
    p = (np.mean(a) + np.mean(b)) / 2
    return abs(np.mean(a) - np.mean(b)) <= 4 * math.sqrt(max(p * (1 - p), 1e-4) * 2 / N)


def _both(cfg, h, w, seed=0):
    rng = np.random.default_rng(seed)
    cpu = [A.sample_train_params(rng, h, w, cfg) for _ in range(N)]
    dev = D.sample_device_params(jax.random.key(seed), np.tile([[h, w]], (N, 1)), cfg)
    return cpu, jax.tree.map(np.asarray, dev)


def _ks(name, a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    bound = KS_C * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))   # ~0.05 at 4000 each
    d = stats.ks_2samp(a, b).statistic
    assert d < bound, (name, d, bound)


def test_sampler_distributions_match_cpu():
    cfg = A.AugmentConfig(image_size=S)
    cpu, dev = _both(cfg, H, W)
    crop = np.asarray([p.crop for p in cpu], float)
    for k, name in enumerate(('top', 'left', 'height', 'width')):
        _ks(name, crop[:, k], dev.crop[:, k])
    _ks('area', crop[:, 2] * crop[:, 3] / (H * W), dev.crop[:, 2] * dev.crop[:, 3] / (H * W))
    _ks('log_aspect', np.log(crop[:, 3] / crop[:, 2]), np.log(dev.crop[:, 3] / dev.crop[:, 2]))
    assert (dev.crop[:, 0] + dev.crop[:, 2] <= H).all() and (dev.crop[:, 1] + dev.crop[:, 3] <= W).all()
    _ks('angle', [p.angle for p in cpu], dev.angle)
    for k, name in enumerate(('tx', 'ty')):
        _ks(name, [p.translate[k] for p in cpu], dev.translate[:, k])
    _ks('shear', [p.shear[0] for p in cpu], dev.shear[:, 0])
    assert (dev.shear[:, 1] == 0).all()
    _ks('sigma', [p.sigma for p in cpu], dev.sigma)
    for name in ('brightness', 'contrast', 'saturation', 'hue'):
        _ks(name, [getattr(p, name) for p in cpu], getattr(dev, name))
    assert _rate_ok([p.flip for p in cpu], dev.flip)
    assert _rate_ok([p.grayscale for p in cpu], dev.grayscale)
    assert _rate_ok([p.erase is not None for p in cpu], dev.erase)
    order = np.asarray([p.jitter_order for p in cpu])
    for pos, op in itertools.product(range(4), range(4)):
        assert _rate_ok(order[:, pos] == op, dev.jitter_order[:, pos] == op), (pos, op)
    # erasing boxes (given erasing) on the S x S output
    ecpu = np.asarray([p.erase for p in cpu if p.erase is not None], float)
    edev = dev.erase_box[dev.erase].astype(float)
    for k, name in enumerate(('erase_top', 'erase_left', 'erase_h', 'erase_w')):
        _ks(name, ecpu[:, k], edev[:, k])
    assert (edev[:, 0] + edev[:, 2] <= S).all() and (edev[:, 1] + edev[:, 3] <= S).all()


def test_crop_rejection_and_fallback_match_cpu():
    """A 20x100 image with torchvision's default scale: many tries fail, some images fall back
    to the ratio-clamped centre crop (20 x 27 at (0, 36))."""
    cfg = dataclasses.replace(A.AugmentConfig(image_size=S), rrc_scale=(0.08, 1.0))
    cpu, dev = _both(cfg, 20, 100, seed=1)
    crop = np.asarray([p.crop for p in cpu], float)
    fallback = (0, 36, 20, 27)
    cpu_fb = (crop == fallback).all(1)
    dev_fb = (dev.crop == fallback).all(1)
    assert 0.05 < cpu_fb.mean() < 0.95 and _rate_ok(cpu_fb, dev_fb), (cpu_fb.mean(), dev_fb.mean())
    for k, name in enumerate(('top', 'left', 'height', 'width')):
        _ks(name, crop[:, k], dev.crop[:, k])
    _ks('area', crop[:, 2] * crop[:, 3], dev.crop[:, 2] * dev.crop[:, 3])
