"""What a run prints, and how it stays readable when the console or the disk goes away.

`console` prints through a closed pipe; `Reporter` is a run's progress log (workdir/log.txt,
then the console); `fmt_time` formats an ETA. A full disk makes Orbax's background save threads
print pages of tracebacks: `MuteOnDiskFull` (a log filter) and `closed_on_error` (around the
training loop) mute stderr at its first sign, keeping a private copy of it (`mute_stderr`) for
the one error line the user should read.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys
import threading
from typing import Any


def console(msg: str, stream: Any = None) -> None:
    """print(msg) that survives a closed pipe: `python main.py | head` after head exited, or
    `| tee log` killed by the same Ctrl-C. The stream's descriptor is then pointed at
    /dev/null, so later lines (and the interpreter's last flush) neither raise
    BrokenPipeError nor change the exit status."""
    stream = stream if stream is not None else sys.stdout
    try:
        print(msg, file=stream, flush=True)
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):   # no descriptor (a test's StringIO)
            pass


class Reporter:
    """Prints progress and keeps a copy in workdir/log.txt, written first: a console that
    has gone away (a closed pipe) never costs the copy."""

    def __init__(self, workdir: str, quiet: bool = False, primary: bool = True):
        self.path, self.quiet, self.primary = os.path.join(workdir, 'log.txt'), quiet, primary

    def __call__(self, msg: str) -> None:
        if not self.primary:       # multi-process: process 0 speaks for the run
            return
        with open(self.path, 'a') as f:
            f.write(msg + '\n')
        if not self.quiet:
            console(msg)


def fmt_time(seconds: float) -> str:
    """H:MM:SS (negative: 0:00:00)."""
    seconds = int(max(seconds, 0))
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


# ---- a full disk ------------------------------------------------------------------------------

def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def mute_stderr() -> int:
    """Points fd 2 at /dev/null (every thread's output, Python's and C++'s) and returns a
    private copy of the real stderr, for the one error line that should be read. Idempotent:
    later calls return the same copy (the first sign of a full disk mutes, the exit reuses it)."""
    if _MUTED_STDERR:
        return _MUTED_STDERR[0]
    sys.stdout.flush()
    sys.stderr.flush()
    own = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    _MUTED_STDERR.append(own)
    return own


_MUTED_STDERR: list[int] = []   # the private copy of fd 2 once muted (process-wide, like fd 2)


class MuteOnDiskFull(logging.Filter):
    """A log filter for the console handler: the first library log record about a full disk
    (Orbax's save threads log it the moment a write fails, before the training loop can see
    the error) is written as its one line to the real stderr, and stderr is muted from then
    on. Without this, the failing save threads' tracebacks ("Event loop is closed", pages of
    them) can reach the console in the window before the loop mutes it."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if _MUTED_STDERR or not _mentions_disk_full(record):
            return not _MUTED_STDERR
        own = mute_stderr()
        try:
            line = ' '.join(self.handler.format(record).split('\n')[0].split())
        except Exception:  # noqa: BLE001 - a log line must never raise
            line = 'a checkpoint write failed: the disk is full'
        os.write(own, (line + '\n').encode())
        return False


def _mentions_disk_full(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and is_disk_full(exc):
        return True
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001
        return False
    return any(f'[Errno {n}]' in msg or os.strerror(n) in msg
               for n in (errno.ENOSPC, errno.EDQUOT))


@contextlib.contextmanager
def closed_on_error(*managers):
    """On an error, let in-flight saves finish or fail before the error is reported: a
    process that exits under Orbax's background threads prints pages of their tracebacks.
    A full disk mutes stderr first; the error carries the private copy as `stderr_fd`."""
    try:
        yield
    except BaseException as e:
        if is_disk_full(e):
            e.stderr_fd = mute_stderr()   # the failing save threads print pages while closing
        for mgr in managers:
            try:
                mgr.close()
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise


__all__ = ['console', 'Reporter', 'fmt_time', 'is_disk_full', 'mute_stderr', 'MuteOnDiskFull',
           'closed_on_error', 'StopSignal']


# ---- Ctrl-C and SIGTERM -------------------------------------------------------------------------

class StopSignal:
    """SIGINT/SIGTERM set a flag; a loop (training, pretraining) saves a checkpoint at the next
    step and exits. A second Ctrl-C stops at once."""

    def __init__(self):
        self.received: int | None = None

    def __call__(self, signum, frame):
        if self.received is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is threading.main_thread():
            old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield self
            finally:
                for s, h in old.items():
                    signal.signal(s, h)
        else:
            yield self
