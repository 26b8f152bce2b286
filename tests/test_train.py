"""The training loop: metrics/plots/checkpoints, early stopping, exact resume."""
import json
import os

import jax
import numpy as np
import pytest

from cars_jax.checkpoints import save_checkpoint
from cars_jax.train import TrainingError, checkpoint_managers, restore_checkpoint, train_and_evaluate
from cars_jax.steps import create_train_state
from fixtures import make_colour_folders, restore_latest, run_config, tiny_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_colour_folders(tmp_path_factory.mktemp('cars'))


@pytest.fixture(scope='module')
def straight_run(data_dir, tmp_path_factory):
    """The workdir of one uninterrupted run per config, made once per module: the resume tests
    that stop the same config at different steps compare against the same run."""
    runs = {}

    def get(config):
        key = config.to_json()
        if key not in runs:
            workdir = tmp_path_factory.mktemp('straight')
            train_and_evaluate(config, str(workdir), quiet=True)
            runs[key] = workdir
        return runs[key]
    return get


def test_run_writes_metrics_curves_and_reports_best(data_dir, tmp_path):
    c = run_config(data_dir)
    report = train_and_evaluate(c, str(tmp_path), quiet=True)
    rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows] == [1, 2]
    assert all(0.0 <= r['data_wait_share'] <= 1.0 for r in rows)
    for key in ('train_loss', 'val_loss', 'val_accuracy', 'val_top5', 'lr', 'img_per_s',
                'mixup_share', 'epoch_time_s'):
        assert key in rows[0]
    assert os.path.getsize(tmp_path / 'curves.png') > 1000
    assert json.load(open(tmp_path / 'class_names.json')) == ['class_0', 'class_1', 'class_2']
    assert json.load(open(tmp_path / 'config.json'))['batch_size'] == 4
    best_epoch = min(rows, key=lambda r: r['val_loss'])['epoch']
    assert report['best_epoch'] == best_epoch
    np.testing.assert_allclose(report['val']['loss'], rows[best_epoch - 1]['val_loss'], rtol=1e-5)
    assert report['val']['count'] == 9
    log = open(tmp_path / 'log.txt').read()
    assert 'Epoch 2/2' in log and 'last in-memory weights' in log


@pytest.mark.parametrize('stop_at,overrides', [
    (2, {}), (3, {}), (4, {}),
    # 20 images at batch 8: batches of 8, 8, 4; stopped just before an epoch's partial batch
    (2, {'batch_size': 8, 'max_steps_per_epoch': 0}),
    (5, {'batch_size': 8, 'max_steps_per_epoch': 0}),
    # progressive resizing: epoch 1 at 8 px, epoch 2 at 16; stopped in each
    (2, {'progressive_min_size': 8, 'progressive_end_epoch': 1}),
    (4, {'progressive_min_size': 8, 'progressive_end_epoch': 1}),
])
def test_resume_continues_the_same_trajectory(data_dir, straight_run, tmp_path, stop_at,
                                              overrides):
    c = run_config(data_dir, **overrides)
    straight = straight_run(c)
    split = tmp_path / 'split'
    out = train_and_evaluate(c, str(split), stop_after_steps=stop_at, quiet=True)
    assert out == {'interrupted': True, 'step': stop_at}
    train_and_evaluate(c, str(split), quiet=True)
    a, meta_a = restore_latest(straight, c)
    b, meta_b = restore_latest(split, c)
    assert int(a.step) == int(b.step) == 6
    for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                    jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows_a = [json.loads(l) for l in open(straight / 'metrics.jsonl')]
    rows_b = [json.loads(l) for l in open(split / 'metrics.jsonl')]
    assert [r['val_loss'] for r in rows_a] == [r['val_loss'] for r in rows_b]
    assert ([(r['train_images'], r['train_loss']) for r in rows_a]
            == [(r['train_images'], r['train_loss']) for r in rows_b])


def test_a_run_with_an_ema_resumes_the_same_average(data_dir, tmp_path):
    c = run_config(data_dir, ema_decay=0.9)
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    train_and_evaluate(c, str(straight), quiet=True)
    train_and_evaluate(c, str(split), stop_after_steps=4, quiet=True)
    train_and_evaluate(c, str(split), quiet=True)
    a, _ = restore_latest(straight, c)
    b, _ = restore_latest(split, c)
    assert a.ema is not None and int(a.step) == int(b.step) == 6
    for x, y in zip(jax.tree.leaves((a.params, a.ema)), jax.tree.leaves((b.params, b.ema))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert 'EMA of the weights (decay 0.9)' in open(straight / 'log.txt').read()
    # switching the EMA off in a run made with it would change the checkpoint's structure
    with pytest.raises(TrainingError, match='ema_decay'):
        train_and_evaluate(run_config(data_dir, ema_decay=0.0), str(split), quiet=True)


def test_checkpoints_from_before_the_ema_field_still_restore(tmp_path):
    """Runs saved before TrainState had `ema` have no entry for it on disk; eval and resume of
    such a run (no EMA) must restore its weights, not fail on Orbax's tree-structure check."""
    import orbax.checkpoint as ocp
    c = tiny_config()
    saved = create_train_state(c, jax.random.PRNGKey(1), 3, 4)
    old_tree = {'step': saved.step, 'params': saved.params, 'batch_stats': saved.batch_stats,
                'opt_state': saved.opt_state}
    latest, _ = checkpoint_managers(str(tmp_path))
    latest.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(old_tree),
                                           meta=ocp.args.JsonSave({'epoch': 2})))
    latest.wait_until_finished()
    template = create_train_state(c, jax.random.PRNGKey(2), 3, 4)
    restored, meta = restore_checkpoint(checkpoint_managers(str(tmp_path))[0], template)
    assert meta == {'epoch': 2} and restored.ema is None
    for name, tree in old_tree.items():
        for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(getattr(restored, name))):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(x), np.asarray(y))   # not the template's init
               for x, y in zip(jax.tree.leaves(template.params), jax.tree.leaves(restored.params)))
    # a config that adds an EMA cannot restore such a checkpoint silently
    with_ema = create_train_state(tiny_config(ema_decay=0.9), jax.random.PRNGKey(2), 3, 4)
    with pytest.raises(ValueError, match=r"has no 'ema'.*ema_decay=0"):
        restore_checkpoint(checkpoint_managers(str(tmp_path))[0], with_ema)


def test_a_checkpoint_with_an_ema_does_not_restore_into_a_state_without_one(tmp_path):
    c = tiny_config(ema_decay=0.9)
    saved = create_train_state(c, jax.random.PRNGKey(1), 3, 4)
    latest, _ = checkpoint_managers(str(tmp_path))
    save_checkpoint(latest, saved, {'epoch': 1})
    latest.wait_until_finished()
    fresh = checkpoint_managers(str(tmp_path))[0]
    restored, _ = restore_checkpoint(fresh, create_train_state(c, jax.random.PRNGKey(2), 3, 4))
    for x, y in zip(jax.tree.leaves(saved.ema), jax.tree.leaves(restored.ema)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    without = create_train_state(tiny_config(), jax.random.PRNGKey(2), 3, 4)
    with pytest.raises(ValueError, match=r"has 'ema' but this config keeps none"):
        restore_checkpoint(fresh, without)


def test_early_stopping_with_patience(data_dir, tmp_path):
    # min_delta so large that no epoch after the first counts as an improvement; 4 epochs as
    # the next test's, whose compiled train step it shares (the schedule is part of it)
    c = run_config(data_dir, num_epochs=4, patience=2, min_delta=100.0)
    report = train_and_evaluate(c, str(tmp_path), quiet=True)
    rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    assert len(rows) == 3 and report['epochs_run'] == 3   # epoch 1 best, 2 and 3 bad -> stop
    assert report['best_epoch'] == 1
    assert 'Early stopping at epoch 3' in open(tmp_path / 'log.txt').read()


def test_an_early_stopped_run_continues_when_resumed_with_a_larger_patience(data_dir, tmp_path):
    stopped, straight = tmp_path / 'stopped', tmp_path / 'straight'
    c = run_config(data_dir, num_epochs=4, patience=1, min_delta=100.0)
    assert train_and_evaluate(c, str(stopped), quiet=True)['epochs_run'] == 2
    # the same patience: still finished, nothing more is trained
    assert train_and_evaluate(c, str(stopped), quiet=True)['epochs_run'] == 2
    longer = run_config(data_dir, num_epochs=4, patience=10, min_delta=100.0)
    report = train_and_evaluate(longer, str(stopped), quiet=True)
    assert report['epochs_run'] == 4
    assert 'continues to epoch 4' in open(stopped / 'log.txt').read()
    # the continued run is the run that never stopped
    train_and_evaluate(longer, str(straight), quiet=True)
    rows = [[json.loads(l)['val_loss'] for l in open(d / 'metrics.jsonl')]
            for d in (stopped, straight)]
    assert len(rows[0]) == 4 and rows[0] == rows[1]


def test_improves_is_the_seeds_rule_on_either_metric():
    from cars_jax.train import Progress, improves
    p = Progress(best_val_loss=2.0, best_val_accuracy=0.30)
    assert improves('val_loss', p, {'loss': 1.9, 'accuracy': 0.1}, 0.05)        # 0.1 > 0.05
    assert not improves('val_loss', p, {'loss': 1.96, 'accuracy': 0.9}, 0.05)    # 0.04 <= 0.05
    assert improves('val_accuracy', p, {'loss': 9.0, 'accuracy': 0.36}, 0.05)    # 0.06 > 0.05
    assert not improves('val_accuracy', p, {'loss': 0.1, 'accuracy': 0.34}, 0.05)
    assert improves('val_accuracy', Progress(), {'loss': 9.0, 'accuracy': 0.0}, 0.0)  # first epoch
    with pytest.raises(ValueError, match='val_top5'):
        improves('val_top5', p, {'loss': 1.0, 'accuracy': 1.0}, 0.0)


def test_early_stopping_on_val_accuracy_keeps_the_most_accurate_epoch(data_dir, tmp_path):
    c = run_config(data_dir, num_epochs=4, patience=10, min_delta=0.0,
                   early_stopping_metric='val_accuracy', learning_rate=0.02)
    report = train_and_evaluate(c, str(tmp_path), quiet=True)
    rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    accs = [r['val_accuracy'] for r in rows]
    best = int(np.argmax(accs))                       # first epoch with the highest accuracy
    assert report['best_epoch'] == best + 1
    assert report['val']['accuracy'] == pytest.approx(accs[best])
    assert [r['improved'] for r in rows] == [a > max(accs[:i], default=-1)
                                             for i, a in enumerate(accs)]
    latest, best_mgr = checkpoint_managers(str(tmp_path), 'val_accuracy')
    assert best_mgr.best_step() == rows[best]['step']
    latest.close(), best_mgr.close()


def test_resuming_with_an_incompatible_config_is_a_clear_error(data_dir, tmp_path):
    c = run_config(data_dir)
    train_and_evaluate(c, str(tmp_path), stop_after_steps=1, quiet=True)
    with pytest.raises(TrainingError, match='widths'):
        train_and_evaluate(run_config(data_dir, widths=(4, 4)), str(tmp_path), quiet=True)


def test_checkpoint_every_steps_saves_mid_epoch(data_dir, tmp_path, monkeypatch):
    import cars_jax.train as train_mod
    saved = []
    real = train_mod.save_checkpoint

    def spy(mgr, state, meta, metrics=None, overwrite=False):
        if metrics is None:  # the latest manager (best saves carry metrics)
            saved.append((int(state.step), meta['progress']['iterator'] is not None))
        return real(mgr, state, meta, metrics, overwrite)

    monkeypatch.setattr(train_mod, 'save_checkpoint', spy)
    train_and_evaluate(run_config(data_dir, checkpoint_every_steps=2), str(tmp_path), quiet=True)
    # mid-epoch saves (with an iterator position) at steps 2 and 4; epoch ends at 3 and 6
    assert (2, True) in saved and (4, True) in saved
    assert (3, False) in saved and (6, False) in saved


def _log(workdir):
    return open(os.path.join(workdir, 'log.txt')).read()


def test_the_start_line_names_the_splits_and_a_finished_run_says_so(data_dir, tmp_path):
    c = run_config(data_dir)
    train_and_evaluate(c, str(tmp_path), quiet=True)
    # make_folders: 10 + 6 + 4 train images, 3 x 3 test images (the validation split here)
    assert '20 train / 9 val images (validation = the test split);' in _log(tmp_path)
    assert ' test images' not in _log(tmp_path)
    before = _log(tmp_path)
    train_and_evaluate(c, str(tmp_path), quiet=True)
    again = _log(tmp_path)[len(before):]
    assert 'Resumed' not in again and 'Epoch ' not in again, again
    assert f'{tmp_path} holds a finished run (2 of 2 epochs)' in again
    assert '--mode=eval' in again and '--config.num_epochs' in again
    # holdout: 20% of each class of train (2 + 1 + 1) validates, the test split is kept
    holdout = tmp_path / 'holdout'
    train_and_evaluate(run_config(data_dir, val_split='holdout'), str(holdout),
                       stop_after_steps=1, quiet=True)
    assert '16 train / 4 val (held out of train) / 9 test images;' in _log(holdout)


def test_the_eta_leaves_out_compile_time(data_dir, tmp_path, monkeypatch):
    """A first step that takes 4 s longer (as a slow compile does) must not make the ETA of
    the 3 remaining ~10 ms steps (and a validation) read seconds."""
    import time
    from cars_jax import train as T
    real = T.make_steps

    def slow_first_call(*a, **kw):
        train_fn, eval_fn = real(*a, **kw)
        calls = []

        def fn(*args):
            if not calls:
                calls.append(1)
                time.sleep(4)
            return train_fn(*args)
        return fn, eval_fn
    monkeypatch.setattr(T, 'make_steps', slow_first_call)
    train_and_evaluate(run_config(data_dir), str(tmp_path), quiet=True)
    eta = [l.split('ETA ')[1][:7] for l in _log(tmp_path).splitlines() if l.startswith('Epoch 1/')]
    h, m, s = (int(x) for x in eta[0].split(':'))
    assert h * 3600 + m * 60 + s <= 1, eta


def test_a_failed_start_removes_the_empty_workdir_it_made(tmp_path):
    from cars_jax.data.sources import DataError
    c = run_config(tmp_path / 'no_data_here')
    new = tmp_path / 'runs' / 'new'
    with pytest.raises(DataError):
        train_and_evaluate(c, str(new), quiet=True)
    assert not (tmp_path / 'runs').exists()
    existing = tmp_path / 'existing'
    existing.mkdir()
    with pytest.raises(DataError):
        train_and_evaluate(c, str(existing), quiet=True)
    assert existing.is_dir()


def test_skipped_files_are_listed_as_plain_lines(tmp_path):
    import fixtures
    data = make_colour_folders(tmp_path / 'data')
    fixtures.make_bad_image_folder(str(data / 'train' / 'class_0'))
    train_and_evaluate(run_config(data), str(tmp_path / 'run'), quiet=True)
    lines = _log(tmp_path / 'run').splitlines()
    i = lines.index(f'Skipped 3 unreadable files (list: {tmp_path}/run/skipped_files.json).')
    expected = sorted(f'  {os.path.join("train", "class_0", n)}'
                      for n in fixtures.BAD_FOLDER_UNREADABLE)
    assert sorted(l.split(':')[0] for l in lines[i + 1:i + 4]) == expected
    from cars_jax.evaluate import run_eval     # --mode=eval reports them too, as plain lines
    said = []
    run_eval(str(tmp_path / 'run'), log=said.append)
    lines = said[0].splitlines()
    assert lines[0] == 'Skipped 3 unreadable files (left out of the data):'
    assert sorted(l.split(':')[0] for l in lines[1:]) == expected


def test_an_epoch_runs_ceil_n_over_batch_steps_and_counts_every_image(data_dir, tmp_path):
    """20 train images, batch 8: the seed's DataLoader(drop_last=False) gives batches of
    8, 8, 4, i.e. ceil(20 / 8) = 3 steps per epoch, and the epoch's metrics cover 20 images."""
    c = run_config(data_dir, batch_size=8, max_steps_per_epoch=0, num_epochs=2)
    train_and_evaluate(c, str(tmp_path), quiet=True)
    rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    assert [r['step'] for r in rows] == [-(-20 // 8), 2 * -(-20 // 8)] == [3, 6]
    assert [r['train_images'] for r in rows] == [20, 20]
    assert '3 steps/epoch' in open(tmp_path / 'log.txt').read()


def test_drop_last_batch_runs_the_full_batches_only(data_dir, tmp_path):
    c = run_config(data_dir, batch_size=8, max_steps_per_epoch=0, num_epochs=1,
                   drop_last_batch=True)
    train_and_evaluate(c, str(tmp_path), quiet=True)
    rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
    assert [(r['step'], r['train_images']) for r in rows] == [(20 // 8, 16)]


def test_the_partial_last_step_is_a_plain_step_on_its_rows(data_dir, tmp_path):
    """The loop's third step of an epoch of 20 images at batch 8 trains on the 4 rows left,
    unpadded: it equals `train_step` on those 4 images, built here from the epoch's draw."""
    from cars_jax.data.augment import AugmentConfig
    from cars_jax.data.dataset import build_data
    from cars_jax.data.pipeline import TrainMap, epoch_indices
    from cars_jax.steps import mix_hyperparameters, train_step
    c = run_config(data_dir, batch_size=8, max_steps_per_epoch=0, num_epochs=1)
    train_and_evaluate(c, str(tmp_path), quiet=True)
    data = build_data(c)
    drawn = epoch_indices(data.train_labels, c.seed, 0, c.weighted_sampling)
    to_rows = TrainMap(data.train, AugmentConfig.from_config(c), c.seed, 0)
    init_rng, base_rng = jax.random.split(jax.random.PRNGKey(c.seed))
    state = create_train_state(c, init_rng, 3, steps_per_epoch=3)
    step = jax.jit(lambda s, b, r: train_step(s, b, r, **mix_hyperparameters(c)))
    for k, rows in enumerate((range(0, 8), range(8, 16), range(16, 20))):
        items = [to_rows.map(np.array([p, drawn[p]])) for p in rows]
        batch = {'image': np.stack([x['image'] for x in items]),
                 'label': np.stack([x['label'] for x in items])}
        state, _ = step(state, batch, jax.random.fold_in(base_rng, k))
    assert batch['image'].shape[0] == 4
    trained, meta = restore_latest(tmp_path, c)
    assert int(trained.step) == 3
    for a, b in zip(jax.tree.leaves((state.params, state.batch_stats)),
                    jax.tree.leaves((trained.params, trained.batch_stats))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_epoch_means_weigh_a_partial_batch_by_its_images():
    """As the seed's loop (loss * batch rows summed, over the images seen): batches of 8, 8, 4
    with mean losses 1, 2, 4 average (8 + 16 + 16) / 20 = 2.0, not (1 + 2 + 4) / 3."""
    from cars_jax.train import EpochMeter
    meter = EpochMeter()
    for loss, acc, mixed, rows in ((1.0, 0.5, 0.0, 8), (2.0, 0.25, 1.0, 8), (4.0, 1.0, 0.0, 4)):
        meter.add({'loss': loss, 'accuracy': acc, 'mixed': mixed}, images=rows, batch_size=8)
    out = meter.summary(batch_size=8)
    assert out['train_images'] == 20
    assert out['train_loss'] == pytest.approx(40 / 20)
    assert out['train_accuracy'] == pytest.approx((4 + 2 + 4) / 20)
    assert out['mixup_share'] == pytest.approx(8 / 20)
    assert out['train_accuracy_unmixed'] == pytest.approx((4 + 4) / 12)


def test_progressive_resizing_feeds_each_epoch_its_size(data_dir, tmp_path, monkeypatch):
    """3 epochs ramping 8 -> 16 px in steps of 4 over epochs 0..2: 8, 12, 16 px train images
    (validation at 16), said in the log when the size changes."""
    from cars_jax.data import pipeline
    seen, real = [], pipeline.train_epoch_dataset

    def spy(records, labels, aug, **kw):
        seen.append((kw['epoch'], aug.image_size))
        first = next(iter(real(records, labels, aug, **kw)))
        assert first['image'].shape[1:3] == (aug.image_size, aug.image_size)
        return real(records, labels, aug, **kw)

    monkeypatch.setattr(pipeline, 'train_epoch_dataset', spy)
    c = run_config(data_dir, num_epochs=3, progressive_min_size=8, progressive_end_epoch=2,
                   progressive_multiple=4)
    report = train_and_evaluate(c, str(tmp_path), quiet=True)
    assert seen == [(0, 8), (1, 12), (2, 16)]
    log = _log(tmp_path)
    for epoch, size in ((1, 8), (2, 12), (3, 16)):
        assert f'from epoch {epoch} the train images are {size} px' in log
    assert report['val']['count'] == 9


def test_a_run_distils_from_a_finished_run_of_the_same_split_only(data_dir, tmp_path):
    teacher = tmp_path / 'teacher'
    train_and_evaluate(run_config(data_dir, widths=(4, 12)), str(teacher), quiet=True)
    student = tmp_path / 'student'
    c = run_config(data_dir, distill_from=str(teacher), distill_weight=0.5)
    train_and_evaluate(c, str(student), quiet=True)
    log = _log(student)
    assert f'Distillation from the best checkpoint of {teacher}' in log
    rows = [json.loads(l) for l in open(student / 'metrics.jsonl')]
    assert len(rows) == 2 and all(np.isfinite(r['train_loss']) for r in rows)
    from cars_jax.config import ConfigError
    other = run_config(data_dir, distill_from=str(teacher), val_split='holdout')
    with pytest.raises(ConfigError, match='distill_from=.*val_split'):
        train_and_evaluate(other, str(tmp_path / 'leak'), quiet=True)
    nowhere = run_config(data_dir, distill_from=str(tmp_path / 'none'))
    with pytest.raises(FileNotFoundError, match='config.json not found'):
        train_and_evaluate(nowhere, str(tmp_path / 'x'), quiet=True)
