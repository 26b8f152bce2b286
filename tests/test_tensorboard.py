"""TensorBoard event files: read back with a reader written here (TFRecord frames with their
CRCs, protobuf wire format), and with TensorBoard's own reader when it is installed."""
import glob
import io
import json
import os
import struct

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cars_jax import tensorboard as tb
from cars_jax.config import ConfigError, validate_config
from cars_jax.train import train_and_evaluate
from fixtures import make_colour_folders, run_config


# ---- an independent reader ---------------------------------------------------------------

def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_records(path):
    """The data of every TFRecord frame; both CRCs of each frame are checked."""
    buf, pos, out = open(path, 'rb').read(), 0, []
    while pos < len(buf):
        header = buf[pos:pos + 8]
        (n,) = struct.unpack('<Q', header)
        assert struct.unpack('<I', buf[pos + 8:pos + 12])[0] == _masked(header)
        data = buf[pos + 12:pos + 12 + n]
        assert struct.unpack('<I', buf[pos + 12 + n:pos + 16 + n])[0] == _masked(data)
        out.append(data)
        pos += 16 + n
    assert pos == len(buf)
    return out


def decode(msg: bytes) -> dict:
    """protobuf wire format -> {field number: [values]} (varint: int; I64/I32: raw bytes)."""
    fields, pos = {}, 0

    def varint():
        nonlocal pos
        shift = value = 0
        while True:
            b = msg[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return value
    while pos < len(msg):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 1:
            value, pos = msg[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = msg[pos:pos + 4], pos + 4
        elif wire == 2:
            n = varint()
            value, pos = msg[pos:pos + n], pos + n
        else:
            raise AssertionError(f'wire type {wire}')
        fields.setdefault(number, []).append(value)
    return fields


def read_events(path):
    """[(step, {tag: float or (height, width, channels, png)}, event fields)]."""
    out = []
    for data in read_records(path):
        ev = decode(data)
        assert len(ev[1][0]) == 8 and isinstance(struct.unpack('<d', ev[1][0])[0], float)
        values = {}
        for summary in ev.get(5, []):
            for v in decode(summary)[1]:
                v = decode(v)
                tag = v[1][0].decode()
                if 2 in v:
                    values[tag] = struct.unpack('<f', v[2][0])[0]
                else:
                    im = decode(v[4][0])
                    values[tag] = (im[1][0], im[2][0], im[3][0], im[4][0])
        out.append((ev.get(2, [0])[0], values, ev))
    return out


def _png(w=5, h=3, mode='RGB'):
    buf = io.BytesIO()
    Image.new(mode, (w, h), 'red').save(buf, format='PNG')
    return buf.getvalue()


# ---- the writer ----------------------------------------------------------------------------

def test_crc32c_known_values():
    assert tb.crc32c(b'123456789') == 0xE3069283          # the CRC-32C check value
    assert tb.crc32c(bytes(32)) == 0x8A9136AA             # RFC 3720 B.4
    assert tb.crc32c(b'') == 0
    data = bytes(range(256)) * 3
    assert tb.crc32c(data) == _crc32c_bitwise(data)


def test_event_file_round_trip(tmp_path):
    png = _png()
    (tmp_path / 'a.png').write_bytes(png)
    w = tb.EventWriter(str(tmp_path / 'logs'), start_step=7)
    w.scalars({'loss': 0.25, 'acc': 1, 'skipped_none': None, 'skipped_nan': float('nan')}, 3)
    w.scalars({'neg': -1.5}, 2 ** 40)
    w.image('pic', str(tmp_path / 'a.png'), 4)
    w.image('missing', str(tmp_path / 'nope.png'), 4)   # skipped, not an error
    w.close()
    (path,) = glob.glob(str(tmp_path / 'logs' / 'events.out.tfevents.*'))
    events = read_events(path)
    assert events[0][2][3] == [b'brain.Event:2']
    assert events[1][0] == 7 and decode(events[1][2][6][0]) == {1: [1]}   # SessionLog START
    assert [(s, v) for s, v, _ in events[2:4]] == [(3, {'loss': 0.25, 'acc': 1.0}),
                                                  (2 ** 40, {'neg': -1.5})]
    assert events[4][0] == 4 and events[4][1] == {'pic': (3, 5, 3, png)}
    assert len(events) == 5


def test_switch_off_writes_nothing(tmp_path):
    w = tb.open_run_writer(False, str(tmp_path))
    w.step(1, 0.5, 1e-3)
    w.epoch({'step': 1, 'val_loss': 1.0})
    w.close()
    assert not os.path.exists(tmp_path / tb.SUBDIR)


def test_the_switch_is_validated():
    c = run_config('/data')
    validate_config(c)
    assert c.tensorboard is True                   # configs/base.py: on by default
    fields = json.loads(c.to_json())
    fields.pop('tensorboard')
    with pytest.raises(ConfigError, match="no field 'tensorboard'"):
        validate_config(ml_collections.ConfigDict(fields))
    from cars_jax.config import migrate_run_config    # a run saved before the switch existed
    old = ml_collections.ConfigDict(migrate_run_config(fields))
    validate_config(old)
    assert old.tensorboard is True
    with pytest.raises(ConfigError, match='--config.tensorboard'):
        validate_config(ml_collections.ConfigDict(dict(fields, tensorboard=1)))


def test_tensorboards_own_reader_reads_it(tmp_path):
    ea = pytest.importorskip('tensorboard.backend.event_processing.event_accumulator')
    png = _png(4, 2, 'RGBA')
    (tmp_path / 'a.png').write_bytes(png)
    w = tb.EventWriter(str(tmp_path))
    for step in (1, 2, 3):
        w.scalars({'epoch/val_loss': 1.0 / step}, step)
    w.image('images/curves', str(tmp_path / 'a.png'), 3)
    w.close()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.IMAGES: 0, ea.SCALARS: 0})
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars('epoch/val_loss')]
    assert got == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    (img,) = acc.Images('images/curves')
    assert (img.step, img.height, img.width, img.encoded_image_string) == (3, 2, 4, png)


