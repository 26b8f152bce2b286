"""Class-wise self-knowledge distillation (CS-KD): same-class partners, their loaders, the
step's extra term against numpy, and a run with it on both augmentation paths."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cars_jax.data import pipeline
from cars_jax.data.augment import AugmentConfig
from cars_jax.data.sources import Record
from cars_jax.mixup import mixup, symmetric_beta
from cars_jax.steps import create_train_state, make_steps
from cars_jax.train import train_and_evaluate
from fixtures import (make_colour_folders, numpy_smoothed_ce, run_config, tiny_batch,
                      tiny_config)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_partners_are_other_members_of_the_class_drawn_uniformly():
    labels = np.array([2, 0, 1, 0, 2, 0, 0, 0, 3])      # class sizes 5, 1, 2, 1
    indices = np.repeat(np.arange(len(labels)), 4000)
    partners = pipeline.same_class_partners(labels, indices, seed=1, epoch=2)
    np.testing.assert_array_equal(labels[partners], labels[indices])
    for record in range(len(labels)):
        mates = [j for j in range(len(labels)) if labels[j] == labels[record] and j != record]
        got = partners[indices == record]
        if not mates:                                     # alone in its class: itself
            assert set(got) == {record}
            continue
        assert record not in got
        freq = np.array([np.mean(got == j) for j in mates])
        # 4000 uniform draws over the others: each share within ~5 sd of 1/len(mates)
        p = 1 / len(mates)
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / 4000)), (record, freq)
    again = pipeline.same_class_partners(labels, indices, seed=1, epoch=2)
    other = pipeline.same_class_partners(labels, indices, seed=1, epoch=3)
    np.testing.assert_array_equal(partners, again)
    assert (partners != other).any()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_colour_folders(tmp_path_factory.mktemp('cars'))


def _records(data_dir):
    files = sorted((data_dir / 'train').glob('class_*/*.jpg'))
    return [Record(str(f), int(f.parent.name[-1])) for f in files]


def test_the_host_loader_pairs_each_image_with_an_image_of_its_class(data_dir):
    """make_colour_folders paints class c in colour channel c: with no colour augmentation,
    a pair image's brightest channel names its class."""
    records = _records(data_dir)
    labels = np.array([r.label for r in records])
    aug = AugmentConfig(image_size=16, brightness=0.0, contrast=0.0, saturation=0.0,
                        grayscale_prob=0.0, erasing_prob=0.0)
    kw = dict(seed=0, epoch=1, batch_size=8)
    batches = list(pipeline.train_epoch_dataset(records, labels, aug, partners=True, **kw))
    plain = list(pipeline.train_epoch_dataset(records, labels, aug, **kw))
    assert sum(len(b['label']) for b in batches) == len(records)
    for b, p in zip(batches, plain):
        pixels = b['pair_image'] * np.array(aug.std) + np.array(aug.mean)
        np.testing.assert_array_equal(pixels.mean(axis=(1, 2)).argmax(-1), b['label'])
        np.testing.assert_array_equal(b['image'], p['image'])     # the draws are unchanged
        assert not np.array_equal(b['pair_image'], b['image'])


def test_the_cached_loader_gathers_the_same_partners():
    labels = np.arange(22) % 4
    images = np.arange(22, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    hw = np.stack([np.arange(22) + 10, np.arange(22) + 40], 1)
    kw = dict(seed=5, epoch=2, batch_size=8)
    for processes in (1, 2):
        parts = [list(pipeline.cached_train_epoch_dataset(images, hw, labels, partners=True,
                                                          shard=(p, processes), **kw))
                 for p in range(processes)]
        index = np.concatenate([b['index'] for part in zip(*parts) for b in part])
        pair = np.concatenate([b['pair_image'][:, 0, 0, 0] for part in zip(*parts)
                               for b in part])
        pair_hw = np.concatenate([b['pair_orig_hw'] for part in zip(*parts) for b in part])
        drawn = pipeline.epoch_indices(labels, 5, 2)
        np.testing.assert_array_equal(index, drawn)
        np.testing.assert_array_equal(pair, pipeline.same_class_partners(labels, drawn, 5, 2))
        np.testing.assert_array_equal(pair_hw, hw[pair])


def _logits(state, images):
    out, _ = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                            np.asarray(images, np.float32), train=True, mutable=['batch_stats'])
    return np.asarray(out).astype(np.float64)


