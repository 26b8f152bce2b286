"""Process-wide settings a run makes before JAX starts: XLA:CPU's library fusions and JAX's
persistent compilation cache (main.py applies both; each has an opt-out).

XLA:CPU library fusions. jaxlib >= 0.10 hands single convolutions to the YNNPACK library by
default (`--xla_cpu_experimental_ynn_fusion_type`), whose weight-gradient convolutions ran 2-3x
slower than XLA's own (Eigen) convolution on a 2-core Intel Xeon. Removing that one fusion
type (`-individual_convolution`; dots, elementwise ops and reductions stay with YNNPACK) made
the seed's train step 1.2x (64 px), 1.5x (128 px) and 1.7x (224 px) faster and its eval step
1.15-1.35x, with the same losses over 20 steps as plain `lax.conv` to 1e-7 (BENCHMARKS.md, `python
benchmarks/bench.py cpu`). The flag is added to XLA_FLAGS unless the user's own XLA_FLAGS
already sets it; it only concerns the CPU backend.

Compilation cache. The seed's train step takes 10-30 s to compile on a CPU (more with the
decode-once cache path or several shapes); with the cache on disk, a resumed or repeated run with the same config,
jax version and machine loads the compiled step instead (measured in BENCHMARKS.md). JAX keys
each entry by the program, the compile options (XLA_FLAGS included), the backend and the jax
version, so a stale entry is never used: a change makes a new one. A run of several processes on
CPU leaves the cache off (`cache_setting_for`: it deadlocked one).
"""
from __future__ import annotations

import os
import re
import sys
from importlib import metadata

from cars_jax.fileio import ensure_writable_dir

OFF = 'off'
YNN_FUSION_FLAG = '--xla_cpu_experimental_ynn_fusion_type'
YNN_FUSION_TYPES = '-individual_convolution'   # jaxlib's default list without it
MIN_JAXLIB_FOR_YNN = (0, 10)    # the first measured; older jaxlibs may not know the flag


def cpu_xla_flags(current: str, jaxlib_version: str) -> str:
    """XLA_FLAGS with our YNNPACK fusion types added: `current` unchanged when it already names the
    flag (the user's choice wins) or when this jaxlib predates MIN_JAXLIB_FOR_YNN (an unknown
    flag would abort XLA)."""
    release = tuple(int(p) for p in re.findall(r'\d+', jaxlib_version)[:2])
    if YNN_FUSION_FLAG in current or release < MIN_JAXLIB_FOR_YNN:
        return current
    return ' '.join(f for f in (current.strip(), f'{YNN_FUSION_FLAG}={YNN_FUSION_TYPES}') if f)


def apply_cpu_xla_flags() -> bool:
    """Sets XLA_FLAGS per `cpu_xla_flags` for this process and its children. Must run before
    JAX creates its backends (XLA reads the variable then); returns whether XLA_FLAGS changed,
    False once JAX already runs."""
    bridge = sys.modules.get('jax._src.xla_bridge')
    if bridge is not None and getattr(bridge, '_backends', None):
        return False
    try:
        version = metadata.version('jaxlib')
    except metadata.PackageNotFoundError:
        return False
    current = os.environ.get('XLA_FLAGS', '')
    new = cpu_xla_flags(current, version)
    os.environ['XLA_FLAGS'] = new
    return new != current


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/cars_jax/xla, ~/.cache/cars_jax/xla without it (the user cache dir)."""
    root = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(root, 'cars_jax', 'xla')


def resolve_cache_dir(setting: str) -> str | None:
    """The folder `--compilation_cache=setting` means, None for 'off'. 'auto': the
    JAX_COMPILATION_CACHE_DIR environment variable when set (the user's own choice wins),
    else `default_cache_dir()`; anything else is a folder."""
    if setting == OFF:
        return None
    if setting == 'auto':
        return os.environ.get('JAX_COMPILATION_CACHE_DIR') or default_cache_dir()
    return os.path.expanduser(setting)


MULTI_PROCESS_CPU_CACHE_NOTE = (
    'Compilation cache: off for this multi-process CPU run (each process compiles its own steps; '
    'see --compilation_cache).')


def cache_setting_for(setting: str, multi_process: bool, backend: str | None = None) -> str:
    """`setting`, except OFF for a run of several processes on CPU (gloo collectives).

    Why: with jaxlib 0.12.1, a two-process CPU run whose process 0 serialised its compiled train
    step into the cache (JAX writes from process 0 only) deadlocked in that step's first
    collective, both processes waiting in gloo forever; with nothing written (or jaxlib 0.12.0.1)
    the same run finished. Compiling is cheap beside a multi-process run, a hang is not."""
    if not multi_process or setting == OFF:
        return setting
    if backend is None:
        import jax
        backend = jax.default_backend()
    return OFF if backend == 'cpu' else setting


def enable_compilation_cache(setting: str = 'auto') -> str | None:
    """Points JAX's persistent compilation cache at `resolve_cache_dir(setting)` before the
    first compile; returns the folder, or None when off or not writable (then a run simply
    compiles, as without a cache)."""
    import jax
    path = resolve_cache_dir(setting)
    if path is None:
        return None
    try:
        ensure_writable_dir(path)
    except OSError:
        return None
    jax.config.update('jax_compilation_cache_dir', path)
    return path
