"""Starts a real `sl-serve` process on free loopback ports for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, args: list[str], timeout: float = 600.0) -> None:
        self.grpc_port, self.http_port = free_port(), free_port()
        script = Path(sys.executable).parent / "sl-serve"
        cmd = [
            str(script),
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--log-level",
            "warning",
            *args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                # Short waits: notice at once if the process dies at start-up.
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"sl-serve exited {self.proc.returncode}:\n{self.log()}"
                    ) from None
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(
                        f"sl-serve not ready in {timeout} s:\n{self.log()}"
                    ) from None
                continue
            if line.startswith("sl-serve ready"):
                return

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:  # closed at EOF: no unclosed-pipe warnings later
            for line in self.proc.stdout:
                self.output.append(line)
                self.lines.put(line)

    def log(self) -> str:
        return "".join(self.output[-80:])

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(timeout=10)


@contextlib.contextmanager
def running_server(args: list[str]) -> Iterator[ServerProcess]:
    server = ServerProcess(args)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.terminate()
