"""benchmarks/fused.py, fused epochs: the resident dataset + lax.scan keep the per-step recipe
exactly (each step is the loop's `steps.train_step_cached`)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from benchmarks.fused import (chunk_step_key, device_dataset, device_epoch_indices,
                              gather_batch, make_fused_steps)
from cars_jax.data import augment as A
from cars_jax.steps import create_train_state, eval_step, train_step_cached
from fixtures import tiny_config

N, CACHE, S, B, K, CLASSES = 64, 20, 16, 8, 4, 3
HYPER = dict(label_smoothing=0.05, mixup_alpha=0.4, mixup_prob=0.5)


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope='module')
def setup():
    config = tiny_config(batch_size=B, image_size=S, **HYPER)
    aug = A.AugmentConfig.from_config(config)
    rng = np.random.default_rng(0)
    labels = (np.arange(N) % CLASSES).astype(np.int32)
    # class-dependent images so the net sees signal; originals of varied sizes
    images = np.clip(rng.normal(80 + 50 * labels[:, None, None, None], 40,
                                size=(N, CACHE, CACHE, 3)), 0, 255).astype(np.uint8)
    orig_hw = rng.integers(16, 60, size=(N, 2)).astype(np.int32)
    data = device_dataset(images, orig_hw, labels)
    state = create_train_state(config, jax.random.PRNGKey(0), num_classes=CLASSES,
                               steps_per_epoch=N // B)
    return config, aug, data, state


@pytest.fixture(scope='module')
def compiled(setup):
    """The jitted functions, shared so each program compiles once for the whole file: the
    fused steps, and one step of the loop's device path on a gathered batch."""
    config, aug, _, _ = setup
    cached = jax.jit(functools.partial(train_step_cached, aug=aug, **HYPER))
    return (make_fused_steps(config, aug, num_classes=CLASSES),
            lambda state, data, idx, key: cached(state, gather_batch(data, idx), key))


def test_device_dataset_rejects_bad_entries():
    ok = dict(images=np.zeros((2, 4, 4, 3), np.uint8), orig_hw=np.ones((2, 2)), labels=[0, 1])
    assert device_dataset(**ok).orig_hw.dtype == jnp.int32
    for bad in (dict(images=np.zeros((2, 4, 4, 3), np.float32)), dict(orig_hw=[[1, 1], [0, 5]]),
                dict(labels=[0, -1]), dict(labels=[0])):
        with pytest.raises(ValueError):
            device_dataset(**{**ok, **bad})


def test_scan_chunk_equals_python_loop(setup, compiled):
    config, aug, data, state = setup
    fns, step = compiled
    key = jax.random.PRNGKey(7)
    indices = fns.epoch_indices(jax.random.PRNGKey(3), data.labels, K)
    assert indices.shape == (K, B) and indices.dtype == jnp.int32
    scanned, metrics = fns.train_chunk(_copy(state), data, indices, key)   # state donated

    looped, loop_metrics = state, []
    for i in range(K):
        looped, m = step(looped, data, indices[i], chunk_step_key(key, i))
        loop_metrics.append(m)
    assert int(scanned.step) == int(looped.step) == K
    # Same ops, compiled as a scan body vs a standalone program: XLA may fuse/reassociate
    # differently, giving float32 rounding differences (~1e-7 relative) that Adam's
    # m / sqrt(v) can lift slightly over 4 steps; 1e-5 is far below any semantic change
    # (a different key or batch moves parameters by ~lr = 4e-5 .. 2e-3).
    _assert_trees_close(scanned.params, looped.params)
    _assert_trees_close(scanned.batch_stats, looped.batch_stats)
    _assert_trees_close(scanned.opt_state, looped.opt_state)
    for name in ('loss', 'accuracy', 'mixed', 'lr', 'finite'):
        assert metrics[name].shape == (K,)
        np.testing.assert_allclose(metrics[name], [m[name] for m in loop_metrics],
                                   rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(metrics['finite']) == 1)
    # the steps really differ (distinct keys/batches per step) and something was learnt
    assert len(set(np.asarray(metrics['loss']).round(6))) == K
    assert not np.allclose(jax.tree.leaves(scanned.params)[0], jax.tree.leaves(state.params)[0])


def test_gathered_batch_is_the_cache_loaders_batch(setup):
    """gather_batch = the decode-once loader's batch of those records (numpy indexing), so a
    chunk's step is `train_step_cached` on what the loop's device path would feed it."""
    _, _, data, _ = setup
    idx = jnp.asarray([5, 0, 63, 5, 17, 2, 40, 33], jnp.int32)   # repeats allowed (sampler)
    batch = jax.jit(gather_batch)(data, idx)
    assert sorted(batch) == ['image', 'label', 'orig_hw']
    idx_np = np.asarray(idx)
    for name, field in (('image', 'images'), ('orig_hw', 'orig_hw'), ('label', 'labels')):
        want = np.asarray(getattr(data, field))[idx_np]
        assert batch[name].dtype == want.dtype
        np.testing.assert_array_equal(batch[name], want)


