"""Real `python -m lora_trainer ...` processes for tests that send signals or race two runs.

Every wait here is for something observable (a line printed, a job state over HTTP, the process
ending), with a generous deadline that only matters when something is broken.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

_STOP = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
DEADLINE = 240.0  # seconds; a healthy run reaches each state in a few seconds on 2 CPU cores
TINY_TRAIN = ["--resolution", "64", "--min-bucket-reso", "32", "--max-bucket-reso", "128",
              "--bucket-reso-steps", "32", "--rank", "4", "--device", "cpu", "--save-precision", "float"]


class Proc:
    """A running `python -m lora_trainer` whose stdout lines are collected as they come."""

    def __init__(self, args: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
                 stdout_pipe_only: bool = False, ignored: tuple[int, ...] = ()):
        """`ignored`: signals the process starts with ignored (as `nohup` does with SIGHUP); the other
        stop signals start at their defaults, as in a terminal, whatever the test runner inherited."""
        self.args = args
        self.stderr_path = None

        # A small Python sets the dispositions, then becomes the real process (exec keeps "ignored" and
        # "default"; preexec_fn is unsafe beside the tests' threads).
        start = ("import os, signal, sys\n"
                 f"for s in {[int(s) for s in _STOP]}: signal.signal(s, signal.SIG_DFL)\n"
                 f"for s in {[int(s) for s in ignored]}: signal.signal(s, signal.SIG_IGN)\n"
                 "os.execv(sys.executable, [sys.executable, '-m', 'lora_trainer', *sys.argv[1:]])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", start, *args] if os.name == "posix" else
            [sys.executable, "-m", "lora_trainer", *args], cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout, self.lines, True), daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read, args=(self.proc.stderr, self.errors, False),
                                            daemon=True)
        self._err_reader.start()

    def _read(self, stream, into: list[str], notify: bool) -> None:
        try:
            for line in stream:
                into.append(line.rstrip("\n"))
                if notify:
                    self._new.put(line)
        except (OSError, ValueError):  # the test closed the pipe on purpose
            pass
        if notify:
            self._new.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for_line(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        """The first stdout line matching `pattern` (regex), waiting for it as it is printed."""
        rx = re.compile(pattern)
        for line in list(self.lines):
            if m := rx.search(line):
                return m
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r}; exit {self.proc.poll()}\n"
                                     + "\n".join(self.lines[-30:] + self.errors[-30:]))
            if m := rx.search(line):
                return m

    def close_stdout(self) -> None:
        """Like a terminal that went away: the process's next writes fail."""
        self.proc.stdout.close()

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = DEADLINE) -> int:
        code = self.proc.wait(timeout)
        self._err_reader.join(10)
        self._reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    @property
    def stderr(self) -> str:
        return "\n".join(self.errors)

    @property
    def stdout(self) -> str:
        return "\n".join(self.lines)


def step_lines(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.match(r"step (\d+)/", line))]


def http(method: str, url: str, body: Any = None, *, auth: str | None = None,
         timeout: float = 30) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def wait_until(check, *, what: str, timeout: float = DEADLINE, poll_s: float = 0.1) -> Any:
    """Poll `check()` until it returns something truthy (an observable state), then return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll_s)


def unprivileged_prefix() -> list[str] | None:
    """A command prefix under which file permission bits apply: [] for a normal user; for root (who
    ignores them) `setpriv` without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH; None when neither works
    here. Checked by trying to create a file in a read-only folder."""
    import shutil
    import tempfile

    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if not setpriv:
            return None
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        try:
            probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"],
                                   check=False, capture_output=True, timeout=60)
        finally:
            folder.chmod(0o755)
        return prefix if probe.returncode != 0 else None


def run_cli(args: list[str], *, prefix: list[str] | None = None, timeout: float = DEADLINE,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m lora_trainer ARGS` to completion (optionally under `prefix`), output captured."""
    return subprocess.run([*(prefix or []), sys.executable, "-m", "lora_trainer", *args], cwd=cwd,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
                          check=False, capture_output=True, text=True, timeout=timeout)
