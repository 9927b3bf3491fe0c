"""A real ``mlflow server`` for tests and benchmarks: sqlite backend, artifact proxy, loopback, a free port.

Used as a context manager; :meth:`MlflowServer.kill` simulates a crash (SIGKILL) and :meth:`MlflowServer.start`
brings it back on the same port and store. Every wait is bounded; leaving the ``with`` block stops it for sure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on ``127.0.0.1:<port>`` with its store and artifacts under ``root``.

    Args:
        root: folder for ``mlflow.db``, ``artifacts/`` and the server's log (``server.log``).
        port: the port; default a free one.
        start_timeout_s: longest wait for the server to answer ``/health``.
    """

    def __init__(self, root: Path, port: int | None = None, start_timeout_s: float = 180.0):
        self.root = Path(root)
        self.port = port or free_port()
        self.start_timeout_s = start_timeout_s
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = self.root / "server.log"

    def start(self) -> MlflowServer:
        """Start the server and wait until it answers; raise with the end of its log if it does not."""
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        with self.log_path.open("a") as log:
            # own process group: kill() takes the server's workers down with it
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        tail = self.log_path.read_text()[-3000:]
        raise RuntimeError(f"mlflow server on port {self.port} did not come up in {self.start_timeout_s:g} s:\n{tail}")

    def kill(self) -> None:
        """Crash the server (SIGKILL to its process group) and wait until it is gone."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout_s``."""
        self._signal(signal.SIGTERM, timeout_s)

    def _signal(self, signum: int, timeout_s: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signum)
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout_s)
        except ProcessLookupError:
            pass

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.process is not None:  # the workers of a SIGTERMed server may outlive it by a moment
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
