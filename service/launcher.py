"""Run ``python -m service`` as a child process on a free loopback port and wait until it is ready.

Used by the tests and ``bench/serve.py``, which drive the real server over HTTP from another process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.settings import REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServiceProcess:
    """``python -m service --host 127.0.0.1 --port PORT *args`` run from the source tree ``source`` (default: this
    one; the benchmarks start other checkouts to compare); output goes to ``log_path``."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None, source: Path = REPO) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), *args]
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, cwd=source, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Poll ``/v2/health/ready`` until 200 (every model loaded and warm)."""
        self._wait_for("/v2/health/ready", timeout)

    def wait_live(self, timeout: float = 120.0) -> None:
        """Poll ``/v2/health/live`` until 200 (listening; models may still be loading)."""
        self._wait_for("/v2/health/live", timeout)

    def _wait_for(self, path: str, timeout: float) -> None:
        """Raise with the server's log if it exits or ``path`` does not answer 200 in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}{path}", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{path} not 200 after {timeout} s:\n{self.log()}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful shutdown) and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode
