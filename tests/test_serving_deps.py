"""The exported model's loader needs exactly jax (with what pip installs for it), flatbuffers
and Pillow: serving.py runs in a process that sees the standard library and those packages'
files alone, and fails without flatbuffers."""
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

pytest.importorskip('flatbuffers', reason='jax.export serialization needs flatbuffers')

from cars_jax import export, serving  # noqa: E402
from cars_jax.model import ResNet, init_variables  # noqa: E402

STATED = {'jax', 'flatbuffers', 'pillow'}   # README: pip install jax flatbuffers pillow


def _requirements(dist):
    """The distributions `dist` needs (not its extras), recursively, `dist` included."""
    seen, todo = set(), [dist]
    while todo:
        name = re.sub(r'[-_.]+', '-', todo.pop()).lower()
        if name in seen:
            continue
        seen.add(name)
        for req in importlib.metadata.requires(name) or []:
            if 'extra ==' not in req:
                todo.append(re.match(r'[A-Za-z0-9_.\-]+', req).group(0))
    return seen


def _site(dists, dest):
    """A site-packages folder holding only the files of the distributions `dists` (symlinks to
    the installed ones), as a virtual environment with just those would."""
    for name in dists:
        dist = importlib.metadata.distribution(name)
        for f in dist.files or []:
            rel = os.path.normpath(str(f))
            src = os.path.abspath(str(dist.locate_file(f)))
            if rel.startswith('..') or os.path.isabs(rel) or not os.path.isfile(src):
                continue   # scripts outside site-packages
            target = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(src, target)
    return dest


@pytest.fixture(scope='module')
def artifact(tmp_path_factory):
    model = ResNet(num_classes=3, stage_sizes=(1,), widths=(4,))
    variables = init_variables(model, jax.random.PRNGKey(0), 16)
    path = str(tmp_path_factory.mktemp('serving') / 'model')
    export.export_model(variables, model, ['a', 'b', 'c'], {}, path, 16)
    return path


def _serve(artifact, site):
    """Runs the copied serving.py with the standard library and `site` alone (python -S: no
    site-packages, no .pth files)."""
    script = textwrap.dedent(f'''
        import json, sys
        sys.path[:0] = [{artifact!r}, {site!r}]
        import numpy as np
        import serving
        p = serving.load_exported({artifact!r})
        top = p.top_k(np.full((20, 30, 3), 128, np.uint8), 2)
        third_party = sorted(m for m in sys.modules if (getattr(sys.modules[m], '__file__', '')
                                                         or '').startswith({site!r}))
        print('RESULT', json.dumps([top, sorted({{m.split('.')[0] for m in third_party}})]))
    ''')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME')}
    return subprocess.run([sys.executable, '-S', '-c', script], cwd=os.path.dirname(artifact),
                          env=env, capture_output=True, text=True, timeout=180)


def test_serving_needs_only_jax_flatbuffers_and_pillow(artifact, tmp_path):
    dists = set().union(*(_requirements(d) for d in STATED))
    assert {'jax', 'jaxlib', 'numpy', 'flatbuffers', 'pillow'} <= dists
    assert not dists & {'flax', 'optax', 'orbax-checkpoint', 'grain', 'tensorflow-datasets',
                        'cars-jax', 'protobuf', 'matplotlib'}
    res = _serve(artifact, _site(dists, str(tmp_path / 'site')))
    assert res.returncode == 0, res.stderr[-3000:]
    top, imported = json.loads(res.stdout.split('RESULT', 1)[1])
    assert {'jax', 'numpy', 'flatbuffers', 'PIL'} <= set(imported)
    want = export.load_exported(artifact).top_k(np.full((20, 30, 3), 128, np.uint8), 2)
    assert [n for n, _ in top[0]] == [n for n, _ in want[0]]
    np.testing.assert_allclose([p for _, p in top[0]], [p for _, p in want[0]], atol=1e-6)


def test_serving_fails_without_flatbuffers(artifact, tmp_path):
    dists = set().union(*(_requirements(d) for d in STATED - {'flatbuffers'}))
    res = _serve(artifact, _site(dists - {'flatbuffers'}, str(tmp_path / 'site')))
    assert res.returncode != 0 and "install 'flatbuffers'" in res.stderr, res.stderr[-2000:]


def test_a_model_from_a_newer_jax_names_both_versions():
    def failing(x):
        raise ValueError('Failed to deserialize StableHLO')
    call = serving.explain_version_errors(failing, '999.0.1')
    with pytest.raises(RuntimeError, match=r'exported with jax 999\.0\.1 .* install jax>=999\.0\.1'):
        call(1)
    assert serving.explain_version_errors(failing, jax.__version__) is failing
    assert serving.explain_version_errors(failing, None) is failing
