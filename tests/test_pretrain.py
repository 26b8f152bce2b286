"""Self-supervised pretraining (SimCLR): the network, the step, the two-view loader, the loop
(resume included) and a supervised run starting from its backbone."""
import json

import jax
import numpy as np
import pytest

from cars_jax.config import ConfigError
from cars_jax.data import pipeline
from cars_jax.data.augment import AugmentConfig
from cars_jax.data.sources import Record
from cars_jax.pretrain import (create_pretrain_state, load_pretrained_backbone, pretrain,
                               pretrain_step, with_backbone)
from cars_jax.steps import create_train_state
from fixtures import make_colour_folders, run_config, tiny_config


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_backbone_is_the_classifier_without_fc_and_moves_into_it():
    c = tiny_config(ema_decay=0.9)
    pre = create_pretrain_state(c, jax.random.PRNGKey(1), 3)
    sup = create_train_state(c, jax.random.PRNGKey(2), 3, 3)
    backbone = {'params': pre.params['backbone'], 'batch_stats': pre.batch_stats['backbone']}
    assert set(sup.params) - set(backbone['params']) == {'fc'}
    assert set(pre.params) == {'backbone', 'proj1', 'proj2'}
    assert pre.params['proj1']['kernel'].shape == (8, 8)           # widths[-1] -> widths[-1]
    assert pre.params['proj2']['kernel'].shape == (8, 128)
    out = with_backbone(sup, backbone)
    rest = {k: v for k, v in out.params.items() if k != 'fc'}
    assert _leaves_equal(rest, backbone['params'])
    assert _leaves_equal(out.batch_stats, backbone['batch_stats'])
    assert _leaves_equal(out.params['fc'], sup.params['fc'])       # the classifier is fresh
    assert _leaves_equal(out.ema, {'params': out.params, 'batch_stats': out.batch_stats})
    other = create_pretrain_state(tiny_config(widths=(4, 16)), jax.random.PRNGKey(1), 3)
    with pytest.raises(ValueError, match='shapes'):
        with_backbone(sup, {'params': other.params['backbone'],
                            'batch_stats': other.batch_stats['backbone']})


def test_the_step_learns_to_pair_views_and_a_nan_batch_changes_nothing():
    c = tiny_config(learning_rate=1e-2)
    state = create_pretrain_state(c, jax.random.PRNGKey(0), 50)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    batch = {'image': base + 0.1 * rng.normal(size=base.shape).astype(np.float32),
             'image2': base + 0.1 * rng.normal(size=base.shape).astype(np.float32)}
    step = jax.jit(lambda s, b: pretrain_step(s, b, 0.5))
    losses = []
    for _ in range(15):
        state, m = step(state, batch)
        assert float(m['finite']) == 1.0
        losses.append(float(m['loss']))
    assert losses[-1] < losses[0] - 0.1, losses
    assert float(m['positive_hits']) > 0.5
    bad = dict(batch, image=np.full_like(base, np.nan))
    after, m = step(state, bad)
    assert float(m['finite']) == 0.0 and int(after.step) == int(state.step)
    assert _leaves_equal(after.params, state.params)


def test_two_views_are_the_usual_view_and_an_independent_one(tmp_path):
    from PIL import Image
    path = tmp_path / 'a.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), np.uint8)).save(path)
    records, labels = [Record(str(path), 0)] * 4, np.zeros(4, np.int64)
    aug = AugmentConfig(image_size=16)
    kw = dict(seed=3, epoch=1, batch_size=4, weighted=False)
    one = next(iter(pipeline.train_epoch_dataset(records, labels, aug, **kw)))
    two = next(iter(pipeline.train_epoch_dataset(records, labels, aug, two_views=True, **kw)))
    np.testing.assert_array_equal(one['image'], two['image'])
    assert two['image2'].shape == two['image'].shape
    assert not np.allclose(two['image2'], two['image'])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_colour_folders(tmp_path_factory.mktemp('cars'))


def _pretrain_config(data_dir, **overrides):
    return run_config(data_dir, **{'num_epochs': 2, 'max_steps_per_epoch': 2, 'batch_size': 4,
                                   'log_every_steps': 1, **overrides})


def test_pretraining_resumes_on_the_same_trajectory_and_a_run_starts_from_it(data_dir, tmp_path):
    c = _pretrain_config(data_dir)
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    summary = pretrain(c, str(straight), quiet=True)
    assert summary['epochs'] == 2 and summary['steps'] == 4 and np.isfinite(summary['loss'])
    rows = [json.loads(l) for l in open(straight / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows] == [1, 2]
    assert pretrain(c, str(straight), quiet=True) == summary        # finished: said, not redone
    assert 'holds a finished pretraining' in open(straight / 'log.txt').read()
    assert pretrain(c, str(split), stop_after_steps=3, quiet=True) == {'interrupted': True,
                                                                         'step': 3}
    pretrain(c, str(split), quiet=True)
    from cars_jax.checkpoints import latest_manager, restore_checkpoint
    got = []
    for d in (straight, split):
        mgr = latest_manager(str(d))
        got.append(restore_checkpoint(mgr, create_pretrain_state(c, jax.random.PRNGKey(5), 2))[0])
        mgr.close()
    assert int(got[0].step) == int(got[1].step) == 4
    assert _leaves_equal((got[0].params, got[0].batch_stats), (got[1].params, got[1].batch_stats))

    # a supervised run of the same net and data starts its backbone from it
    sup = run_config(data_dir, pretrained_backbone=str(straight))
    fresh = create_train_state(sup, jax.random.PRNGKey(0), 3, 3)
    loaded = load_pretrained_backbone(fresh, sup, holdout=False)
    assert _leaves_equal({k: v for k, v in loaded.params.items() if k != 'fc'},
                         got[0].params['backbone'])
    from cars_jax.train import train_and_evaluate
    train_and_evaluate(sup, str(tmp_path / 'sup'), stop_after_steps=1, quiet=True)
    assert 'starts from the self-supervised pretraining' in open(tmp_path / 'sup' / 'log.txt').read()


def test_a_backbone_from_another_net_split_or_no_pretraining_is_one_clear_error(data_dir,
                                                                             tmp_path):
    pre = tmp_path / 'pre'
    pretrain(_pretrain_config(data_dir, num_epochs=1), str(pre), quiet=True)
    fresh = lambda c: create_train_state(c, jax.random.PRNGKey(0), 3, 3)
    wide = run_config(data_dir, pretrained_backbone=str(pre), widths=(4, 16))
    with pytest.raises(ConfigError, match='widths'):
        load_pretrained_backbone(fresh(wide), wide)
    other_seed = run_config(data_dir, pretrained_backbone=str(pre), seed=7)
    with pytest.raises(ConfigError, match='trained with seed=0.*validation or test images'):
        load_pretrained_backbone(fresh(other_seed), other_seed, holdout=True)
    load_pretrained_backbone(fresh(other_seed), other_seed, holdout=False)  # validation = test
    nothing = run_config(data_dir, pretrained_backbone=str(tmp_path))
    with pytest.raises(ConfigError, match='not a finished pretraining run'):
        load_pretrained_backbone(fresh(nothing), nothing)