def test_weighted_indices_balance_classes():
    counts = np.array([2, 5, 10, 20, 40, 83])
    labels = jnp.asarray(np.repeat(np.arange(6), counts), jnp.int32)
    n = len(labels)
    idx = np.asarray(device_epoch_indices(jax.random.PRNGKey(0), labels, 2500, 8, True, 6))
    assert idx.shape == (2500, 8) and idx.min() >= 0 and idx.max() < n
    observed = np.bincount(np.asarray(labels)[idx.ravel()], minlength=6)
    expected = np.full(6, idx.size / 6)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < stats.chi2.ppf(0.9999, df=5), (observed, chi2)
    # the bound discriminates: uniform-over-records frequencies (what a sampler without the
    # class weights gives) would be rejected by a huge margin
    unweighted = counts / n * idx.size
    assert ((unweighted - expected) ** 2 / expected).sum() > 100 * stats.chi2.ppf(0.9999, df=5)
    # within a class the records are equally likely: the largest class (83 records)
    big = idx.ravel()[np.asarray(labels)[idx.ravel()] == 5]
    per_record = np.bincount(big - counts[:5].sum(), minlength=83)
    assert stats.chisquare(per_record).pvalue > 1e-4
    # a class id absent from the data (num_classes larger) changes nothing
    again = device_epoch_indices(jax.random.PRNGKey(0), labels, 2500, 8, True, 9)
    np.testing.assert_array_equal(again, idx)


def test_unweighted_indices_are_a_truncated_permutation_and_deterministic():
    labels = jnp.asarray(np.arange(61) % 4, jnp.int32)
    idx = np.asarray(device_epoch_indices(jax.random.PRNGKey(1), labels, 61 // 8, 8, False, 4))
    assert idx.shape == (7, 8)
    assert len(set(idx.ravel().tolist())) == 56 and idx.min() >= 0 and idx.max() < 61
    same = device_epoch_indices(jax.random.PRNGKey(1), labels, 7, 8, False, 4)
    np.testing.assert_array_equal(same, idx)
    other = device_epoch_indices(jax.random.PRNGKey(2), labels, 7, 8, False, 4)
    assert not np.array_equal(other, idx)
    w1 = device_epoch_indices(jax.random.PRNGKey(1), labels, 7, 8, True, 4)
    np.testing.assert_array_equal(w1, device_epoch_indices(jax.random.PRNGKey(1), labels, 7, 8,
                                                           True, 4))
    with pytest.raises(ValueError, match='permutation'):
        device_epoch_indices(jax.random.PRNGKey(1), labels, 8, 8, False, 4)


def test_evaluate_resident_equals_eval_step_loop(setup, compiled):
    config, aug, _, state = setup
    m = 21   # 2 full batches of 8 + a tail of 5
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(m, S, S, 3), dtype=np.uint8)
    labels = (rng.integers(0, CLASSES, size=m)).astype(np.int32)
    sums = jax.device_get(compiled[0].evaluate(state, images, labels))

    # reference: the CPU path's normalize, hand-padded batches, eval_step one by one
    normed = np.stack([A.normalize(im, aug.mean, aug.std) for im in images])
    ev = jax.jit(functools.partial(eval_step, label_smoothing=HYPER['label_smoothing']))
    ref = {'loss_sum': 0.0, 'correct_sum': 0.0, 'top5_sum': 0.0, 'count': 0.0}
    for start in range(0, m, B):
        x, y = normed[start:start + B], labels[start:start + B]
        pad = B - len(x)
        batch = {'image': np.concatenate([x, np.zeros((pad, S, S, 3), np.float32)]),
                 'label': np.concatenate([y, np.zeros(pad, np.int32)]),
                 'mask': np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])}
        out = jax.device_get(ev(state, batch))
        for k in ref:
            ref[k] += float(out[k])
    assert float(sums['count']) == m
    for k in ref:   # summation order differs (scan carry vs Python floats): float32 rounding
        np.testing.assert_allclose(float(sums[k]), ref[k], rtol=1e-5, atol=1e-5)
    # the masked tail is really excluded: counting it would add 3 more examples' loss
    assert float(sums['loss_sum']) > 0 and float(sums['correct_sum']) <= m


def test_nonfinite_step_inside_a_chunk_is_skipped(setup, compiled):
    """The guard inside scan. Step 2's batch holds images whose original size reads 0 x 0 (a
    corrupt record: `device_dataset` refuses it, so it is built by hand): their crop maps
    divide by 0 and the augmented pixels are NaN, so that step's loss is NaN. The chunk must
    skip exactly that step (finite [1, 1, 0, 1]) and go on: its state equals the loop over
    steps 0, 1 and 3 alone, and the step counter is 3."""
    _, _, data, state = setup
    fns, step = compiled
    indices = jnp.arange(K * B, dtype=jnp.int32).reshape(K, B)
    bad = data._replace(orig_hw=data.orig_hw.at[indices[2, :2]].set(0))
    key = jax.random.PRNGKey(4)
    out, metrics = fns.train_chunk(_copy(state), bad, indices, key)
    np.testing.assert_array_equal(metrics['finite'], [1, 1, 0, 1])
    assert np.isnan(float(metrics['loss'][2]))
    assert int(out.step) == 3

    ref = state
    for i in (0, 1, 3):
        ref, m = step(ref, data, indices[i], chunk_step_key(key, i))
        assert float(m['finite']) == 1
    assert int(ref.step) == 3
    # Step 3 runs at opt step 2 in both; tolerance as in the scan == loop test.
    _assert_trees_close(out.params, ref.params)
    _assert_trees_close(out.batch_stats, ref.batch_stats)
    _assert_trees_close(out.opt_state, ref.opt_state)
