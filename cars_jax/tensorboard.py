"""TensorBoard event files, written without TensorFlow (or any other package).

A run's metrics are metrics.jsonl and PNGs; with config.tensorboard (the default) the training
loop also writes them to `workdir/tensorboard/events.out.tfevents.*`, for
`tensorboard --logdir=<workdir or a folder of runs>`:

    step/train_loss, step/lr      every train step (the step's batch loss and learning rate)
    epoch/<field>                 every number of the epoch's metrics.jsonl line
    images/curves                 curves.png, redrawn each epoch
    final/<split>_<metric>        the best checkpoint's scores at the end of training
    images/<eval PNG>             the end-of-training figures under workdir/eval/
                                  (confusion matrices, per-class accuracy)

Every event's step is the global train step, so all curves share one x axis (epoch/epoch
gives the epoch of a step). A resumed run opens a new file that starts with a SessionLog
START at the resumed step, TensorBoard's sign to drop what an earlier file logged from that
step on (steps run again after the last checkpoint).

The format: a TFRecord file (length, masked CRC-32C of the length, data, masked CRC-32C of the
data) of `Event` protocol buffers (tensorflow/core/util/event.proto) holding `Summary` values
(tensorflow/core/framework/summary.proto) with `simple_value` scalars or PNG `image`s. The few
messages needed are encoded here by hand.
"""
from __future__ import annotations

import glob
import math
import os
import socket
import struct
import time
from typing import Any, Mapping

SUBDIR = 'tensorboard'
FILE_VERSION = b'brain.Event:2'


# ---- CRC-32C (Castagnoli), as TFRecord frames use it ------------------------------------

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord frame around `data`."""
    length = struct.pack('<Q', len(data))
    return (length + struct.pack('<I', masked_crc32c(length)) + data
            + struct.pack('<I', masked_crc32c(data)))


# ---- protocol buffer wire format (only what Event/Summary need) ------------------------------

def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF   # int64 two's complement, as protobuf encodes negatives
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_double(number: int, value: float) -> bytes:
    return _varint(number << 3 | 1) + struct.pack('<d', value)


def _field_float(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack('<f', value)


def scalar_value(tag: str, value: float) -> bytes:
    """Summary.Value {tag: 1, simple_value: 2}."""
    return _field_bytes(1, tag.encode()) + _field_float(2, float(value))


def png_size(png: bytes) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's IHDR chunk."""
    if png[:8] != b'\x89PNG\r\n\x1a\n' or png[12:16] != b'IHDR':
        raise ValueError('not a PNG file')
    width, height = struct.unpack('>II', png[16:24])
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(png[25], 4)
    return height, width, channels


def image_value(tag: str, png: bytes) -> bytes:
    """Summary.Value {tag: 1, image: 4 = Image {height: 1, width: 2, colorspace: 3,
    encoded_image_string: 4}}."""
    height, width, channels = png_size(png)
    image = (_field_varint(1, height) + _field_varint(2, width) + _field_varint(3, channels)
             + _field_bytes(4, png))
    return _field_bytes(1, tag.encode()) + _field_bytes(4, image)


def event(step: int, *, values: list[bytes] | None = None, file_version: bytes | None = None,
          session_start: bool = False, wall_time: float | None = None) -> bytes:
    """Event {wall_time: 1, step: 2, file_version: 3 | summary: 5 | session_log: 6}."""
    out = _field_double(1, time.time() if wall_time is None else wall_time)
    out += _field_varint(2, int(step))
    if file_version is not None:
        out += _field_bytes(3, file_version)
    if values is not None:
        out += _field_bytes(5, b''.join(_field_bytes(1, v) for v in values))
    if session_start:
        out += _field_bytes(6, _field_varint(1, 1))   # SessionLog {status: START}
    return out


# ---- writers ---------------------------------------------------------------------------------

class EventWriter:
    """Appends events to a new events.out.tfevents.* file under `logdir`."""

    def __init__(self, logdir: str, start_step: int | None = None):
        os.makedirs(logdir, exist_ok=True)
        name = (f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.'
                f'{os.getpid()}.{id(self) % 100000}')
        self.path = os.path.join(logdir, name)
        self._f = open(self.path, 'ab')
        self._write(event(0, file_version=FILE_VERSION))
        if start_step:
            self._write(event(start_step, session_start=True))
        self.flush()

    def _write(self, record: bytes) -> None:
        self._f.write(tfrecord(record))

    def scalars(self, values: Mapping[str, Any], step: int) -> None:
        """One event with every finite number of `values` (others, e.g. None, are skipped)."""
        items = [scalar_value(tag, v) for tag, v in values.items()
                 if isinstance(v, (int, float)) and math.isfinite(v)]
        if items:
            self._write(event(step, values=items))

    def image(self, tag: str, png_path: str, step: int) -> None:
        """The PNG file `png_path` as image `tag` (skipped when it is missing or unreadable)."""
        try:
            with open(png_path, 'rb') as f:
                png = f.read()
            value = image_value(tag, png)
        except (OSError, ValueError):
            return
        self._write(event(step, values=[value]))

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


class RunWriter:
    """What the training loop logs (see the module docstring); `writer` None writes nothing.
    A failed write (a full disk, say) turns the event log off instead of stopping training:
    the checkpoint writes report such errors."""

    def __init__(self, writer: EventWriter | None):
        self.writer = writer

    def _do(self, fn, *args) -> None:
        if self.writer is None:
            return
        try:
            fn(self.writer, *args)
        except OSError:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except OSError:
                pass

    def step(self, step: int, loss: float, lr: float) -> None:
        self._do(lambda w: w.scalars({'step/train_loss': loss, 'step/lr': lr}, step))

    def epoch(self, record: Mapping[str, Any], curves_png: str | None = None) -> None:
        def write(w: EventWriter) -> None:
            step = int(record['step'])
            w.scalars({f'epoch/{k}': v for k, v in record.items()
                       if k != 'step' and not isinstance(v, bool)}, step)
            if curves_png:
                w.image('images/curves', curves_png, step)
            w.flush()
        self._do(write)

    def final(self, report: Mapping[str, Any], eval_dir: str, step: int) -> None:
        def write(w: EventWriter) -> None:
            values = {'final/best_epoch': report.get('best_epoch')}
            for split in ('val', 'test'):
                for metric in ('accuracy', 'top5', 'loss'):
                    values[f'final/{split}_{metric}'] = (report.get(split) or {}).get(metric)
            w.scalars(values, step)
            for path in sorted(glob.glob(os.path.join(eval_dir, '*.png'))):
                w.image(f'images/{os.path.splitext(os.path.basename(path))[0]}', path, step)
            w.flush()
        self._do(write)

    def close(self) -> None:
        self._do(EventWriter.close)
        self.writer = None


def open_run_writer(enabled: bool, workdir: str, start_step: int = 0) -> RunWriter:
    """The training loop's writer: event files under workdir/tensorboard when `enabled`
    (config.tensorboard; process 0 only), else one that writes nothing."""
    if not enabled:
        return RunWriter(None)
    try:
        return RunWriter(EventWriter(os.path.join(workdir, SUBDIR), start_step))
    except OSError:
        return RunWriter(None)


__all__ = ['EventWriter', 'RunWriter', 'open_run_writer', 'crc32c', 'masked_crc32c',
           'tfrecord', 'SUBDIR']
