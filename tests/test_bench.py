"""benchmarks/bench.py's functions at tiny sizes: result structure, positive rates, the ratio
arithmetic, and the PyTorch rows present exactly when torch imports. No speed is asserted.
benchmarks/seed_torch.py: the seed's PyTorch network is the seed's."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import bench, seed_torch
from cars_jax.data.sources import Record

TORCH = seed_torch.import_torch() is not None
TINY_NET = dict(widths=(4, 8), stage_sizes=(1, 1))


def _records(n=40, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return [Record(image=rng.integers(0, 256, (int(rng.integers(20, 40)),
                                               int(rng.integers(20, 40)), 3), dtype=np.uint8),
                   label=i % classes, key=f'{i}') for i in range(n)]


def _close(a, b):
    return math.isclose(a, b, rel_tol=1e-9)


@pytest.fixture(scope='module')
def loader_results():
    # torch rows first in run_loader (DataLoader forks before XLA starts threads)
    return bench.run_loader('', 16, 8, 2, 2, [0], torch_workers=(0, 1), records=_records())


def test_loader_rows_and_ratios(loader_results):
    r = loader_results
    assert r['images_timed'] == 16 and r['data_dir'] == '(in-memory records)'
    names = [row['pipeline'] for row in r['rows']]
    assert names[0].startswith('plain Python loop')
    assert any(n.startswith('grain, num_workers=0') for n in names)
    assert any(n.startswith('decode-once cache 18px') for n in names)   # round(16 * 8/7)
    assert any('jitted device augmentation' in n and 'this CPU' in n for n in names)
    base = r['rows'][0]['images_per_s']
    for row in r['rows']:
        assert row['images_per_s'] > 0 and row['cores'] >= 1
        assert _close(row['ratio'], row['images_per_s'] / base)
        assert _close(row['images_per_s_per_core'], row['images_per_s'] / row['cores'])
    assert r['cache_build_s'] > 0 and r['cache_size'] == 18
    assert r['device_augment']['backend'] == 'cpu' and r['device_augment']['compile_s'] > 0
    torch_rows = [row for row in r['rows'] if row['pipeline'].startswith('torch DataLoader')]
    assert (len(torch_rows) == 2) == TORCH
    assert all(('vs_torch' in row) == TORCH for row in r['rows'])
    bench.print_table(r)


def test_loader_torch_baseline(loader_results):
    pytest.importorskip('torch')
    r = loader_results
    torch_rows = [row for row in r['rows'] if row['pipeline'].startswith('torch DataLoader')]
    assert [row['pipeline'].rsplit('=', 1)[1] for row in torch_rows] == ['0', '1']
    assert [row['cores'] for row in torch_rows] == [1, 1]
    label = torch_rows[0]['pipeline']
    if seed_torch.import_torchvision_transforms() is None:
        assert 'cars_jax numpy/PIL port; torchvision not installed' in label
    tbase = torch_rows[0]['images_per_s']
    assert r['torch_baseline'] == label and _close(torch_rows[0]['vs_torch'], 1.0)
    for row in r['rows']:
        assert _close(row['vs_torch'], row['images_per_s'] / tbase)


def test_loader_without_torch_prints_a_note():
    r = bench.run_loader('', 16, 8, 1, 1, [], torch_workers=(0,), records=_records(16),
                         use_torch=False)
    assert not any('torch' in row['pipeline'] for row in r['rows'])
    assert 'vs_torch' not in r['rows'][0] and 'skipped' in r['notes'][0]


def test_step_rows_and_ratios():
    r = bench.run_step(16, 4, 2, 2, ['xla'], num_classes=5, **TINY_NET)
    jax_rows = [row for row in r['rows'] if row['framework'] == 'jax']
    assert [row['conv_impl'] for row in jax_rows] == ['xla']
    torch_rows = [row for row in r['rows'] if row['framework'] != 'jax']
    assert len(torch_rows) == int(TORCH)
    base = r['rows'][0]['train_images_per_s']
    for row in r['rows']:
        assert row['train_images_per_s'] > 0 and row['eval_images_per_s'] > 0
        for key in ('train', 'eval'):          # the median of 2 repeats lies in their range
            lo, hi = row[f'{key}_range']
            assert 0 < lo <= row[f'{key}_images_per_s'] <= hi
        assert _close(row['ratio'], row['train_images_per_s'] / base)
        assert ('vs_pytorch' in row) == TORCH
    if TORCH:
        t = torch_rows[0]
        assert t['framework'].startswith('PyTorch') and 'threads' in t['conv_impl']
        for row in r['rows']:
            assert _close(row['vs_pytorch'], row['train_images_per_s'] / t['train_images_per_s'])
            assert _close(row['eval_vs_pytorch'],
                          row['eval_images_per_s'] / t['eval_images_per_s'])
    else:
        assert 'skipped' in r['notes'][0]
    bench.print_step_table(r)


def test_cpu_settings_run_in_their_own_process_and_the_numerics_check_can_fail(monkeypatch):
    """Each setting runs in a child with its XLA_FLAGS; the YNNPACK fusions (the CPU default of
    main.py) keep the baseline's 20-step losses and augmentation, bf16 moves the losses past the
    tolerance and XLA:CPU's fast-compile preset the device augmentation (a program it compiles
    wrongly: one child with both, to save a compile), and an unknown XLA flag is a row with the
    child's error, not a crash."""
    from benchmarks import cpu_settings
    fast_flags = cpu_settings.SETTINGS['auto+fast_compile'][0]
    monkeypatch.setitem(cpu_settings.SETTINGS, 'auto+bf16+fast_compile',
                        (fast_flags, cpu_settings.SETTINGS['auto+bf16'][1]))
    settings = ['xla', 'auto+no_ynn_conv', 'auto+bf16+fast_compile']
    r = bench.run_cpu([16], settings, 4, 2, 2, num_classes=3, use_torch=False, **TINY_NET)
    rows = r['sizes']['16']
    assert list(rows) == settings and 'pytorch' not in rows
    assert rows['auto+no_ynn_conv']['xla_flags'].endswith(cpu_settings.SETTINGS['auto+no_ynn_conv'][0])
    assert rows['xla']['max_loss_diff'] == 0.0 and rows['xla']['max_augment_diff'] == 0.0
    assert len(rows['xla']['check_losses']) == cpu_settings.CHECK_STEPS
    assert rows['auto+no_ynn_conv']['max_loss_diff'] <= cpu_settings.LOSS_ATOL
    assert rows['auto+no_ynn_conv']['max_augment_diff'] <= cpu_settings.AUGMENT_ATOL
    assert rows['auto+bf16+fast_compile']['max_loss_diff'] > cpu_settings.LOSS_ATOL
    assert rows['auto+bf16+fast_compile']['max_augment_diff'] > cpu_settings.AUGMENT_ATOL
    bench.print_cpu_table(r)
    monkeypatch.setitem(cpu_settings.SETTINGS, '_bad', ('--xla_cpu_no_such_flag=1', {}))
    row = cpu_settings.run_child('_bad', 16, 4, 1, 1, TINY_NET['widths'],
                                 TINY_NET['stage_sizes'], 3)
    assert 'error' in row and row['error']
    with pytest.raises(ValueError, match='unknown --settings'):
        bench.run_cpu([16], ['nope'], 4, 1, 1, use_torch=False, **TINY_NET)


