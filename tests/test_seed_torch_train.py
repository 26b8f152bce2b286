"""benchmarks/seed_torch_train.py: the seed's PyTorch loop on a cars_jax config's data and split.

A tiny image-folder set of 3 classes (6, 6, 4 images) and --config.val_fraction 0.2 gives a
stratified holdout of 1 image per class: 13 train / 3 val. With batch 8 an epoch is
ceil(13 / 8) = 2 steps under drop_last=False (13 // 8 = 1 would mean drop_last=True).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import subprocess
import sys

import pytest

import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'seed_torch_train.py')
HAS_TORCH = importlib.util.find_spec('torch') is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason='torch is not installed')

LR, DIV, FINAL_DIV, PCT, BATCH, EPOCHS, MIXUP_PROB, SEED = 1e-3, 25.0, 1e4, 0.5, 8, 2, 0.5, 0
OVERRIDES = {'data_source': 'folders', 'val_split': 'holdout', 'val_fraction': 0.2,
             'num_classes': 0, 'seed': SEED, 'widths': (8, 8, 16, 16), 'image_size': 32,
             'batch_size': BATCH, 'learning_rate': LR, 'div_factor': DIV,
             'final_div_factor': FINAL_DIV, 'pct_start': PCT, 'mixup_prob': MIXUP_PROB}


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


def _config(data_dir: str):
    from configs import base
    c = base.get_config()
    c.data_dir = data_dir
    for k, v in OVERRIDES.items():
        setattr(c, k, v)
    return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('seed_torch')
    data = fixtures.make_image_folders(str(tmp / 'data'), {'a': 6, 'b': 6, 'c': 4},
                                       size=(40, 30))
    workdir = str(tmp / 'run')
    args = [f'--config={os.path.join(ROOT, "configs", "base.py")}', f'--config.data_dir={data}',
            f'--workdir={workdir}', '--epochs', str(EPOCHS), '--num_workers', '1',
            '--threads', '1']
    args += [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    report = json.load(open(os.path.join(workdir, 'final_report.json')))
    return {'data': data, 'workdir': workdir, 'stdout': proc.stdout, 'rows': rows,
            'report': report}


@needs_torch
def test_split_is_cars_jax_own(run):
    from cars_jax.data.dataset import build_data
    bundle = build_data(_config(run['data']))
    split = json.load(open(os.path.join(run['workdir'], 'split.json')))
    assert split['train'] == [r.key for r in bundle.train]
    assert split['val'] == [r.key for r in bundle.val]
    assert (len(split['train']), len(split['val'])) == (13, 3)
    assert not set(split['train']) & set(split['val'])


@needs_torch
def test_metrics_rows_and_steps(run):
    rows, n_train = run['rows'], 13
    assert [r['epoch'] for r in rows] == [1, 2]
    steps = math.ceil(n_train / BATCH)           # drop_last=False
    assert steps == 2 and n_train // BATCH == 1
    for r in rows:
        assert r['steps'] == steps
        assert r['images'] == n_train            # the last batch is the short one
        for k in ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'val_top5',
                  'lr', 'img_per_s', 'train_time_s', 'val_time_s', 'epoch_wall_s'):
            assert math.isfinite(r[k]), k
        assert 0 <= r['val_accuracy'] <= r['val_top5'] == 1.0   # 3 classes: top-5 is all
        assert r['epoch_wall_s'] >= r['train_time_s']
    # MixUp on the batches where the notebook's `random.random() < mixup_prob` holds, with
    # Python's random seeded from config.seed.
    gen = random.Random(SEED)
    gates = [gen.random() < MIXUP_PROB for _ in range(EPOCHS * steps)]
    assert [r['mixed_batches'] for r in rows] == [sum(gates[:steps]), sum(gates[steps:])]
    assert 'Epoch 2/2 | train loss' in run['stdout']


@needs_torch
def test_onecycle_lr(run):
    rows = run['rows']
    # PyTorch's OneCycleLR (two phases, cos): warm-up ends at step pct*total - 1 = 1 of
    # total = 4; step 0 runs at max_lr / div_factor, step 2 half way down the cosine from
    # max_lr to max_lr / div_factor / final_div_factor.
    total = EPOCHS * rows[0]['steps']
    assert PCT * total - 1 == 1
    assert rows[0]['lr_first'] == pytest.approx(LR / DIV, rel=1e-9)
    low = LR / DIV / FINAL_DIV
    halfway = low + (LR - low) * (1 + math.cos(math.pi * 0.5)) / 2
    assert rows[1]['lr_first'] == pytest.approx(halfway, rel=1e-9)


@needs_torch
def test_final_report_and_best_weights(run):
    import torch
    rep, rows = run['report'], run['rows']
    assert rep['epochs_run'] == 2 and not rep['interrupted']
    assert rows[0]['improved']                     # any val loss improves on inf
    assert rep['best_epoch'] == max(r['epoch'] for r in rows if r['improved'])
    row = rows[rep['best_epoch'] - 1]
    assert rep['best_val_loss'] == row['val_loss'] == min(r['val_loss'] for r in rows
                                                          if r['improved'])
    assert rep['best_val_accuracy'] == row['val_accuracy']
    assert rep['best_val_top5'] == row['val_top5']
    assert rep['steps_per_epoch'] == 2 and rep['train_images'] == 13
    assert rep['torch_version'] == torch.__version__
    assert rep['machine']['torch_threads'] == 1 and rep['total_wall_s'] > 0
    state = torch.load(os.path.join(run['workdir'], rep['best_weights']))
    assert state['fc.weight'].shape == (3, 16)


def test_missing_torch_is_one_line(tmp_path):
    shim = tmp_path / 'shim'
    shim.mkdir()
    (shim / 'torch.py').write_text('raise ImportError("no torch here")\n')
    path = os.pathsep.join([str(shim), os.environ.get('PYTHONPATH', '')])
    env = dict(os.environ, PYTHONPATH=path)
    proc = _run([f'--config={os.path.join(ROOT, "configs", "base.py")}',
                 f'--config.data_dir={tmp_path}', f'--workdir={tmp_path / "run"}'], env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith('error: torch is not installed')
    assert len(proc.stderr.strip().splitlines()) == 1


@needs_torch
def test_missing_data_dir_is_one_line(tmp_path):
    proc = _run([f'--config={os.path.join(ROOT, "configs", "base.py")}',
                 '--config.data_source=devkit', f'--config.data_dir={tmp_path / "nowhere"}',
                 f'--workdir={tmp_path / "run"}'])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: data directory '{tmp_path / 'nowhere'}' not found "
        '(--config.data_dir, data_source=devkit).']
