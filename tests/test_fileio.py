"""cars_jax.fileio: a file is written whole or not at all, no temporary file is left, and a
folder is proved writable without tripping over other processes doing the same."""
import json
import os

import pytest

from cars_jax.fileio import atomic_write, atomic_write_text, ensure_writable_dir, write_json_atomic


def test_a_write_replaces_the_file_and_returns_what_the_writer_returned(tmp_path):
    path = str(tmp_path / 'a.bin')
    assert atomic_write(path, lambda tmp: open(tmp, 'wb').write(b'abc')) == 3
    assert open(path, 'rb').read() == b'abc'
    write_json_atomic(path, {'x': [1, 2]}, indent=2)
    assert json.load(open(path)) == {'x': [1, 2]}
    assert os.listdir(tmp_path) == ['a.bin']


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    path = str(tmp_path / 'a.csv')
    atomic_write_text(path, lambda f: f.write('old\n'), newline='', encoding='utf-8')

    def half_then_fail(f):
        f.write('new, half')
        raise OSError(28, 'No space left on device')
    with pytest.raises(OSError):
        atomic_write_text(path, half_then_fail)
    assert open(path).read() == 'old\n'
    assert os.listdir(tmp_path) == ['a.csv']


def test_processes_probing_one_folder_at_once_do_not_trip_over_each_others_probe(tmp_path,
                                                                                  monkeypatch):
    # every process of a multi-process run probes the shared run directory at the same time:
    # another process's whole probe lands between this one's write and its removal
    folder = str(tmp_path / 'run')
    real_remove, nested = os.remove, []

    def remove_after_another_probe(path):
        if not nested:
            nested.append(path)
            ensure_writable_dir(folder)
        real_remove(path)

    monkeypatch.setattr(os, 'remove', remove_after_another_probe)
    ensure_writable_dir(folder)
    assert nested and os.listdir(folder) == []      # both probes ran; neither left a file


def test_an_unwritable_folder_raises_oserror(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    with pytest.raises(OSError):
        ensure_writable_dir(str(blocker / 'run'))