def test_conv_passes_cover_every_seed_conv_shape():
    from benchmarks.cpu_settings import conv_pass_times, seed_conv_layers
    from cars_jax.model import stage_map_sizes
    layers = seed_conv_layers(64)
    assert [l[0] for l in layers][:2] == ['stem 7x7/2', 'stage1 3x3'] and len(layers) == 8
    # each stage's repeated conv works at the map size the model computes
    assert [l[1] for l in layers if l[0].endswith(' 3x3')] == stage_map_sizes(64, 4)
    rows = conv_pass_times(16, batch_size=2, repeats=1)
    stem = rows[0]
    assert (stem['input'], stem['output']) == (16, 8)
    assert math.isclose(stem['gflop'], 2 * 2 * 8 * 8 * 7 * 7 * 3 * 64 / 1e9)
    for r in rows:
        for form in ('xla', 'matmul'):
            for p in ('forward', 'input_grad', 'weight_grad'):
                assert r[f'{form}_{p}_ms'] > 0


def test_conv_counts_are_the_nets_3x3_and_7x7_convs():
    """Against the parameters of the seed's net: the kernels of each layer's shape (each
    shape belongs to one layer of the list) number `seed_conv_counts` (17 in ResNet-18)."""
    import jax
    from benchmarks.cpu_settings import seed_conv_counts, seed_conv_layers
    from cars_jax.model import ResNet
    shapes = jax.eval_shape(ResNet(num_classes=10).init, jax.random.key(0),
                            jax.numpy.zeros((1, 64, 64, 3)))['params']
    kernels = [v.shape for v in jax.tree.leaves(shapes) if len(v.shape) == 4 and v.shape[0] > 1]
    counts = seed_conv_counts()
    assert sum(counts) == len(kernels) == 17
    for (name, _, cin, cout, k, _, _), n in zip(seed_conv_layers(64), counts):
        assert kernels.count((k, k, cin, cout)) == n, name


