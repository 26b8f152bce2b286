"""Reliability: what a run does when it is killed, diverges, meets bad files, a bad
environment or a full disk. Each test backs a row of docs/reliability.md.

Training runs go through main.py in subprocesses (as a user runs it) on a tiny generated
demo set; the final weights of interrupted runs are compared bit for bit with an
uninterrupted run of the same command.
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, 'main.py')
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
# Two stages of one block at 16 px (the demo's net compiles in 3-4x the time; the loop is the same).
TINY = ['--config=configs/demo.py', '--config.image_size=16', '--config.widths=(8,16)',
        '--config.stage_sizes=(1,1)',
        '--config.batch_size=16', '--config.max_steps_per_epoch=4', '--config.num_epochs=2',
        '--config.log_every_steps=1']
NUM_CLASSES, STEPS_PER_EPOCH = 4, 4


def run_main(*args, env=None, timeout=300, python_args=()):
    return subprocess.run([sys.executable, *python_args, MAIN, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env or ENV)


def start_main(*args):
    return subprocess.Popen([sys.executable, MAIN, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV)


def read_until(proc, needle, deadline_s=240):
    """stdout lines up to and including the first one containing `needle` (the process is
    killed if it has not printed it within deadline_s)."""
    watchdog = threading.Timer(deadline_s, proc.kill)
    watchdog.start()
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if needle in line:
                break
    finally:
        watchdog.cancel()
    out = ''.join(seen)
    assert needle in out, out
    return out


def kill9_after(args, needle, delay):
    """Starts main.py, SIGKILLs it `delay` seconds after it prints `needle`."""
    proc = start_main(*args)
    out = read_until(proc, needle)
    time.sleep(delay)
    proc.kill()
    proc.wait(timeout=60)
    proc.stdout.close()
    return out


def one_error_line(r):
    lines = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(lines) == 1, r.stderr
    assert 'Traceback' not in r.stderr, r.stderr
    return lines[0]


def tiny_config(data_dir, **kw):
    from configs import demo
    c = demo.get_config()
    c.data_dir, c.image_size, c.widths, c.batch_size = str(data_dir), 16, (8, 16), 16
    c.stage_sizes = (1, 1)
    c.max_steps_per_epoch, c.num_epochs, c.log_every_steps = 4, 2, 1
    for k, v in kw.items():
        c[k] = v
    return c


def restore(workdir, data_dir, which='latest', step=None):
    from cars_jax.checkpoints import checkpoint_managers, restore_checkpoint
    from cars_jax.steps import create_train_state
    latest, best = checkpoint_managers(str(workdir))
    try:
        mgr = latest if which == 'latest' else best
        template = create_train_state(tiny_config(data_dir), jax.random.PRNGKey(9), NUM_CLASSES,
                                      STEPS_PER_EPOCH)
        return restore_checkpoint(mgr, template, step)
    finally:
        latest.close()
        best.close()


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats,
                                                     state.opt_state))]


def all_finite(state):
    return all(np.isfinite(x).all() for x in leaves(state))


def assert_every_checkpoint_restores(workdir, data_dir):
    """Every step folder under latest/ and best/ restores; nothing else is left there."""
    for which in ('latest', 'best'):
        d = os.path.join(workdir, 'checkpoints', which)
        names = sorted(os.listdir(d))
        assert names and all(n.isdigit() for n in names), (which, names)
        for n in names:
            state, _ = restore(workdir, data_dir, which, int(n))
            assert int(state.step) == int(n) and all_finite(state)


@pytest.fixture(scope='module')
def demo_dir(tmp_path_factory):
    from cars_jax.data.synthetic import ensure_demo_dataset
    root = tmp_path_factory.mktemp('demo')
    ensure_demo_dataset(root, num_classes=NUM_CLASSES, train_per_class=(12, 20), test_per_class=6)
    return root


@pytest.fixture(scope='module')
def reference(demo_dir, tmp_path_factory):
    """An uninterrupted run of the command the kill test interrupts."""
    workdir = tmp_path_factory.mktemp('reference') / 'run'
    r = run_main(*TINY, f'--config.data_dir={demo_dir}', f'--workdir={workdir}',
                 '--config.checkpoint_every_steps=1')
    assert r.returncode == 0, r.stdout + r.stderr
    return workdir


# ---- 1. kill -9 anywhere -------------------------------------------------------------------

def test_kill9_anywhere_then_rerun_gives_bit_identical_weights(demo_dir, reference, tmp_path):
    rng = random.Random(0)
    workdir = tmp_path / 'run'
    args = [*TINY, f'--config.data_dir={demo_dir}', f'--workdir={workdir}',
            '--config.checkpoint_every_steps=1']   # a save after every step: kills hit saves
    # a) in the middle of epoch 1, while the save of that step is being written
    kill9_after(args, 'epoch 1 step 2/4', rng.uniform(0, 0.05))
    # b) after the epoch-1 line: metrics.jsonl has its row; best and latest saves in flight
    kill9_after(args, 'Epoch 1/2', rng.uniform(0, 0.05))
    # leftovers of other kills: a torn Orbax temp folder, and (as a kill in the middle of a
    # delete would leave) a torn newest step
    latest = workdir / 'checkpoints' / 'latest'
    (latest / '99.orbax-checkpoint-tmp-1234' / 'state').mkdir(parents=True)
    (latest / '99.orbax-checkpoint-tmp-1234' / 'state' / 'junk').write_bytes(b'\0' * 10)
    finished = sorted(int(n) for n in os.listdir(latest) if n.isdigit())
    # Tear the newest only where an older one is left: kill b) can land inside the end-of-epoch
    # replacement of the same step, which leaves a single finished step for a moment (two
    # independent faults at once are out of scope). The usual case has two finished steps.
    newest = finished[-1] if len(finished) >= 2 else None
    if newest is not None:
        shutil.rmtree(latest / str(newest) / 'state' / 'd')
    # c) at a seeded random moment in epoch 2
    out = kill9_after(args, 'epoch 2 step 1/4', rng.uniform(0, 0.5))
    if newest is not None:
        assert 'skipped unreadable checkpoint(s)' in out and f'step {newest}:' in out
    done = run_main(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'Resumed from' in done.stdout

    a, _ = restore(reference, demo_dir)
    b, meta = restore(workdir, demo_dir)
    assert int(a.step) == int(b.step) == 2 * STEPS_PER_EPOCH and meta['progress']['finished']
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    rows_a = [json.loads(l) for l in open(reference / 'metrics.jsonl')]
    rows_b = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
    assert [r['epoch'] for r in rows_b] == [1, 2]            # no duplicated rows
    assert [r['val_loss'] for r in rows_a] == [r['val_loss'] for r in rows_b]
    assert_every_checkpoint_restores(workdir, demo_dir)      # temp folder cleaned, none torn


def test_same_seed_same_machine_gives_the_same_run_and_another_seed_does_not(demo_dir, reference,
                                                                           tmp_path):
    """The README's determinism claim: the same command in a fresh process (same machine,
    same seed) gives the same weights and metrics bit for bit; another seed does not."""
    def fingerprint(workdir):
        rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
        return leaves(restore(workdir, demo_dir)[0]), [
            (r['train_loss'], r['val_loss'], r['val_accuracy']) for r in rows]

    def run(workdir, *extra):
        r = run_main(*TINY, f'--config.data_dir={demo_dir}', f'--workdir={workdir}',
                     '--config.checkpoint_every_steps=1', *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        return fingerprint(workdir)

    ref_weights, ref_rows = fingerprint(reference)
    weights, rows = run(tmp_path / 'again')
    assert rows == ref_rows
    for x, y in zip(weights, ref_weights, strict=True):
        np.testing.assert_array_equal(x, y)
    assert run(tmp_path / 'seed1', '--config.seed=1')[1] != ref_rows


def test_replacing_a_checkpoint_never_leaves_a_torn_step(demo_dir, tmp_path, monkeypatch):
    """The end-of-epoch save replaces a mid-epoch one of the same step; a kill during that
    delete must leave the old step renamed away (an Orbax temp name), never half deleted."""
    from cars_jax import checkpoints
    from cars_jax.steps import create_train_state
    state = create_train_state(tiny_config(demo_dir), jax.random.PRNGKey(0), NUM_CLASSES,
                               STEPS_PER_EPOCH)
    latest, best = checkpoints.checkpoint_managers(str(tmp_path))
    for step in (3, 4):
        checkpoints.save_checkpoint(latest, state.replace(step=step), {'mid_epoch': True})
    latest.wait_until_finished()

    def killed_midway(path, *a, **k):   # deletes one file, then "the process dies"
        for root, _, files in os.walk(path):
            if files:
                os.remove(os.path.join(root, files[0]))
                break
        raise KeyboardInterrupt('killed')

    monkeypatch.setattr(shutil, 'rmtree', killed_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_checkpoint(latest, state.replace(step=4), {'mid_epoch': False},
                                    overwrite=True)
    monkeypatch.undo()
    latest.close(), best.close()
    assert sorted(os.listdir(tmp_path / 'checkpoints' / 'latest')) == [
        '3', '4.orbax-checkpoint-tmp-deleted']
    restored, meta = restore(tmp_path, demo_dir)             # reopening cleans the temp folder
    assert int(restored.step) == 3 and meta == {'mid_epoch': True}
    assert sorted(os.listdir(tmp_path / 'checkpoints' / 'latest')) == ['3']


def test_eval_mode_reads_a_one_epoch_run(demo_dir, tmp_path):
    """--mode=eval rebuilds the state around the best checkpoint; a 1-epoch run (a one-cycle of
    a few steps) must not make that template's schedule invalid."""
    workdir = tmp_path / 'one'
    r = run_main(*TINY, '--config.num_epochs=1', f'--config.data_dir={demo_dir}',
                 f'--workdir={workdir}')
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_main('--mode=eval', f'--workdir={workdir}')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'top-1' in r.stdout