# ---- the training loop -----------------------------------------------------------------------

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return make_colour_folders(tmp_path_factory.mktemp('cars'))


def test_training_writes_the_metrics_and_figures(data_dir, tmp_path):
    """A run stopped at step 4 and resumed: the epoch scalars are metrics.jsonl's numbers, each
    step's loss is logged once per file, the figures are there; the switch turns it all off."""
    c = run_config(data_dir)                      # 2 epochs x 3 steps
    assert train_and_evaluate(c, str(tmp_path), stop_after_steps=4, quiet=True)['interrupted']
    train_and_evaluate(c, str(tmp_path), quiet=True)
    first, second = sorted(glob.glob(str(tmp_path / 'tensorboard' / 'events.out.tfevents.*')),
                           key=os.path.getmtime)
    a, b = read_events(first), read_events(second)
    assert 6 not in a[1][2] and b[1][0] == 4 and 6 in b[1][2]   # the resumed file: START at 4
    assert [s for s, v, _ in a if 'step/train_loss' in v] == [1, 2, 3, 4]
    assert [s for s, v, _ in b if 'step/train_loss' in v] == [5, 6]
    assert all(0 < v['step/lr'] < 1 for _, v, _ in a + b if 'step/lr' in v)

    rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
    epochs = [(s, v) for s, v, _ in a + b if 'epoch/val_loss' in v]
    assert [s for s, _ in epochs] == [r['step'] for r in rows] == [3, 6]
    for (_, v), r in zip(epochs, rows):
        for key in ('epoch', 'train_loss', 'val_loss', 'val_accuracy', 'lr', 'img_per_s'):
            np.testing.assert_allclose(v[f'epoch/{key}'], r[key], rtol=1e-6)
    images = {tag: (s, im) for s, v, _ in a + b for tag, im in v.items()
              if tag.startswith('images/')}
    assert images['images/curves'][0] == 6
    assert images['images/curves'][1][3] == open(tmp_path / 'curves.png', 'rb').read()
    assert images['images/val_confusion'][1][3] == open(tmp_path / 'eval' / 'val_confusion.png',
                                                        'rb').read()
    final = {k: x for _, v, _ in b for k, x in v.items() if k.startswith('final/')}
    report = json.load(open(tmp_path / 'final_report.json'))
    np.testing.assert_allclose(final['final/val_accuracy'], report['val']['accuracy'], rtol=1e-6)

    off = tmp_path / 'off'
    c_off = run_config(data_dir, tensorboard=False)
    assert train_and_evaluate(c_off, str(off), stop_after_steps=1, quiet=True)['interrupted']
    assert os.path.isdir(off / 'checkpoints') and not os.path.exists(off / 'tensorboard')