def test_conv_totals_weigh_each_layer_by_its_count_without_the_stems_input_grad():
    rows = [{'layer': 'stem 7x7/2', 'count': 1, 'xla_forward_ms': 2.0, 'xla_input_grad_ms': 9.0,
             'xla_weight_grad_ms': 3.0},
            {'layer': 'stage1 3x3', 'count': 4, 'xla_forward_ms': 1.0, 'xla_input_grad_ms': 1.5,
             'xla_weight_grad_ms': 2.5}]
    assert bench.conv_pass_totals(rows, 'xla') == {'forward': 6.0, 'input_grad': 6.0,
                                                   'weight_grad': 13.0}
    # 'auto' on this CPU: lax.conv on the 8x8 stem output, the matmul form on the 2x2 map
    rows[0].update(output=8, matmul_forward_ms=50.0, matmul_input_grad_ms=50.0,
                   matmul_weight_grad_ms=50.0)
    rows[1].update(output=2, matmul_forward_ms=0.5, matmul_input_grad_ms=0.25,
                   matmul_weight_grad_ms=1.0)
    assert bench.conv_pass_totals(rows, 'auto') == {'forward': 4.0, 'input_grad': 1.0,
                                                    'weight_grad': 7.0}


def test_torch_conv_passes_time_every_layer():
    torch = pytest.importorskip('torch')
    from benchmarks.cpu_settings import seed_conv_layers
    rows = seed_torch.torch_conv_pass_times(torch, seed_conv_layers(16), 2, 1)
    assert len(rows) == 8
    assert all(r[f'torch_{p}_ms'] > 0 for r in rows for p in bench.CONV_PASSES)


