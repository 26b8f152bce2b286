"""What a resumed run compiles: `python benchmarks/bench.py resume`.

A run of `configs/demo.py` (the README's default job, generated data) is started in a fresh
process with an empty persistent compilation cache and stopped after `steps` train steps (a
checkpoint, as a Ctrl-C leaves); a second fresh process resumes it for `steps` more. Each
phase reports its wall time (start-up, data, compiles and steps) and its persistent-cache hits
and misses: a resumed run should load every program the first one compiled (the cache's key is
the program, so a state that traces to another program, e.g. a restored one placed or typed
differently from a fresh one, compiles again).

A phase is this file run as a script: `python benchmarks/resume.py '<json job>'`.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIT, MISS = '/jax/compilation_cache/cache_hits', '/jax/compilation_cache/cache_misses'


def run_resume(steps: int, overrides: dict | None = None, timeout: float = 1800) -> dict:
    """{'rows': [fresh phase, resumed phase]}, each {'phase', 'seconds', 'cache_hits',
    'cache_misses', 'step'}, both stopping inside the first epoch (no validation)."""
    from benchmarks.bench import machine
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for phase, stop in (('fresh', steps), ('resumed', 2 * steps)):
            job = dict(workdir=os.path.join(tmp, 'run'), cache=os.path.join(tmp, 'cache'),
                       stop_after_steps=stop, overrides=overrides or {})
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(job)],
                                  capture_output=True, text=True, cwd=ROOT, timeout=timeout)
            lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
            if proc.returncode != 0 or not lines:
                tail = ' | '.join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise RuntimeError(f'the {phase} phase failed: {tail}')
            rows.append({'phase': phase, 'seconds': time.perf_counter() - t,
                         **json.loads(lines[-1])})
    return {'machine': machine(), 'rows': rows, 'steps': steps}


def print_resume_table(results: dict) -> None:
    print(f"A run stopped and resumed on {results['machine']}:")
    print('| phase | train steps | wall s | persistent-cache hits | misses (compiles) |')
    print('|---|---|---|---|---|')
    for r in results['rows']:
        print(f"| {r['phase']} | {results['steps']} (to step {r['step']}) | {r['seconds']:.1f} "
              f"| {r['cache_hits']} | {r['cache_misses']} |")


def _phase(job: dict) -> dict:
    from cars_jax import runtime
    runtime.apply_cpu_xla_flags()
    runtime.enable_compilation_cache(job['cache'])      # as main.py does, into an empty folder
    import jax
    events = collections.Counter()
    jax.monitoring.register_event_listener(lambda event, **kw: events.update([event]))
    from configs import demo
    from cars_jax.train import train_and_evaluate
    config = demo.get_config()
    for key, value in job['overrides'].items():
        config[key] = tuple(value) if isinstance(value, list) else value
    out = train_and_evaluate(config, job['workdir'], stop_after_steps=job['stop_after_steps'],
                             quiet=True)
    return {'step': out['step'], 'cache_hits': events[HIT], 'cache_misses': events[MISS]}


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    print(json.dumps(_phase(json.loads(sys.argv[1]))))
