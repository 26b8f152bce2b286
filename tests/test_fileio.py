"""cars_jax.fileio: a file is written whole or not at all, and no temporary file is left."""
import json
import os

import pytest

from cars_jax.fileio import atomic_write, atomic_write_text, write_json_atomic


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