def test_torch_seed_network_matches_the_seed():
    torch = pytest.importorskip('torch')
    net = seed_torch.build_seed_resnet(torch)
    assert sum(p.numel() for p in net.parameters()) == 11_277_060   # seed-notebook.md §3
    # the notebook's module names, stage by stage (the state-dict keys of a seed checkpoint)
    assert [n for n, _ in net.named_children()] == ['conv1', 'bn1', 'relu', 'maxp', 'l1', 'l2',
                                                    'l3', 'l4', 'avg', 'drop', 'fc']
    assert [len(getattr(net, f'l{i}')) for i in range(1, 5)] == [2, 2, 2, 2]
    assert net.drop.p == 0.5 and net.fc.in_features == 512 and net.fc.out_features == 196
    small = seed_torch.build_seed_resnet(torch, 5, (1, 1), (4, 8))
    assert small(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    with pytest.raises(ValueError, match='one width per stage'):
        seed_torch.build_seed_resnet(torch, 5, (1, 1), (4, 8, 16))
    old = torch.get_num_threads()
    out = seed_torch.torch_step_rates(torch, 16, 4, 2, 1, num_classes=5, **TINY_NET,
                                       num_threads=1)
    assert out['threads'] == 1 and out['train_images_per_s'] > 0
    assert torch.get_num_threads() == old        # restored


def test_synthetic_cars_arrays_shapes():
    d = bench.synthetic_cars_arrays(300, 7, 64, 5, 16, seed=1)
    assert d['images'].shape == (300, 64, 64, 3) and d['images'].dtype == np.uint8
    assert d['eval_images'].shape == (5, 16, 16, 3)
    assert d['labels'].min() >= 0 and d['labels'].max() < 7
    assert (d['orig_hw'] >= 240).all() and (d['orig_hw'][:, 1] > d['orig_hw'][:, 0]).all()
    # smooth: neighbouring pixels differ far less than independent noise (~85 mean |diff|)
    assert np.abs(np.diff(d['images'].astype(int), axis=1)).mean() < 20
    assert d['images'].std() > 20


def test_chunk_sizes():
    assert bench.chunk_sizes(5, 2) == [2, 2, 1]
    assert bench.chunk_sizes(4, 2) == [2, 2]
    assert bench.chunk_sizes(5, 0) == [5] and bench.chunk_sizes(5, 9) == [5]


def test_fused_tiny_run_and_projection():
    # one chunk length, one compile of each program: 32 images / batch 8 = 4 steps = 2 x 2
    r = bench.run_fused(num_images=32, num_classes=4, image_size=16, epochs=3, batch_size=8,
                        chunk_steps=2, run_epochs=2, eval_images=10, **TINY_NET)
    assert r['cache_size'] == 18 and r['steps_per_epoch'] == 4
    assert r['chunks_per_epoch'] == 2 and r['chunk_steps'] == 2
    assert r['epochs_run'] == 2 and r['measured_wall_s'] is None and r['measured_run_s'] > 0
    assert r['steady_train_images_per_s'] > 0 and r['eval_images_per_s'] > 0
    assert r['train_compile_s'] > 0 and r['eval_compile_s'] > 0 and r['all_steps_finite']
    epoch = 4 * 8 / r['steady_train_images_per_s'] + r['eval_s_per_epoch']
    assert _close(r['projected_epoch_s'], epoch)
    assert _close(r['projected_wall_s'],
                  r['train_compile_s'] + r['eval_compile_s'] + 3 * epoch)
    bench.print_fused_table(r)


def test_importing_the_benchmark_defines_no_flags():
    """Flags are defined by the command only: importing benchmarks.bench (as these tests do)
    leaves absl's registry alone, so it cannot clash with another module's flags."""
    from absl import flags
    assert 'chunk_steps' not in flags.FLAGS and 'conv_impls' not in flags.FLAGS
    for form in (['benchmarks/bench.py'], ['-m', 'benchmarks.bench']):
        r = subprocess.run([sys.executable, *form, 'nomode'], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
        assert r.returncode != 0 and 'usage: python benchmarks/bench.py' in r.stderr + r.stdout
        assert 'Traceback' not in r.stderr


def test_parts_give_the_same_parts_for_both_stacks(capsys):
    r = bench.run_parts(16, 4, 2, num_classes=3, **TINY_NET)
    parts = ['forward (eval)', 'forward (train)', 'forward + backward', 'optimizer (AdamW)',
             'whole train step']
    assert list(r['jax']) == parts and all(ms > 0 for ms in r['jax'].values())
    assert ('pytorch' in r) == TORCH
    if TORCH:
        assert list(r['pytorch']) == parts and all(ms > 0 for ms in r['pytorch'].values())
    bench.print_parts_table(r)
    out = capsys.readouterr().out
    assert 'whole train step' in out and ('jax/torch' in out) == TORCH


def test_profile_parses_hlo_and_sorts_thunks_into_categories():
    from benchmarks import op_profile as P
    hlo = '\n'.join([
        '  %conv_general_dilated.3 = f32[2,4,4,8]{3,2,1,0} convolution(%a, %b), window={size=3x3}, '
        'metadata={op_name="jit(loss)/jvp(ResNet)/l1_0/conv1/conv_general_dilated"}',
        '  ROOT %ynn_fusion.7 = f32[8,72]{1,0} fusion(%c, %d), kind=kCustom, calls=%f.7, '
        'metadata={op_name="jit(loss)/transpose(jvp(ResNet))/l4_0/conv2/dot_general"}',
        '  %transpose_copy_fusion.9 = f32[64,16,16,32]{3,2,1,0} fusion(%e), kind=kLoop',
        '  %wrapped_iota.2 = s32[32,34,34,64]{3,2,1,0} fusion(), kind=kLoop, calls=%g',
        '  %fusion.4 = f32[8]{0} fusion(%h), kind=kLoop, '
        'metadata={op_name="jit(loss)/jvp(ResNet)/l2_0/down_bn/reduce_sum"}',
        '  %concatenate.12 = f32[32,4,4,2304]{3,2,1,0} concatenate(%i, %j), '
        'metadata={op_name="jit(loss)/jvp(ResNet)/l3_1/conv1/concatenate"}',
        '  %add_fusion = f32[2,4]{1,0} fusion(%k), metadata={op_name="jit(loss)/jvp(ResNet)/add"}',
    ])
    ins = P.hlo_instructions(hlo)
    assert ins['conv_general_dilated.3'] == (
        'convolution', 'jit(loss)/jvp(ResNet)/l1_0/conv1/conv_general_dilated')
    assert ins['ynn_fusion.7'][0] == 'fusion' and ins['transpose_copy_fusion.9'][1] == ''
    want = {'conv_general_dilated.3': 'convolutions and matmuls',
            'ynn_fusion.7': 'convolutions and matmuls',
            'transpose_copy_fusion.9': 'layout copies', 'wrapped_iota.2': 'max-pool',
            'fusion.4': 'BatchNorm', 'concatenate.12': 'convolutions and matmuls',
            'add_fusion': 'ReLU, shortcut adds, loss, other'}
    assert {n: P.xla_category(n, ins[n][1]) for n in want} == want
    assert [P.xla_backend(n, ins[n][0]) for n in ('conv_general_dilated.3', 'ynn_fusion.7',
                                                   'fusion.4')] == ['Eigen', 'YNNPACK', 'XLA loops']
    assert P.torch_category('aten::convolution_backward') == 'convolutions and matmuls'
    assert P.torch_category('aten::native_batch_norm_backward') == 'BatchNorm'
    assert P.torch_category('aten::max_pool2d_with_indices_backward') == 'max-pool'
    assert P.torch_category('autograd::engine::evaluate_function: AddBackward0') is None
    assert P.group({'aten::add_': 1.0, 'aten::copy_': 2.0, 'ProfilerStep#1': 5.0},
                   P.torch_category) == {'convolutions and matmuls': 0.0, 'BatchNorm': 0.0,
                                         'max-pool': 0.0, 'layout copies': 2.0,
                                         'ReLU, shortcut adds, loss, other': 1.0}


def test_profile_runs_both_stacks_on_a_tiny_net(capsys):
    import jax.profiler
    if not hasattr(jax.profiler, 'ProfileData'):
        pytest.skip("this jax has no trace reader (jax.profiler.ProfileData)")
    r = bench.run_profile(16, 4, 1, num_classes=3, **TINY_NET)
    j = r['jax']
    assert j['total_ms'] > 0 and j['category_ms']['convolutions and matmuls'] > 0
    assert abs(sum(j['category_ms'].values()) - j['total_ms']) < 1e-6 * j['total_ms'] + 1e-9
    assert abs(sum(j['backend_ms'].values()) - j['total_ms']) < 1e-6 * j['total_ms'] + 1e-9
    assert ('pytorch' in r) == TORCH
    if TORCH:
        t = r['pytorch']
        assert t['category_ms']['convolutions and matmuls'] > 0
        assert abs(sum(t['category_ms'].values()) - t['total_ms']) < 1e-6 * t['total_ms']
    assert list(r['max_pool_ms'])[:2] == ['XLA select_and_scatter', 'cars_jax max_pool_3x3_s2']
    assert ('PyTorch max_pool2d' in r['max_pool_ms']) == TORCH
    assert all(ms > 0 for ms in r['max_pool_ms'].values())
    bench.print_profile_table(r)
    assert 'max-pool' in capsys.readouterr().out


def test_a_resumed_run_loads_every_program_from_the_persistent_cache(tmp_path, monkeypatch,
                                                                      capsys):
    """`bench.py resume`: a run stopped after 2 steps, then resumed for 2 more, each in a fresh
    process. The first compiles into the empty cache; the resumed one (a restored state) must
    find every program there. Before the steps took their state's placement as given, a
    restored state traced to other programs and compiled them again."""
    from benchmarks.resume import print_resume_table, run_resume
    from fixtures import make_colour_folders
    monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')   # cache every program
    data = make_colour_folders(tmp_path / 'cars')
    r = run_resume(2, dict(data_source='folders', data_dir=str(data), num_classes=0,
                           image_size=16, batch_size=4, stage_sizes=[1, 1], widths=[4, 8],
                           max_steps_per_epoch=0, num_workers=0))
    fresh, resumed = r['rows']
    assert (fresh['phase'], fresh['step'], resumed['phase'], resumed['step']) == (
        'fresh', 2, 'resumed', 4)
    assert fresh['cache_misses'] > 0
    assert resumed['cache_hits'] > 0 and resumed['cache_misses'] == 0
    print_resume_table(r)
    assert r['machine'] == bench.machine()
    assert '| resumed | 2 (to step 4) |' in capsys.readouterr().out


SUITE_FIXTURE = '''
import jax
import jax.numpy as jnp
import pytest


def test_compiles_two_programs():
    double = jax.jit(lambda x: 2 * x + 1)
    assert float(double(jnp.ones(3))[0]) == 3.0
    assert float(jax.jit(jnp.sum)(jnp.ones(4))) == 4.0


def test_compiles_nothing():
    assert 1 + 1 == 2


def test_skipped():
    pytest.skip('on purpose')


def test_fails():
    assert False
'''


@pytest.mark.parametrize('workers', ['0', '2'])
def test_suite_records_each_tests_outcome_time_and_compiles(tmp_path, capsys, workers):
    """`bench.py suite` on a generated test file, in one process and with two xdist workers
    (whose controller's copy of every report must not be counted twice): the outcomes, which
    test compiled what, and pytest's exit status."""
    from benchmarks.suite import print_suite_table, run_suite
    path = tmp_path / 'test_generated.py'
    path.write_text(SUITE_FIXTURE)
    r = run_suite(['-n', workers, str(path)])
    assert r['returncode'] == 1 and '1 failed, 2 passed, 1 skipped' in r['summary']
    assert r['totals']['outcomes'] == {'passed': 2, 'skipped': 1, 'failed': 1}
    assert [t.split('::')[-1] for t in r['failed']] == ['test_fails']
    assert r['workers'] == (1 if workers == '0' else 2) and r['machine'] == bench.machine()
    slow = {s['test'].split('::')[-1]: s for s in r['slowest']}
    assert set(slow) == {'test_compiles_two_programs', 'test_compiles_nothing', 'test_skipped',
                         'test_fails'}
    assert slow['test_compiles_two_programs']['compile'] > 0
    assert slow['test_compiles_nothing']['compile'] == 0 == slow['test_skipped']['compile']
    names = {f['function']: f['compiles'] for f in r['functions']}
    assert names.get('jit(<lambda>)') == 1 and names.get('jit(sum)') == 1, names
    (name, f), = [(k, v) for k, v in r['files'].items() if k.endswith('test_generated.py')]
    assert f['tests'] == 4 and f['compile'] == pytest.approx(r['totals']['compile'])
    print_suite_table(r)
    out = capsys.readouterr().out
    assert '| jit(<lambda>) | 1 |' in out and 'FAILED ' in out
