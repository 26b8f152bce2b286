"""The README's research-API snippet runs as written, from the repository root, in a fresh
process (as a user pastes it)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet(section: str) -> str:
    text = open(os.path.join(ROOT, 'README.md'), encoding='utf-8').read()
    body = text.split(f'## {section}\n', 1)[1].split('\n## ', 1)[0]
    blocks = re.findall(r'```python\n(.*?)```', body, re.S)
    assert blocks, f'no python block under "## {section}"'
    return blocks[0]


def test_research_api_snippet_runs_as_written():
    code = readme_snippet('The research API')
    assert 'from cars_jax import' in code and 'train_step' in code
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert r.returncode == 0, r.stderr[-3000:]
    loss, lr, top1 = map(float, re.fullmatch(
        r'loss (\S+), lr (\S+), top-1 (\S+)\n', r.stdout).groups())
    # one step of the seed's recipe from random init on 196 classes: the loss is near
    # ln(196) = 5.28 and the lr is the one-cycle start, 1e-3 / 25
    assert abs(loss - 5.28) < 1.0 and lr == 4e-5 and 0 <= top1 <= 1
