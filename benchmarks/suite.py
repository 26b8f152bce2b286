"""Where the test suite's time goes: `python benchmarks/bench.py suite`.

Runs the README's test command (`python -m pytest -q`, the options of pyproject.toml: one
worker per core) in a child process with a fresh TMPDIR, so that the tests' persistent
compilation cache (tests/conftest.py keeps it under TMPDIR) starts cold as on a fresh clone,
with the `benchmarks.suite_log` plugin; then sums what the plugin recorded: the wall time, each
test's duration, and the in-process JAX work per test (tracing, lowering, backend compiles and
persistent-cache hits), per file and per jitted function.
"""
from __future__ import annotations

import collections
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.suite_log import LOG_DIR_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_suite(pytest_args: list[str] | None = None, timeout: float = 7200) -> dict:
    """Runs `python -m pytest -q -p benchmarks.suite_log *pytest_args` from the repository
    root, with a fresh TMPDIR."""
    from benchmarks.bench import machine
    with tempfile.TemporaryDirectory() as tmp:
        log_dir, tmpdir = os.path.join(tmp, 'log'), os.path.join(tmp, 'tmp')
        os.makedirs(log_dir)
        os.makedirs(tmpdir)
        cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'benchmarks.suite_log',
               *(pytest_args or [])]
        env = {**os.environ, LOG_DIR_ENV: log_dir, 'TMPDIR': tmpdir}
        env.pop('JAX_COMPILATION_CACHE_DIR', None)    # conftest's default: under TMPDIR
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        wall = time.perf_counter() - t
        lines = [l for l in proc.stdout.splitlines() if l.strip()]
        logs = sorted(glob.glob(os.path.join(log_dir, '*.json')))
        workers = [p for p in logs if os.path.basename(p) != 'main.json'] or logs
        tests: dict[str, dict] = {}
        for path in workers:       # with xdist, main.json is the controller's copy of reports
            with open(path) as f:
                _merge(tests, json.load(f))
    if not tests:
        tail = ' | '.join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f'pytest recorded no test (exit {proc.returncode}): {tail}')
    args = list(pytest_args or [])
    shown = args if len(args) <= 6 else args[:3] + [f'... ({len(args) - 3} more arguments)']
    return {'machine': machine(), 'command': ' '.join(['python -m pytest -q', *shown]),
            'pytest_args': args, 'returncode': proc.returncode,
            'summary': lines[-1] if lines else '', 'wall_s': wall, 'workers': len(workers),
            **summarise(tests)}


def _merge(into: dict, records: dict) -> None:
    """Adds one process's records; the entries outside tests appear in every process."""
    for name, v in records.items():
        if name not in into:
            into[name] = v
            continue
        for k, x in v.items():
            if k == 'programs':
                into[name][k] = into[name][k] + x
            elif k != 'outcome':
                into[name][k] += x


def summarise(tests: dict[str, dict], top: int = 15) -> dict:
    """Totals, per file and per jitted function, and the slowest tests, from the plugin's
    records ({test id: record}); '<collection>' and '<between tests>' are work outside tests
    (imports, module fixtures' teardown)."""
    real = {k: v for k, v in tests.items() if v['outcome'] is not None}
    keys = ('seconds', 'trace', 'lower', 'compile', 'cache_read')
    totals = {k: sum(v[k] for v in tests.values()) for k in keys}
    totals['cache_hits'] = sum(v['cache_hits'] for v in tests.values())
    totals['programs'] = sum(len(v['programs']) for v in tests.values())
    totals['outcomes'] = dict(collections.Counter(v['outcome'] for v in real.values()))
    files: dict[str, dict] = collections.defaultdict(lambda: dict.fromkeys(keys + ('tests',), 0))
    functions: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, v in tests.items():
        f = files[name.split('::')[0]]
        f['tests'] += v['outcome'] is not None
        for k in keys:
            f[k] += v[k]
        for fun, seconds in v['programs']:
            functions[fun][0] += 1
            functions[fun][1] += seconds
    slowest = sorted(real.items(), key=lambda kv: -kv[1]['seconds'])[:top]
    return {
        'totals': totals,
        'files': dict(sorted(files.items(), key=lambda kv: -kv[1]['seconds'])),
        'functions': [{'function': k, 'compiles': n, 'seconds': s} for k, (n, s) in
                      sorted(functions.items(), key=lambda kv: -kv[1][1])[:top]],
        'slowest': [{'test': k, 'seconds': v['seconds'], 'compile': v['compile'],
                     'cache_hits': v['cache_hits']} for k, v in slowest],
        'failed': sorted(k for k, v in real.items() if v['outcome'] == 'failed'),
        'tests': {k: {'outcome': v['outcome'], 'seconds': round(v['seconds'], 3),
                      'compile': round(v['compile'], 3)} for k, v in real.items()},
    }


def print_suite_table(r: dict) -> None:
    t = r['totals']
    print(f"`{r['command']}` on {r['machine']} (cold compilation cache): {r['summary']}")
    print(f"wall {r['wall_s']:.1f} s; test time summed over {r['workers']} process(es) "
          f"{t['seconds']:.1f} s, of which in-process JAX: tracing {t['trace']:.1f} s, lowering "
          f"{t['lower']:.1f} s, backend compiles {t['compile']:.1f} s ({t['programs']} programs, "
          f"{t['cache_hits']} of them read from the persistent cache in {t['cache_read']:.1f} s)")
    for name in r['failed']:
        print(f'FAILED {name}')
    print('\n| file | tests | seconds | tracing | lowering | compiles |')
    print('|---|---|---|---|---|---|')
    for name, f in r['files'].items():
        print(f"| {name} | {f['tests']} | {f['seconds']:.1f} | {f['trace']:.1f} "
              f"| {f['lower']:.1f} | {f['compile']:.1f} |")
    print('\n| jitted function | compiles | seconds |')
    print('|---|---|---|')
    for f in r['functions']:
        print(f"| {f['function']} | {f['compiles']} | {f['seconds']:.1f} |")
    print('\n| slowest tests | seconds | in-process compiles | cache hits |')
    print('|---|---|---|---|')
    for s in r['slowest']:
        print(f"| {s['test']} | {s['seconds']:.1f} | {s['compile']:.1f} | {s['cache_hits']} |")