@pytest.mark.parametrize('mixed', [False, True])
def test_the_step_adds_w_t2_kl_to_the_nets_own_prediction_on_the_pairs(mixed):
    """CE + w x T^2 KL(p(pair) || p(image)) with p = softmax(logits / T), both networks'
    logits recomputed outside the step and combined in numpy; a MixUp batch mixes the pairs
    with the batch's own coin, lam and permutation."""
    w, t = 3.0, 2.0
    c = tiny_config(dropout=0.0, mixup_prob=1.0 if mixed else 0.0, cskd_weight=w,
                    cskd_temperature=t)
    batch = tiny_batch()
    batch['pair_image'] = tiny_batch(seed=1)['image']
    state = create_train_state(c, jax.random.PRNGKey(0), 3, 10)
    rng = jax.random.PRNGKey(4)
    images, labels, pairs, lam = batch['image'], batch['label'], batch['pair_image'], 1.0
    if mixed:
        mix_rng = jax.random.split(rng)[0]                 # train_step's mixing key
        _, k_lam, k_perm = jax.random.split(mix_rng, 3)
        lam = float(symmetric_beta(k_lam, c.mixup_alpha))
        perm = np.asarray(jax.random.permutation(k_perm, len(labels)))
        images = lam * images + (1 - lam) * images[perm]   # numpy: float64 mixing
        pairs = lam * pairs + (1 - lam) * pairs[perm]
    s_logits, p_logits = _logits(state, images), _logits(state, pairs)
    ce = numpy_smoothed_ce(s_logits, labels, c.label_smoothing)
    if mixed:
        ce = lam * ce + (1 - lam) * numpy_smoothed_ce(s_logits, labels[perm], c.label_smoothing)
    q, p = _softmax(p_logits / t), _softmax(s_logits / t)
    kd = t * t * (q * np.log(q / p)).sum(-1)
    train_fn, _ = make_steps(c)
    _, m = train_fn(jax.tree.map(np.copy, state), batch, rng)
    assert float(m['mixed']) == float(mixed)
    np.testing.assert_allclose(float(m['loss']), ce.mean() + w * kd.mean(), rtol=1e-4)
    if mixed:      # the same images mixed by cars_jax.mixup with the step's key
        np.testing.assert_allclose(
            np.asarray(mixup(mix_rng, jnp.asarray(batch['pair_image']), labels, c.mixup_alpha,
                             1.0)[0]),
            pairs, rtol=1e-5, atol=1e-5)


def test_a_step_with_cskd_needs_pair_images():
    c = tiny_config(cskd_weight=1.0)
    state = create_train_state(c, jax.random.PRNGKey(0), 3, 10)
    with pytest.raises(ValueError, match='pair_image'):
        make_steps(c)[0](state, tiny_batch(), jax.random.PRNGKey(0))


@pytest.mark.parametrize('augment_on', ['host', 'device'])
def test_a_run_with_cskd_trains_on_both_augmentation_paths(data_dir, tmp_path, augment_on):
    c = run_config(data_dir, cskd_weight=3.0, augment_on=augment_on,
                   cache_dir=str(tmp_path / 'cache'))
    train_and_evaluate(c, str(tmp_path / 'run'), quiet=True)
    log = open(tmp_path / 'run' / 'log.txt').read()
    assert 'Class-wise self-distillation (CS-KD)' in log
    rows = [json.loads(l) for l in open(tmp_path / 'run' / 'metrics.jsonl')]
    assert len(rows) == 2 and all(np.isfinite(r['train_loss']) for r in rows)
