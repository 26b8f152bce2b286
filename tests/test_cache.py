"""Decode once (the uint8 cache), its loader, and the train step that augments on the device."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from cars_jax.data import augment as A
from cars_jax.data import cache as C
from cars_jax.data import pipeline
from cars_jax.data.device_augment import augment_batch, sample_device_params
from cars_jax.data.sources import Record
from cars_jax.steps import cached_step_keys, create_train_state, train_step, train_step_cached
from fixtures import tiny_config
from fixtures import make_colour_folders, restore_latest, run_config


def smooth_image(h, w, seed=0):
    """A smooth colour image (JPEG-friendly, so decode differences are small)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    f = rng.uniform(1, 3, 3)
    img = np.stack([np.sin(f[c] * 3 * x + c) * np.cos(f[c] * 2 * y) for c in range(3)], -1)
    return ((img + 1) * 127.5).astype(np.uint8)


@pytest.fixture
def jpegs(tmp_path):
    """Records of large-ish JPEGs of several sizes and modes."""
    recs = []
    for i, (h, w, mode) in enumerate([(300, 400, 'RGB'), (360, 240, 'L'), (200, 200, 'CMYK'),
                                      (120, 160, 'RGB')]):
        p = tmp_path / f'{i}.jpg'
        Image.fromarray(smooth_image(h, w, i)).convert(mode).save(p, quality=95)
        recs.append(Record(str(p), label=i % 2, key=f'{i}.jpg'))
    png = tmp_path / 'x.png'
    Image.fromarray(smooth_image(50, 70, 9)).save(png)
    recs.append(Record(str(png), label=0, key='x.png'))
    return recs


def test_draft_decode_matches_a_full_decode_and_keeps_the_original_size(jpegs):
    for rec in jpegs:
        got, hw = C.decode_squashed(rec, 48)
        full = A.resize(np.asarray(Image.open(rec.image).convert('RGB')), 48)
        assert got.shape == (48, 48, 3) and got.dtype == np.uint8
        assert hw == Image.open(rec.image).size[::-1]
        # DCT-domain downscale + bilinear vs full decode + antialiased bilinear: a few levels
        assert np.abs(got.astype(int) - full.astype(int)).mean() < 3.0, rec.key


def test_bbox_crop_is_applied_before_the_squash(jpegs):
    rec = Record(jpegs[0].image, 0, bbox=(100, 50, 300, 250), key='b')
    got, hw = C.decode_squashed(rec, 32, use_bbox=True, bbox_margin=0)
    full = np.asarray(Image.open(rec.image).convert('RGB'))[50:250, 100:300]
    assert hw == (200, 200)
    assert np.abs(got.astype(int) - A.resize(full, 32).astype(int)).mean() < 2.0


def test_cache_file_is_reused_and_rebuilt_when_the_records_change(jpegs, tmp_path, monkeypatch):
    cdir = tmp_path / 'cache'
    first = C.build_cache(jpegs, 32, cache_dir=str(cdir), log=lambda m: None)
    assert first.path and os.path.exists(first.path) and first.images.shape == (5, 32, 32, 3)
    for i, rec in enumerate(jpegs):
        img, hw = C.decode_squashed(rec, 32)
        np.testing.assert_array_equal(first.images[i], img)
        assert tuple(first.orig_hw[i]) == hw
    # the second build reads the file: no decode happens
    monkeypatch.setattr(C, 'decode_squashed', lambda *a, **k: 1 / 0)
    again = C.build_cache(jpegs, 32, cache_dir=str(cdir), log=lambda m: None)
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.orig_hw, first.orig_hw)
    monkeypatch.undo()
    # another record list, or another size, is another cache
    other = C.build_cache(jpegs[:3], 32, cache_dir=str(cdir), log=lambda m: None)
    assert other.path != first.path and other.images.shape[0] == 3
    # leftovers of a killed build (a .tmp file) are never taken for a cache
    assert not [n for n in os.listdir(cdir) if '.tmp' in n]


