"""pytest plugin of `python benchmarks/bench.py suite`: each test's outcome, duration and
in-process JAX compile work, one JSON file per pytest process.

Loaded with `-p benchmarks.suite_log` (from the repository root) and active only when
CARS_JAX_SUITE_LOG names a folder. It listens to `jax.monitoring`'s duration events, which
carry the jitted function's name: tracing, lowering to StableHLO, and the backend compile, the
last of which includes a persistent-cache lookup (a hit is counted, with the time the read
took). Work in the subprocesses a test starts (main.py runs) is not seen; it is in the test's
duration only.
"""
from __future__ import annotations

import json
import os

import pytest

LOG_DIR_ENV = 'CARS_JAX_SUITE_LOG'
EVENTS = {   # the event names of jax._src.dispatch and .compiler (jax 0.10 and 0.12 alike)
    '/jax/core/compile/jaxpr_trace_duration': 'trace',
    '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
    '/jax/core/compile/backend_compile_duration': 'compile',
    '/jax/compilation_cache/cache_retrieval_time_sec': 'cache_read',
}
CACHE_HIT = '/jax/compilation_cache/cache_hits'

_tests: dict[str, dict] = {}
_current = ['<collection>']


def _entry(test: str) -> dict:
    if test not in _tests:
        _tests[test] = {'outcome': None, 'seconds': 0.0, 'trace': 0.0, 'lower': 0.0,
                        'compile': 0.0, 'cache_read': 0.0, 'cache_hits': 0, 'programs': []}
    return _tests[test]


def _on_duration(event: str, seconds: float, **kwargs) -> None:
    kind = EVENTS.get(event)
    if kind is None:
        return
    e = _entry(_current[0])
    e[kind] += seconds
    if kind == 'compile':
        e['programs'].append([str(kwargs.get('fun_name', '?')), round(seconds, 4)])


def _on_event(event: str, **kwargs) -> None:
    if event == CACHE_HIT:
        _entry(_current[0])['cache_hits'] += 1


def pytest_configure(config) -> None:
    if not os.environ.get(LOG_DIR_ENV):
        return
    import jax
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current[0] = item.nodeid
    yield
    _current[0] = '<between tests>'


def pytest_runtest_logreport(report) -> None:
    e = _entry(report.nodeid)
    e['seconds'] += report.duration
    if report.when == 'call' or report.outcome != 'passed':
        e['outcome'] = e['outcome'] if e['outcome'] in ('failed', 'skipped') else report.outcome


def pytest_unconfigure(config) -> None:
    folder = os.environ.get(LOG_DIR_ENV)
    if not folder:
        return
    # an xdist worker has `workerinput`; the controller (which also sees every report) does not
    worker = getattr(config, 'workerinput', {}).get('workerid', 'main')
    with open(os.path.join(folder, f'{worker}.json'), 'w') as f:
        json.dump(_tests, f)
