"""Stop signals (Ctrl+C, `kill`, systemd/Docker stop, a closing terminal) as a graceful stop.

`train` and `serve` run inside `GracefulStop`: the first SIGINT, SIGTERM or SIGHUP calls
`on_stop(signum)` (the running step finishes, the LoRA and a resumable state are saved), a
second one aborts at once. Afterwards `exit_code` is the shell's convention for "ended by that
signal" (128 + number: 130 after SIGINT, 143 after SIGTERM, 129 after SIGHUP) so a script can
tell a stopped run from a finished one. A terminal that closed (SIGHUP) or a reader that went
away leaves stdout/stderr broken: `SafeStreams` keeps a failing print from ending the run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

# SIGHUP does not exist on Windows; SIGBREAK (Ctrl+Break) only there.
STOP_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK") if hasattr(signal, name))


class Aborted(KeyboardInterrupt):
    """A second stop signal: give up without saving (raised in the main thread)."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_code(signum: int) -> int:
    """What a shell reports for a process ended by `signum` (128 + its number)."""
    return 128 + int(signum)


class GracefulStop:
    """Install handlers for STOP_SIGNALS while the block runs (main thread only; elsewhere a no-op).

    on_stop(signum) runs once, on the first signal, inside the signal handler: keep it short
    (set an Event, start a thread). `message(signum)` is printed to stderr at that moment.
    A signal the process inherited as ignored stays ignored (`nohup` means "keep running when the
    terminal closes", as Python itself leaves an ignored SIGINT alone); `keep_ignored=False` is for a
    worker whose launcher forwards signals on purpose.
    """

    def __init__(self, on_stop: Callable[[int], None], *,
                 message: Callable[[int], str] | None = None, keep_ignored: bool = True) -> None:
        self.on_stop = on_stop
        self.message = message
        self.keep_ignored = keep_ignored
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else exit_code(self.signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: the user really wants out now
            raise Aborted(signum)
        self.signum = signum
        if self.message is not None:
            with contextlib.suppress(OSError, ValueError):
                print(self.message(signum), file=sys.stderr, flush=True)
        self.on_stop(signum)

    def __enter__(self) -> GracefulStop:  # noqa: PYI034 - not meant to be subclassed
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                try:
                    if self.keep_ignored and signal.getsignal(sig) is signal.SIG_IGN:
                        continue  # ignored by whoever started us (nohup: SIGHUP; a script's `cmd &`: SIGINT)
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (OSError, ValueError):  # not settable here (embedded interpreters)
                    pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()


class _SafeStream:
    """A text stream whose writes never raise: once the other end is gone (EIO after a hang-up,
    EPIPE after the reader closed), its file descriptor is pointed at the null device, so later
    writes, and the interpreter's final flush, succeed silently."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._broken = False

    def _drop(self) -> None:
        self._broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = self._stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):
                self._drop()
        return len(text)

    def flush(self) -> None:
        if not self._broken:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._drop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def safe_streams():
    """sys.stdout/sys.stderr that survive a closed terminal or pipe while the block runs."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _SafeStream(sys.stdout), _SafeStream(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        for wrapper, original in zip((sys.stdout, sys.stderr), saved):
            with contextlib.suppress(OSError, ValueError):
                wrapper.flush()
        sys.stdout, sys.stderr = saved
