"""Files written whole or not at all.

Every file the package writes goes to a temporary name beside its target and is then renamed
over it (`os.replace`, atomic on one file system): a reader, a kill or a full disk never leaves
half a file under the real name. The temporary name is `<path>.tmp<pid>.<random>`: unique per
process and per host (several processes may build the same cache on a shared disk), with no
image or `.npy` ending, so a leftover is never taken for data. A write that fails removes it.
"""
from __future__ import annotations

import json
import os
import secrets
from typing import Any, Callable, TypeVar

T = TypeVar('T')


def atomic_write(path: str, write: Callable[[str], T]) -> T:
    """write(tmp_path), then the file at tmp_path replaces `path`; returns what write returned.
    `write` names the format itself where the writer would guess it from the file's ending."""
    tmp = f'{path}.tmp{os.getpid()}.{secrets.token_hex(4)}'
    try:
        out = write(tmp)
        os.replace(tmp, path)
        return out
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, write: Callable[[Any], None], **open_kwargs: Any) -> None:
    """write(f) on a text file opened for writing (open_kwargs: encoding, newline), then the
    file replaces `path`."""
    def to_file(tmp: str) -> None:
        with open(tmp, 'w', **open_kwargs) as f:
            write(f)
    atomic_write(path, to_file)


def write_json_atomic(path: str, obj: Any, **dump_kwargs: Any) -> None:
    """json.dump(obj, f, **dump_kwargs) to `path`, atomically."""
    atomic_write_text(path, lambda f: json.dump(obj, f, **dump_kwargs), encoding='utf-8')


def save_figure_atomic(fig: Any, path: str, dpi: int, fmt: str | None = None) -> None:
    """fig.savefig in `fmt` (None: the format of `path`'s ending, png without one),
    atomically; the figure is closed either way. The folder is created when missing."""
    import matplotlib.pyplot as plt
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fmt = fmt or os.path.splitext(path)[1][1:].lower() or 'png'
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)


def ensure_writable_dir(folder: str) -> None:
    """Creates `folder` and proves it writable by writing a probe file (os.access lies for
    root); raises OSError otherwise. The probe's name is unique per process and host: every
    process of a multi-process run probes the same shared folder at once."""
    os.makedirs(folder, exist_ok=True)
    probe = os.path.join(folder, f'.write_test{os.getpid()}.{secrets.token_hex(4)}')
    with open(probe, 'w') as f:
        f.write('ok')
    os.remove(probe)
