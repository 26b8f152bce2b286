"""The exported StableHLO artifact reproduces model.apply, loaded where flax is never imported."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

pytest.importorskip('flatbuffers', reason='jax.export serialization needs flatbuffers')

from cars_jax import export, serving  # noqa: E402
from cars_jax.data import augment  # noqa: E402
from cars_jax.model import ResNet, init_variables  # noqa: E402

SIZE = 32
CLASSES = ['Audi A4 2012', 'BMW M3 coupé', 'Ford F-150', 'Tesla "S"', 'Volvo 240']
CFG = {'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225), 'eval_resize': 'squash'}


@pytest.fixture(scope='module')
def net():
    model = ResNet(num_classes=len(CLASSES), stage_sizes=(1, 1), widths=(4, 8))
    variables = init_variables(model, jax.random.PRNGKey(0), SIZE)
    rng = np.random.default_rng(0)   # non-trivial BN statistics, so BN is not the identity
    stats = jax.tree.map(lambda v: np.asarray(v) + rng.uniform(0.1, 0.5, v.shape).astype(np.float32),
                         variables['batch_stats'])
    return model, {'params': variables['params'], 'batch_stats': stats}


@pytest.fixture(scope='module')
def exports(net, tmp_path_factory):
    model, variables = net
    root = tmp_path_factory.mktemp('export')
    sym = export.export_model(variables, model, CLASSES, CFG, str(root / 'sym'), SIZE)
    fixed = export.export_model(variables, model, CLASSES, dict(CFG, image_size=SIZE),
                                str(root / 'fixed'), batch_size=2)
    return root, sym, fixed


def test_meta_and_files(exports):
    _, sym, fixed = exports
    assert sorted(os.listdir(sym)) == ['meta.json', 'model.jax_exported', 'serving.py']
    meta = serving.read_meta(sym)
    assert meta['class_names'] == CLASSES
    assert meta['image_size'] == SIZE and meta['eval_resize'] == 'squash'
    assert meta['mean'] == list(CFG['mean']) and meta['std'] == list(CFG['std'])
    assert meta['batch_size'] is None and serving.read_meta(fixed)['batch_size'] == 2
    assert meta['platforms'] == [jax.default_backend()]


def test_loaded_in_fresh_process_without_flax(net, exports):
    """A subprocess that imports only the copied serving.py: same probabilities (1e-5) for
    preprocessed floats and for raw uint8 images, several batch sizes, both export kinds."""
    model, variables = net
    root, sym, fixed = exports
    rng = np.random.default_rng(1)
    floats = rng.normal(size=(5, SIZE, SIZE, 3)).astype(np.float32)
    raw = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 57), (32, 32), (21, 30))]
    np.savez(root / 'inputs.npz', floats=floats, **{f'raw{i}': r for i, r in enumerate(raw)})
    script = textwrap.dedent(f'''
        import json, sys
        import numpy as np
        sys.path.insert(0, {str(sym)!r})
        import serving
        inp = np.load({str(root / 'inputs.npz')!r})
        out = {{}}
        for kind, path in (('sym', {str(sym)!r}), ('fixed', {str(fixed)!r})):
            p = serving.load_exported(path)
            for n in (1, 3, 5):
                out[f'{{kind}}_float{{n}}'] = p.predict(inp['floats'][:n])
            out[f'{{kind}}_raw'] = p.predict([inp[f'raw{{i}}'] for i in range(3)])
            out[f'{{kind}}_names'] = np.array(json.dumps(p.class_names))
            out[f'{{kind}}_top'] = np.array(json.dumps(p.top_k(inp['floats'][:2], 2)))
        np.savez({str(root / 'outputs.npz')!r}, **out)
        bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'cars_jax', 'optax'))
        print('FORBIDDEN', json.dumps(bad))
    ''')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    res = subprocess.run([sys.executable, '-c', script], cwd=root, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    forbidden = json.loads(res.stdout.split('FORBIDDEN', 1)[1])
    assert forbidden == []

    out = np.load(root / 'outputs.npz')
    want = export.reference_probs(model, variables, floats)
    assert np.all(np.abs(want.sum(1) - 1) < 1e-5) and want.std() > 1e-3   # not a constant
    cfg = augment.AugmentConfig(image_size=SIZE, mean=CFG['mean'], std=CFG['std'])
    prepped = np.stack([augment.eval_transform(r, cfg) for r in raw])
    want_raw = export.reference_probs(model, variables, prepped)
    for kind in ('sym', 'fixed'):
        for n in (1, 3, 5):
            got = out[f'{kind}_float{n}']
            assert got.shape == (n, len(CLASSES))
            np.testing.assert_allclose(got, want[:n], atol=1e-5, rtol=0)
        np.testing.assert_allclose(out[f'{kind}_raw'], want_raw, atol=1e-5, rtol=0)
        assert json.loads(str(out[f'{kind}_names'])) == CLASSES
        top = json.loads(str(out[f'{kind}_top']))
        for row, p in zip(top, want[:2]):
            assert [name for name, _ in row] == [CLASSES[c] for c in np.argsort(-p)[:2]]


@pytest.mark.parametrize('mode', ['squash', 'center_crop'])
def test_serving_preprocessing_is_the_eval_transform(mode):
    """The loader's copied preprocessing equals cars_jax.data.augment.eval_transform bit for bit."""
    rng = np.random.default_rng(2)
    cfg = augment.AugmentConfig(image_size=24, mean=CFG['mean'], std=CFG['std'], eval_resize=mode)
    for shape in ((37, 50, 3), (24, 24, 3), (61, 29), (30, 44, 1)):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        got = serving.eval_preprocess(image, 24, CFG['mean'], CFG['std'], mode)
        np.testing.assert_array_equal(got, augment.eval_transform(image, cfg))


def test_in_process_loader_and_errors(net, exports):
    model, variables = net
    _, sym, _ = exports
    p = export.load_exported(sym)
    assert p.predict([]).shape == (0, len(CLASSES))
    single = np.zeros((SIZE, SIZE, 3), np.float32)
    np.testing.assert_allclose(p.predict(single), export.reference_probs(model, variables, single[None]),
                               atol=1e-5)
    with pytest.raises(ValueError, match='preprocessed'):
        p.predict(np.zeros((2, 20, 20, 3), np.float32))
    with pytest.raises(ValueError, match='uint8'):
        p.predict(np.zeros((1, SIZE, SIZE, 3), np.int32))
    raw = np.full((20, 30, 3), 128, np.uint8)
    assert [len(rows) for rows in p.top_k([raw, raw], 2)] == [2, 2]
    assert len(p.top_k(raw, 99)[0]) == len(CLASSES)             # every class, best first
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r'k must be an integer >= 1'):
            p.top_k(raw, bad)
    with pytest.raises(ValueError, match='finite'):
        p.top_k(np.full((SIZE, SIZE, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match='class names'):
        export.export_model(variables, model, CLASSES[:2], CFG, str(sym) + '_x', SIZE)
    with pytest.raises(ValueError, match='image_size'):
        export.export_model(variables, model, CLASSES, CFG, str(sym) + '_x')
