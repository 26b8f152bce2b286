"""main.py end to end, as a user runs it: a shortened demo with resume, and one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two stages of one block at 16 px: the same loop as the demo's net, whose train step takes
# three to four times as long to compile (most of each test's time).
TINY = ['--config.image_size=16', '--config.widths=(8,16)', '--config.stage_sizes=(1,1)',
        '--config.batch_size=16', '--config.max_steps_per_epoch=4', '--config.log_every_steps=1']


def run_main(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
    from cars_jax.data.synthetic import ensure_demo_dataset
    root = tmp_path_factory.mktemp('demo')
    ensure_demo_dataset(root, num_classes=4, train_per_class=(12, 20), test_per_class=6)
    return root


def test_demo_trains_is_interrupted_and_resumes(demo_dir, tmp_path):
    workdir = tmp_path / 'run'
    cache = tmp_path / 'xla_cache'
    args = ['--config=configs/demo.py', f'--config.data_dir={demo_dir}', f'--workdir={workdir}',
            '--config.num_epochs=2', f'--compilation_cache={cache}', *TINY]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:  # wait for the first progress line inside epoch 1
        seen.append(line)
        if 'epoch 1 step 1/' in line or time.time() > deadline:
            proc.send_signal(signal.SIGTERM)
            break
    out = ''.join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out
    assert 'SIGTERM: saved a checkpoint at step' in out and 'Run the same command again' in out
    done = run_main(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'Resumed from' in done.stdout and 'Best checkpoint: epoch' in done.stdout
    assert any(cache.iterdir()), 'the compiled steps went to --compilation_cache'
    rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows] == [1, 2]
    assert rows[-1]['step'] == 8
    report = json.load(open(workdir / 'final_report.json'))
    assert report['val']['count'] == 24
    ev = run_main('--mode=eval', f'--workdir={workdir}')
    assert ev.returncode == 0 and '[val] top-1 accuracy' in ev.stdout, ev.stderr
    assert 'pointing game' in ev.stdout and 'chance (box area share)' in ev.stdout
    for name in ('val_per_class.csv', 'val_confusion.png', 'val_per_class_accuracy.png',
                 'summary.json'):
        assert (workdir / 'eval' / name).exists(), name
    cam = run_main('--mode=gradcam', f'--workdir={workdir}')
    assert cam.returncode == 0 and (workdir / 'gradcam.png').stat().st_size > 5000, cam.stderr
    # predict: a folder with two good images and a truncated one -> reported, not a crash
    images = tmp_path / 'images'
    images.mkdir()
    good = sorted((demo_dir / 'test').glob('*/00000.jpg'))[:2]
    for i, g in enumerate(good):
        (images / f'car{i}.jpg').write_bytes(g.read_bytes())
    (images / 'broken.jpg').write_bytes(good[0].read_bytes()[:300])
    pred = run_main('--mode=predict', f'--workdir={workdir}', f'--images={images}', '--top_k=2',
                    '--tta')
    assert pred.returncode == 0, pred.stderr
    assert 'broken.jpg: UNREADABLE' in pred.stdout and '2 images predicted, 1 unreadable' in pred.stdout
    rows = (workdir / 'predictions.csv').read_text().splitlines()
    assert rows[0] == 'path,rank,class,name,probability' and len(rows) == 1 + 2 * 2 + 1
    missing = run_main('--mode=predict', f'--workdir={workdir}', f'--images={tmp_path}/none')
    assert missing.returncode == 2 and 'does not exist' in missing.stderr


@pytest.mark.parametrize('flag,needle', [
    ('--config.batch_size=0', '--config.batch_size=0 is invalid'),
    ('--config.learning_rate=-1', '--config.learning_rate=-1'),
    ('--config.batch_sz=4', 'did you mean --config.batch_size'),
    ('--config=configs/missing.py', "config file 'configs/missing.py' not found"),
    ('--config.image_size=7', '--config.image_size=7 is invalid: the last stage (stage4) would '
                              'see a single pixel; with 4 stages and stem_pool=True the smallest '
                              'is 17 px'),
])
def test_user_errors_are_one_line_without_traceback(flag, needle, tmp_path):
    r = run_main(flag, f'--workdir={tmp_path}', timeout=120)
    assert r.returncode == 2
    assert needle in r.stderr and 'Traceback' not in r.stderr
    assert len([l for l in r.stderr.splitlines() if l.startswith('error:')]) == 1


def test_missing_data_dir_says_what_layout_is_expected(tmp_path):
    r = run_main('--config=configs/base.py', f'--config.data_dir={tmp_path}/nope',
                 f'--workdir={tmp_path}/w', timeout=120)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert 'configs/demo.py' in r.stderr


@pytest.mark.parametrize('value', ['0', '-1'])
def test_a_top_k_below_1_is_a_one_line_error_naming_the_flag(value, tmp_path):
    r = run_main('--mode=predict', f'--top_k={value}', f'--images={tmp_path}',
                 f'--workdir={tmp_path}', timeout=120)
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert errors == [f'error: flag --top_k={value}: {value} is not a positive integer (see '
                      'python main.py --helpfull)'], r.stderr


def test_compilation_cache_is_off_for_several_processes_on_cpu_only():
    from cars_jax.runtime import OFF, cache_setting_for
    assert cache_setting_for('auto', multi_process=False, backend='cpu') == 'auto'
    assert cache_setting_for('/c', multi_process=True, backend='cpu') == OFF
    assert cache_setting_for('auto', multi_process=True, backend='gpu') == 'auto'
    assert cache_setting_for(OFF, multi_process=False, backend='gpu') == OFF


def test_compilation_cache_setting_names_a_folder_or_off(tmp_path, monkeypatch):
    from cars_jax.runtime import enable_compilation_cache, resolve_cache_dir
    monkeypatch.delenv('JAX_COMPILATION_CACHE_DIR', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert resolve_cache_dir('auto') == str(tmp_path / 'xdg' / 'cars_jax' / 'xla')
    monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'mine'))
    assert resolve_cache_dir('auto') == str(tmp_path / 'mine')      # the user's own wins
    assert resolve_cache_dir(str(tmp_path / 'x')) == str(tmp_path / 'x')
    assert resolve_cache_dir('off') is None and enable_compilation_cache('off') is None
    blocked = tmp_path / 'file'
    blocked.write_text('')                 # a file where the folder should be: no cache, no error
    assert enable_compilation_cache(str(blocked / 'sub')) is None


def test_cpu_xla_flags_add_the_ynn_fusions_unless_the_user_chose_or_jaxlib_is_older():
    from cars_jax.runtime import YNN_FUSION_FLAG, YNN_FUSION_TYPES, cpu_xla_flags
    ours = f'{YNN_FUSION_FLAG}={YNN_FUSION_TYPES}'
    assert cpu_xla_flags('', '0.10.2') == ours
    assert cpu_xla_flags('--xla_dump_to=/tmp/d ', '0.12.0.1') == f'--xla_dump_to=/tmp/d {ours}'
    mine = f'{YNN_FUSION_FLAG}=-eltwise'
    assert cpu_xla_flags(mine, '0.10.2') == mine          # the user's own choice wins
    assert cpu_xla_flags('', '0.9.0') == ''               # older jaxlib: flag maybe unknown


def test_pretrain_mode_then_a_run_from_its_backbone(demo_dir, tmp_path):
    """--mode=pretrain writes a backbone; --config.pretrained_backbone starts a run from it; a
    folder that holds no pretraining is a one-line error."""
    data = [f'--config.data_dir={demo_dir}', *TINY, '--config.num_epochs=1',
            '--config.max_steps_per_epoch=2', '--compilation_cache=off']
    pre = run_main('--mode=pretrain', '--config=configs/demo.py', f'--workdir={tmp_path}/pre',
                   *data)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    assert 'Pretrain epoch 1/1 | NT-Xent' in pre.stdout and 'Pretrained backbone in' in pre.stdout
    run = run_main('--config=configs/demo.py', f'--workdir={tmp_path}/run',
                   f'--config.pretrained_backbone={tmp_path}/pre', *data)
    assert run.returncode == 0, run.stdout + run.stderr
    assert 'The backbone starts from the self-supervised pretraining' in run.stdout
    bad = run_main('--config=configs/demo.py', f'--workdir={tmp_path}/bad',
                   f'--config.pretrained_backbone={tmp_path}', *data)
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr
    assert 'is not a finished pretraining run' in bad.stderr
