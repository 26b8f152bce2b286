"""JAX's persistent compilation cache for runs started from the command line.

The seed's train step takes 10-30 s to compile on a CPU (more with the decode-once cache path
or several shapes); with the cache on disk, a resumed or repeated run with the same config,
jax version and machine loads the compiled step instead (measured in BENCHMARKS.md). JAX keys
each entry by the program, the compile options (XLA_FLAGS included), the backend and the jax
version, so a stale entry is never used: a change makes a new one.
"""
from __future__ import annotations

import os

OFF = 'off'


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


def enable_compilation_cache(setting: str = 'auto') -> str | None:
    """Points JAX's persistent compilation cache at `resolve_cache_dir(setting)` before the
    first compile; returns the folder, or None when off or not writable (then a run simply
    compiles, as without a cache)."""
    import jax
    path = resolve_cache_dir(setting)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f'.write_test_{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError:
        return None
    jax.config.update('jax_compilation_cache_dir', path)
    return path
