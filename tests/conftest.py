import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The repository root (the configs and benchmarks packages, as from a checkout) and tests/
# (the shared helpers in fixtures.py).
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# XLA compiles of the same tiny nets repeat across tests and subprocesses: share them.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(os.environ.get('TMPDIR', '/tmp'), 'cars_jax_test_xla_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# The XLA:CPU defaults main.py applies (cars_jax.runtime), set before JAX starts its backend,
# so that the suite tests the programs users run.
from cars_jax.runtime import apply_cpu_xla_flags  # noqa: E402

apply_cpu_xla_flags()