# ---- 2. Ctrl-C and SIGTERM -----------------------------------------------------------------

@pytest.mark.parametrize('sig,name', [(signal.SIGINT, 'Ctrl-C'), (signal.SIGTERM, 'SIGTERM')])
def test_ctrl_c_and_sigterm_save_within_seconds_and_exit_0(demo_dir, tmp_path, sig, name):
    workdir = tmp_path / 'run'
    proc = start_main(*TINY, f'--config.data_dir={demo_dir}', f'--workdir={workdir}')
    out = read_until(proc, 'epoch 1 step 1/')
    t0 = time.time()
    proc.send_signal(sig)
    out += proc.communicate(timeout=120)[0]
    elapsed = time.time() - t0
    assert proc.returncode == 0, out
    m = re.search(rf'{name}: saved a checkpoint at step (\d+) in .*Run the same command again '
                  'to resume', out)
    assert m, out
    assert elapsed < 15, f'took {elapsed:.1f}s to save and exit'
    state, meta = restore(workdir, demo_dir)
    assert int(state.step) == int(m[1]) and meta['progress']['iterator'] is not None


def test_ctrl_c_with_the_console_pipe_closed_saves_logs_and_exits_0(demo_dir, tmp_path):
    """`python main.py ... | head`: the reader has gone when Ctrl-C comes (or `| tee`, which
    the same Ctrl-C kills). The progress lines after that and the final save line must not
    raise BrokenPipeError; the save line still reaches log.txt."""
    workdir = tmp_path / 'run'
    with open(tmp_path / 'stderr.txt', 'w') as err:
        # 100 epochs (the last flag wins), so the run is still training when the signal comes
        # after the pause below, however fast the machine: the tiny default is 8 steps
        proc = subprocess.Popen([sys.executable, MAIN, *TINY, '--config.num_epochs=100',
                                 f'--config.data_dir={demo_dir}', f'--workdir={workdir}'],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        read_until(proc, 'epoch 1 step 1/')
        proc.stdout.close()                 # the reader exits: writes now get EPIPE
        time.sleep(2)                       # a few more progress lines hit the closed pipe
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    stderr = (tmp_path / 'stderr.txt').read_text()
    assert proc.returncode == 0, stderr
    assert 'Traceback' not in stderr and 'BrokenPipeError' not in stderr, stderr
    m = re.search(r'Ctrl-C: saved a checkpoint at step (\d+) in .*Run the same command again',
                  (workdir / 'log.txt').read_text())
    assert m, (workdir / 'log.txt').read_text()
    state, _ = restore(workdir, demo_dir)
    assert int(state.step) == int(m[1])


# ---- 3. NaN / Inf --------------------------------------------------------------------------

def test_divergence_stops_with_one_line_and_keeps_finite_checkpoints(demo_dir, tmp_path):
    """Five normal steps (epoch 1 -> best checkpoint), then the run is resumed with
    learning_rate=1e12: AdamW makes the weights ~1e11 in one step and the next loss or
    gradient overflows."""
    from cars_jax.train import train_and_evaluate
    workdir = tmp_path / 'run'
    out = train_and_evaluate(tiny_config(demo_dir), str(workdir), stop_after_steps=5,
                             quiet=True)
    assert out == {'interrupted': True, 'step': 5}
    r = run_main(*TINY, f'--config.data_dir={demo_dir}', f'--workdir={workdir}',
                 '--config.learning_rate=1e12')
    assert r.returncode == 2, r.stdout + r.stderr
    line = one_error_line(r)
    m = re.search(r'Non-finite loss or gradient at step (\d+) \(epoch 2, .*Batch files '
                  r"\(first 8\): \['train/.*\.jpg'.*Last good checkpoint: step 5 in "
                  r'.*checkpoints/latest; best: step 4 in .*checkpoints/best', line)
    assert m and int(m[1]) >= 5, line
    best, _ = restore(workdir, demo_dir, 'best')
    last, _ = restore(workdir, demo_dir, 'latest')
    assert int(best.step) == 4 and all_finite(best)
    assert int(last.step) == 5 and all_finite(last)


def test_nonfinite_validation_loss_is_never_checkpointed(demo_dir, tmp_path):
    """One step at learning_rate=1e12 leaves finite but useless weights (val loss NaN): the
    epoch must not end in a checkpoint that a rerun would resume from."""
    from cars_jax.checkpoints import checkpoint_managers
    from cars_jax.train import TrainingError, train_and_evaluate
    config = tiny_config(demo_dir, learning_rate=1e12, max_steps_per_epoch=1)
    with pytest.raises(TrainingError, match=r'Non-finite validation loss \((nan|inf)\) after epoch 1 '
                                            r'\(step 1\).*Last good checkpoint: none yet'):
        train_and_evaluate(config, str(tmp_path), quiet=True)
    latest, best = checkpoint_managers(str(tmp_path))
    assert latest.all_steps() == [] and best.all_steps() == []
    latest.close(), best.close()


# ---- 4. bad data through the CLI -----------------------------------------------------------

def _bad_tree(root):
    fixtures.make_image_folders(root, train={'a': 6, 'b': 6, 'c': 6},
                                test={'a': 2, 'b': 2, 'c': 0}, size=(40, 30))
    fixtures.make_bad_image_folder(os.path.join(root, 'train', 'a'))
    with open(os.path.join(root, 'train', '.DS_Store'), 'wb') as f:
        f.write(b'\0\0\0\1Bud1')
    return root


def test_bad_files_are_skipped_listed_and_training_completes(tmp_path):
    data = _bad_tree(str(tmp_path / 'data'))
    workdir = tmp_path / 'run'
    r = run_main(*TINY, '--config.data_source=folders', f'--config.data_dir={data}',
                 f'--workdir={workdir}', '--config.batch_size=4', '--config.num_epochs=1',
                 '--config.max_steps_per_epoch=3')
    assert r.returncode == 0, r.stdout + r.stderr
    skipped = json.load(open(workdir / 'skipped_files.json'))
    assert sorted(os.path.basename(k) for k, _ in skipped) == sorted(
        fixtures.BAD_FOLDER_UNREADABLE)
    msg = f'Skipped 3 unreadable files (list: {workdir}/skipped_files.json).'
    assert msg in r.stdout and msg in open(workdir / 'log.txt').read()
    assert 'Best checkpoint: epoch 1' in r.stdout
    # the odd-but-valid files (RGBA, CMYK, 16-bit, palette, ...) are used: 6 + 10 in 'a'
    assert '28 train / 4 val' in r.stdout, r.stdout


def test_a_class_only_in_test_is_a_one_line_layout_error(tmp_path):
    data = _bad_tree(str(tmp_path / 'data'))
    os.makedirs(os.path.join(data, 'test', 'zz_only_in_test'))
    r = run_main(*TINY, '--config.data_source=folders', f'--config.data_dir={data}',
                 f'--workdir={tmp_path}/run')
    assert r.returncode == 2
    line = one_error_line(r)
    assert "only in test: 'zz_only_in_test'" in line and 'same class folders' in line


# ---- 5. bad environment --------------------------------------------------------------------

def test_unwritable_workdir_is_a_one_line_error(demo_dir, tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    workdirs = [blocker / 'sub']                # works as root too
    if os.geteuid() != 0:                       # root ignores permission bits
        ro = tmp_path / 'read_only'
        ro.mkdir()
        ro.chmod(0o500)
        workdirs.append(ro)
    for workdir in workdirs:
        r = run_main(*TINY, f'--config.data_dir={demo_dir}', f'--workdir={workdir}')
        assert r.returncode == 2
        line = one_error_line(r)
        assert f'cannot write the run directory --workdir={workdir}' in line
        assert 'pass a writable --workdir' in line


def test_workdir_of_another_config_is_a_one_line_error_naming_the_field(demo_dir, reference):
    before = sorted(os.listdir(reference))
    # (replaced, not appended: a tuple field given twice is concatenated by the flag parser)
    args = [a if not a.startswith('--config.widths=') else '--config.widths=(8,32)'
            for a in TINY]
    r = run_main(*args, f'--config.data_dir={demo_dir}', f'--workdir={reference}')
    assert r.returncode == 2
    line = one_error_line(r)
    assert 'widths: checkpoint has [8, 16], now [8, 32]' in line
    assert 'Use a new --workdir' in line
    assert sorted(os.listdir(reference)) == before


def test_unknown_config_field_is_a_one_line_error(tmp_path):
    r = run_main(*TINY, '--config.no_such_field=1', f'--workdir={tmp_path}')
    assert r.returncode == 2
    line = one_error_line(r)
    assert 'unknown config field --config.no_such_field' in line and 'configs/base.py' in line


def test_missing_images_path_is_a_one_line_error(reference, tmp_path):
    r = run_main('--mode=gradcam', f'--workdir={reference}', f'--images={tmp_path}/nope')
    assert r.returncode == 2
    assert f'--images={tmp_path}/nope does not exist' in one_error_line(r)


def test_missing_torch_is_a_one_line_error_and_verbose_shows_the_traceback(demo_dir, tmp_path):
    shim = tmp_path / 'shim'
    shim.mkdir()
    (shim / 'torch.py').write_text("raise ImportError('No module named torch (test shim)')\n")
    env = {**ENV, 'PYTHONPATH': os.pathsep.join([str(shim), ENV.get('PYTHONPATH', '')])}
    args = ['--mode=eval', f'--init_from={tmp_path}/seed.pt', f'--workdir={tmp_path}/run',
            *TINY, f'--config.data_dir={demo_dir}']
    r = run_main(*args, env=env)
    assert r.returncode == 2
    line = one_error_line(r)
    assert 'needs torch' in line and 'pip install torch' in line
    v = run_main(*args, '--verbose', env=env)
    assert v.returncode == 2 and 'Traceback' in v.stderr and 'test shim' in v.stderr


# ---- 6. a full disk ------------------------------------------------------------------------

# main.py with Orbax's file writes failing with ENOSPC from the checkpoint of step 5 on.
_DISK_FULL_FROM_STEP_5 = r'''
import errno, os, re, runpy, sys
from etils import epath
cls = type(epath.Path('/'))
real_open = cls.open
def full_disk_open(self, mode='r', **kw):
    m = re.search(r'/checkpoints/(?:latest|best)/(\d+)', os.fspath(self))
    if m and int(m[1]) >= 5 and ('w' in mode or 'a' in mode):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
    return real_open(self, mode, **kw)
cls.open = full_disk_open
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def test_full_disk_is_a_clear_error_and_the_last_checkpoint_is_intact(demo_dir, tmp_path):
    workdir = tmp_path / 'run'
    r = subprocess.run([sys.executable, '-c', _DISK_FULL_FROM_STEP_5, MAIN, *TINY,
                        f'--config.data_dir={demo_dir}', f'--workdir={workdir}',
                        '--config.checkpoint_every_steps=1'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 2, r.stdout + r.stderr
    line = [one_error_line(r)]
    assert r.stderr.rstrip().splitlines()[-1] == line[0]    # the last word, not buried
    assert re.search(r'error: the disk is full \(No space left on device\) writing '
                     rf'{workdir}/checkpoints/latest/5\S*.*Free space there.*run the same '
                     rf'command again: the finished checkpoints in {workdir}/checkpoints are '
                     'intact', line[0]), line[0]
    state, _ = restore(workdir, demo_dir)
    assert int(state.step) == 4 and all_finite(state)
    assert_every_checkpoint_restores(workdir, demo_dir)


_MUTE_AFTER_FIRST_DISK_FULL_RECORD = r'''
import errno, logging, os, sys, threading
from cars_jax.console import MuteOnDiskFull
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter('E %(message)s'))
handler.addFilter(MuteOnDiskFull(handler))
log = logging.getLogger('orbax-like')
log.addHandler(handler)
log.propagate = False
log.error('saved step 4')                                       # not about the disk: shown
log.error('Failed to write: [Errno 28] No space left on device: /w/5\nsecond line')
log.error('a later error line')                                 # muted
t = threading.Thread(target=lambda: print('Traceback (most recent call last):', file=sys.stderr))
t.start(); t.join()                                             # a save thread's page: muted
os.write(2, b'Traceback from C++\n')                            # fd 2 itself: muted
'''


def test_the_first_disk_full_log_record_mutes_stderr_before_the_loop_sees_the_error():
    """Orbax's save threads log a full disk (and print tracebacks) before the training loop
    sees the failed save; the first such record must mute stderr then and there (CI once
    caught pages of 'Event loop is closed' tracebacks in that window)."""
    r = subprocess.run([sys.executable, '-c', _MUTE_AFTER_FIRST_DISK_FULL_RECORD], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [
        'E saved step 4', 'E Failed to write: [Errno 28] No space left on device: /w/5'], r.stderr