def test_a_file_broken_after_the_scan_is_replaced_counted_and_logged(jpegs, tmp_path):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(open(jpegs[0].image, 'rb').read()[:200])
    recs = [Record(str(bad), 0, key='broken.jpg')] + list(jpegs)
    logs = []
    out = C.build_cache(recs, 24, cache_dir=str(tmp_path / 'c'), log=logs.append)
    np.testing.assert_array_equal(out.images[0], out.images[1])  # the next readable record
    meta = json.load(open(out.path[:-4] + '.json'))
    assert meta['replaced'] == 1 and '1 unreadable' in logs[-1]


def test_cached_loader_serves_the_host_loaders_indices(jpegs):
    cache = C.build_cache(jpegs, 24, log=lambda m: None)
    labels = np.array([r.label for r in jpegs])
    kw = dict(seed=3, epoch=1, batch_size=2, weighted=True)
    host = [b['index'] for b in pipeline.train_epoch_dataset(
        jpegs, labels, A.AugmentConfig(image_size=16), **kw)]
    batches = list(pipeline.cached_train_epoch_dataset(cache.images, cache.orig_hw, labels, **kw))
    assert [list(b['index']) for b in batches] == [list(i) for i in host]
    for b in batches:
        np.testing.assert_array_equal(b['image'], cache.images[b['index']])
        np.testing.assert_array_equal(b['orig_hw'], cache.orig_hw[b['index']])
        np.testing.assert_array_equal(b['label'], labels[b['index']])


def test_cached_step_is_the_plain_step_on_the_device_augmented_batch():
    """The fast path's step = augment (same draws) + the plain step: same trajectory."""
    c = tiny_config(image_size=16)
    aug = A.AugmentConfig.from_config(c)
    state = create_train_state(c, jax.random.PRNGKey(0), num_classes=3, steps_per_epoch=10)
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (8, 18, 18, 3), dtype=np.uint8),
             'orig_hw': np.array([[30, 40], [18, 18]] * 4, np.int32),
             'label': (np.arange(8) % 3).astype(np.int32)}
    kw = dict(label_smoothing=0.05, mixup_alpha=0.4, mixup_prob=0.5)
    fast, plain = jax.jit(lambda s, b, r: train_step_cached(s, b, r, aug=aug, **kw)), \
        jax.jit(lambda s, b, r: train_step(s, b, r, **kw))
    s_fast, s_plain = state, state
    for i in range(3):
        key = jax.random.PRNGKey(i)
        s_fast, m_fast = fast(s_fast, batch, key)
        aug_key, step_rng = cached_step_keys(key)
        params = sample_device_params(aug_key, batch['orig_hw'], aug)
        images = augment_batch(batch['image'], params, aug)
        s_plain, m_plain = plain(s_plain, {'image': images, 'label': batch['label']}, step_rng)
        np.testing.assert_allclose(m_fast['loss'], m_plain['loss'], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(s_fast.params), jax.tree.leaves(s_plain.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('overrides', [{}, {'progressive_min_size': 8,
                                             'progressive_end_epoch': 1}])
def test_training_with_augment_on_device_resumes_on_the_same_trajectory(tmp_path, overrides):
    """The whole loop on the device path: cache built once beside the data, the log says so,
    and a stop + resume gives the straight run's weights bit for bit (also with progressive
    resizing: the step's output size is a static argument there)."""
    from cars_jax.train import train_and_evaluate
    data_dir = make_colour_folders(tmp_path / 'cars')
    c = run_config(data_dir, augment_on='device', **overrides)
    straight = tmp_path / 'straight'
    train_and_evaluate(c, str(straight), quiet=True)
    log = open(straight / 'log.txt').read()
    assert 'augmentation on the device' in log
    if overrides:
        assert 'from epoch 1 the train images are 8 px' in log
        assert 'from epoch 2 the train images are 16 px' in log
    assert [n for n in os.listdir(data_dir / '.cars_jax_cache') if n.endswith('.npy')]
    split = tmp_path / 'split'
    assert train_and_evaluate(c, str(split), stop_after_steps=4, quiet=True)['interrupted']
    train_and_evaluate(c, str(split), quiet=True)
    a, _ = restore_latest(straight, c)
    b, _ = restore_latest(split, c)
    assert int(a.step) == int(b.step) == 6
    for x, y in zip(jax.tree.leaves((a.params, a.batch_stats)), jax.tree.leaves((b.params,
                                                                                  b.batch_stats))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
