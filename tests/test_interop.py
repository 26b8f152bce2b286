"""The seed's PyTorch VehicleResNet and our Flax ResNet are the same function, weights converted.

Tests needing torch skip without it (CI); the structure/error tests use numpy dicts only.
"""
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import seed_torch
from cars_jax import interop
from cars_jax.interop import InteropError
from cars_jax.model import ResNet, init_variables

TINY = dict(num_classes=5, stage_sizes=(1, 1), widths=(4, 8))


@pytest.fixture(scope='module')
def torch():
    return pytest.importorskip('torch')


def seed_net(torch, num_classes=196, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512)):
    """The seed notebook's §3 network (written once, in benchmarks/seed_torch.py)."""
    return seed_torch.build_seed_resnet(torch, num_classes, stage_sizes, widths)


def randomise(torch, net, seed):
    """Random weights and BN affine + running stats (BN far from the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if name.endswith('num_batches_tracked'):
                t.fill_(7)
            elif name.endswith('running_var'):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith('running_mean') or (name.endswith('bias') and t.ndim == 1):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif name.endswith('weight') and t.ndim == 1:      # BN scale
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:                                               # conv / fc: PyTorch's init
                t.copy_(torch.rand(t.shape, generator=g).mul_(2).sub_(1)
                        .mul_(1 / np.sqrt(np.prod(t.shape[1:]))))
    return net.eval()


def torch_logits(torch, net, images_nhwc):
    with torch.no_grad():
        return net(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def flax_logits(model, variables, images_nhwc):
    with jax.default_matmul_precision('highest'):
        return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images_nhwc))


def compare(torch, net, model, size, seed):
    """max |torch - flax| logits both ways: torch weights -> flax, flax init -> torch."""
    torch.manual_seed(seed)
    x = np.random.default_rng(seed).normal(size=(2, size, size, 3)).astype(np.float32)
    x[1] = 2 * x[1] + np.linspace(-2, 2, size)[:, None, None]   # other statistics than x[0]
    randomise(torch, net, seed)
    sd = {k: v for k, v in net.state_dict().items()}
    variables = interop.torch_state_dict_to_variables(sd, model)
    want = torch_logits(torch, net, x)
    d1 = np.abs(flax_logits(model, variables, x) - want).max()

    v2 = randomise_flax(init_variables(model, jax.random.PRNGKey(seed), size), seed)
    back = interop.variables_to_torch_state_dict(v2)
    net.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    want2 = flax_logits(model, v2, x)
    d2 = np.abs(torch_logits(torch, net, x) - want2).max()
    print(f'\n{size}px max|dlogit| torch->flax {d1:.2e} (logits {spread(want)}), '
          f'flax->torch {d2:.2e} (logits {spread(want2)})')
    # the logits must depend on the input, else a dead network would agree trivially
    assert np.abs(want[0] - want[1]).max() > 3e-3 and np.abs(want2[0] - want2[1]).max() > 3e-3
    return d1, d2, want


def spread(logits):
    return f'max |l| {np.abs(logits).max():.2f}, max |l0 - l1| {np.abs(logits[0] - logits[1]).max():.2f}'


def randomise_flax(variables, seed):
    """Flax init + random BN affine and running stats (as `randomise` does for torch)."""
    rng = np.random.default_rng(seed)

    def bn(path, a):
        name = path[-1].key
        a = np.asarray(a)
        if name == 'var':
            return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
        if name == 'mean' or (name == 'bias' and path[-2].key != 'fc'):
            return (rng.normal(size=a.shape) * 0.2).astype(np.float32)
        if name == 'scale':
            return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
        return a
    return jax.tree_util.tree_map_with_path(bn, variables)


# ---- with torch -------------------------------------------------------------------------------

def test_seed_resnet18_same_function_224(torch):
    torch.set_num_threads(2)
    net = seed_net(torch)
    model = ResNet(num_classes=196)
    assert interop.infer_architecture(net.state_dict()) == {
        'num_classes': 196, 'stage_sizes': (2, 2, 2, 2), 'widths': (64, 128, 256, 512)}
    d1, d2, want = compare(torch, net, model, 224, 0)
    assert np.abs(want).std() > 0.1
    assert d1 < 1e-4 and d2 < 1e-4


def test_narrow_deeper_variant_same_function_64(torch):
    net = seed_net(torch, 7, (1, 2, 3, 1), (8, 16, 16, 32))
    arch = interop.infer_architecture(net.state_dict())
    assert arch == {'num_classes': 7, 'stage_sizes': (1, 2, 3, 1), 'widths': (8, 16, 16, 32)}
    model = ResNet(**arch)
    d1, d2, want = compare(torch, net, model, 64, 1)
    assert np.abs(want).std() > 0.01
    assert d1 < 1e-5 and d2 < 1e-5


def test_conversion_catches_a_wrong_layout(torch):
    """The check above can fail: a conv kernel loaded without the OIHW -> HWIO transpose
    (a square 3x3 kernel of equal in/out channels has the same shape either way)."""
    net = randomise(torch, seed_net(torch, 3, (1, 1), (8, 8)), 3)
    model = ResNet(num_classes=3, stage_sizes=(1, 1), widths=(8, 8))
    variables = interop.torch_state_dict_to_variables(net.state_dict(), model)
    k = np.asarray(variables['params']['l1_0']['conv2']['kernel'])
    variables['params']['l1_0']['conv2']['kernel'] = k.transpose(0, 1, 3, 2)   # I <-> O swapped
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    assert np.abs(flax_logits(model, variables, x) - torch_logits(torch, net, x)).max() > 1e-3


def test_load_torch_checkpoint_forms(torch, tmp_path):
    net = randomise(torch, seed_net(torch, **TINY), 4)
    sd = net.state_dict()
    forms = {
        'bare': sd,
        'wrapped': {'epoch': 3, 'state_dict': sd},
        'model_state_dict': {'model_state_dict': sd, 'optimizer_state_dict': {}},
        'dataparallel': {f'module.{k}': v for k, v in sd.items()},
    }
    for name, obj in forms.items():
        path = tmp_path / f'{name}.pt'
        torch.save(obj, path)
        loaded = interop.load_torch_checkpoint(str(path))
        assert sorted(loaded) == sorted(sd), name
        for k, v in sd.items():
            np.testing.assert_array_equal(loaded[k], v.numpy())
    model, variables, arch = interop.model_from_torch_checkpoint(
        str(tmp_path / 'bare.pt'), _config())
    assert (model.num_classes, model.stage_sizes, model.widths) == (
        TINY['num_classes'], TINY['stage_sizes'], TINY['widths'])
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(flax_logits(model, variables, x), torch_logits(torch, net, x),
                               atol=1e-5, rtol=0)
    # a config asking for the unpooled stem does not change what a seed checkpoint computes
    unpooled_config = _config()
    unpooled_config.stem_pool = False
    model, variables, _ = interop.model_from_torch_checkpoint(str(tmp_path / 'bare.pt'),
                                                              unpooled_config)
    np.testing.assert_allclose(flax_logits(model, variables, x), torch_logits(torch, net, x),
                               atol=1e-5, rtol=0)
    torch.save({'weights': [1, 2]}, tmp_path / 'junk.pt')
    with pytest.raises(InteropError, match='no state_dict'):
        interop.load_torch_checkpoint(str(tmp_path / 'junk.pt'))
    (tmp_path / 'text.pt').write_text('not a checkpoint')
    with pytest.raises(InteropError, match='cannot read'):
        interop.load_torch_checkpoint(str(tmp_path / 'text.pt'))


# ---- numpy only ---------------------------------------------------------------------------------

def _config():
    from configs import base
    c = base.get_config()
    c.stage_sizes, c.widths = (2, 2, 2, 2), (64, 128, 256, 512)   # overridden by the checkpoint
    return c


@pytest.fixture(scope='module')
def tiny():
    model = ResNet(**TINY)
    variables = init_variables(model, jax.random.PRNGKey(0), 32)
    return model, variables, interop.variables_to_torch_state_dict(variables)


def test_state_dict_keys_and_layouts(tiny):
    model, variables, sd = tiny
    expected = {'conv1.weight': (4, 3, 7, 7), 'fc.weight': (5, 8), 'fc.bias': (5,),
                'l2.0.down.0.weight': (8, 4, 1, 1), 'l2.0.down.1.running_var': (8,),
                'l2.0.down.1.num_batches_tracked': (), 'l1.0.conv2.weight': (4, 4, 3, 3),
                'bn1.weight': (4,), 'l2.0.bn2.running_mean': (8,)}
    for k, shape in expected.items():
        assert sd[k].shape == shape, k
    assert 'l1.0.down.0.weight' not in sd   # identity shortcut: no projection
    # BNs: stem 1 + l1_0 2 + l2_0 3 (5 keys each); convs likewise 6; fc 2
    assert len(sd) == 6 * 5 + 6 + 2
    assert sd['bn1.num_batches_tracked'].dtype == np.int64
    np.testing.assert_array_equal(sd['conv1.weight'][2, 1, 5, 0],
                                  variables['params']['conv1']['kernel'][5, 0, 1, 2])
    np.testing.assert_array_equal(sd['fc.weight'], np.asarray(variables['params']['fc']['kernel']).T)
    np.testing.assert_array_equal(sd['l2.0.down.1.running_mean'],
                                  variables['batch_stats']['l2_0']['down_bn']['mean'])


def test_round_trip_is_exact(tiny):
    model, variables, sd = tiny
    back = interop.torch_state_dict_to_variables(sd, model)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, variables))
    no_counter = {k: v for k, v in sd.items() if not k.endswith('num_batches_tracked')}
    jax.tree.map(np.testing.assert_array_equal,
                 interop.torch_state_dict_to_variables(no_counter, model), back)
    prefixed = {f'module.{k}': v for k, v in sd.items()}
    jax.tree.map(np.testing.assert_array_equal,
                 interop.torch_state_dict_to_variables(prefixed, model), back)


def test_infer_architecture(tiny):
    _, _, sd = tiny
    assert interop.infer_architecture(sd) == TINY
    with pytest.raises(InteropError, match='fc.weight'):
        interop.infer_architecture({'conv1.weight': np.zeros((4, 3, 7, 7))})
    gap = {k: v for k, v in sd.items() if not k.startswith('l1.')}
    with pytest.raises(InteropError, match='stages'):
        interop.infer_architecture(gap)


def test_missing_key_named(tiny):
    model, _, sd = tiny
    bad = {k: v for k, v in sd.items() if k != 'l2.0.down.1.running_var'}
    with pytest.raises(InteropError, match=r'missing keys \(1\): l2\.0\.down\.1\.running_var'):
        interop.torch_state_dict_to_variables(bad, model)


def test_extra_key_named(tiny):
    model, _, sd = tiny
    bad = dict(sd, **{'l3.0.conv1.weight': np.zeros((8, 8, 3, 3), np.float32)})
    with pytest.raises(InteropError, match=r'unexpected keys \(1\): l3\.0\.conv1\.weight'):
        interop.torch_state_dict_to_variables(bad, model)


def test_misshaped_key_named_with_both_shapes(tiny):
    model, _, sd = tiny
    bad = dict(sd, **{'fc.weight': np.zeros((196, 8), np.float32)})
    with pytest.raises(InteropError) as e:
        interop.torch_state_dict_to_variables(bad, model)
    assert 'fc.weight: checkpoint (196, 8), model (5, 8)' in str(e.value)


def test_all_problems_in_one_message(tiny):
    """A seed ResNet-18 checkpoint into the tiny model: every problem listed at once, plus the
    architecture the checkpoint has."""
    model, _, sd = tiny
    bad = {k: v for k, v in sd.items() if k not in ('bn1.bias', 'l1.0.conv2.weight')}
    bad['conv1.weight'] = np.zeros((64, 3, 7, 7), np.float32)
    bad['l1.0.bn3.weight'] = np.zeros((4,), np.float32)
    bad['l9.0.down.1.num_batches_tracked'] = np.array(0)
    with pytest.raises(InteropError) as e:
        interop.torch_state_dict_to_variables(bad, model)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    for part in ('missing keys (2)', 'bn1.bias', 'l1.0.conv2.weight',
                 'unexpected keys (2)', 'l1.0.bn3.weight', 'l9.0.down.1.num_batches_tracked',
                 'mis-shaped keys (1)', 'conv1.weight: checkpoint (64, 3, 7, 7), model (4, 3, 7, 7)',
                 'looks like stage_sizes=(1, 1), widths=(4, 8), num_classes=5'):
        assert part in msg, (part, msg)


def test_missing_torch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'torch', None)   # `import torch` raises ImportError
    with pytest.raises(InteropError, match='pip install torch'):
        interop.load_torch_checkpoint(str(tmp_path / 'model.pt'))


def test_cli_uses_a_seed_checkpoint_directly(tmp_path, torch):
    """main.py --mode=eval/predict --init_from=model.pt: class names from the data folder,
    architecture from the checkpoint, predictions equal to the converted Flax model's."""
    import subprocess
    import sys as _sys
    import jax
    from configs import demo
    from cars_jax.data.synthetic import ensure_demo_dataset
    from cars_jax.model import build_model, init_variables
    data = ensure_demo_dataset(tmp_path / 'demo', num_classes=3, train_per_class=(4, 6),
                               test_per_class=2)
    c = demo.get_config()
    c.image_size, c.widths, c.stage_sizes = 32, (4, 8), (1, 1)
    model = build_model(c, 3)
    variables = init_variables(model, jax.random.PRNGKey(3), 32)
    sd = interop.variables_to_torch_state_dict(variables)
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, tmp_path / 'm.pt')
    root = ROOT
    r = subprocess.run([_sys.executable, os.path.join(root, 'main.py'), '--mode=eval',
                        f'--init_from={tmp_path / "m.pt"}', '--config=configs/demo.py',
                        f'--config.data_dir={data}', '--config.image_size=32',
                        f'--workdir={tmp_path / "w"}'], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'Evaluating' in r.stdout and '[val] 6 samples, 3 classes' in r.stdout
    bad = subprocess.run([_sys.executable, os.path.join(root, 'main.py'), '--mode=eval',
                          f'--init_from={tmp_path / "m.pt"}', '--config=configs/demo.py',
                          '--config.data_dir=data/none', f'--workdir={tmp_path / "w"}'],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr


def test_seed_checkpoint_config_has_the_seed_network_and_no_ema():
    c = _config()
    c.stem_pool, c.ema_decay, c.dropout = False, 0.999, 0.3
    arch = {'stage_sizes': (1, 1), 'widths': (8, 16), 'num_classes': 5}
    out = interop.seed_checkpoint_config(c, arch)
    assert (tuple(out.stage_sizes), tuple(out.widths)) == ((1, 1), (8, 16))
    assert out.stem_pool is True and out.ema_decay == 0.0 and out.dropout == 0.3
    # the caller's config is left as it was
    assert c.stem_pool is False and c.ema_decay == 0.999 and tuple(c.widths) == (64, 128, 256, 512)


def test_weights_with_a_space_to_depth_stem_are_not_exported_as_a_seed_state_dict():
    import jax
    from configs import demo
    from cars_jax.model import build_model, init_variables
    c = demo.get_config()
    c.image_size, c.widths, c.stage_sizes, c.stem = 32, (4, 8), (1, 1), 'space_to_depth'
    variables = init_variables(build_model(c, 3), jax.random.PRNGKey(0), 32)
    with pytest.raises(interop.InteropError, match='stem=space_to_depth'):
        interop.variables_to_torch_state_dict(variables)
