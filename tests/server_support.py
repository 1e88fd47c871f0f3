"""Start `python -m lora_trainer <command>` as a real server on a free port, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def cli_server(args: list[str], ready_path: str, *, timeout: float, poll_s: float = 0.2,
               cwd: Path | None = None) -> Iterator[tuple[str, bytes]]:
    """Yields (base URL, body of the first answer to GET `ready_path`); stops the server after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer", *args, "--port", str(port)], cwd=cwd,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(base + ready_path, timeout=2) as r:
                    body = r.read()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(poll_s)
        yield base, body
    finally:
        proc.terminate()
        proc.wait(30)
