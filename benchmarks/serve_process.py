"""A ``diffiml serve`` child process on free local ports: started, awaited until the model is ready, and stopped
with SIGTERM the way an orchestrator would. Used by ``diffiml bench serve`` and the serving tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port_block(count: int = 3) -> int:
    """A port P such that P .. P+count-1 were free a moment ago (HTTP, gRPC, metrics)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count >= 65535:
            continue
        try:
            holders = []
            for p in range(base, base + count):
                t = socket.socket()
                holders.append(t)
                t.bind(("127.0.0.1", p))
        except OSError:
            continue
        finally:
            for t in holders:
                t.close()
        return base
    raise RuntimeError("no block of free ports found")


class ServerProcess:
    """``with ServerProcess(bundle, max_batch=8) as server: server.http_url ...``"""

    def __init__(self, bundle: str | Path, *extra: str, log_path: Path | None = None, start_timeout_s: float = 180):
        self._bundle, self._extra = bundle, extra
        self._pick_ports()
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None

    def __enter__(self) -> ServerProcess:
        try:
            return self._start()
        except RuntimeError:
            if not self._handshake_race():
                raise
        # PyTriton's Python-backend stub sometimes cannot reach its own handshake socket while the machine is loaded
        # (seen once in a CI-like run, then not in reruns): a start-up race of the library, not of ours. Once more,
        # on fresh ports; any other failure, or the same twice, stands.
        if self.process is not None:  # whatever the failed start left in its process group
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._pick_ports()
        return self._start()

    def _pick_ports(self) -> None:
        self.port = free_port_block()
        self.http_url = f"127.0.0.1:{self.port}"
        self.grpc_url = f"127.0.0.1:{self.port + 1}"
        self.metrics_url = f"http://127.0.0.1:{self.port + 2}/metrics"
        self.command = [sys.executable, "-m", "diffiml.cli", "serve", "--bundle", str(self._bundle), "--port",
                        str(self.port), *self._extra]

    def _handshake_race(self) -> bool:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return False
        return "get_config_from_handshake_server" in text and "ConnectionRefusedError" in text

    def _start(self) -> ServerProcess:
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # Its own session: the server and everything it starts (tritonserver, the backend stub) form one process
        # group, which is how the tests check that nothing is left behind.
        self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"diffiml serve exited with {self.process.returncode} before it was ready")
            if self.ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"diffiml serve was not ready after {self.start_timeout_s:.0f} s")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/models/diffiml/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, wait; returns the exit status (kills the group if it does not stop in time)."""
        if self.process is None or self.returncode is not None:
            return self.returncode or 0
        self.process.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.returncode = self.process.wait()
        return self.returncode

    def group_alive(self) -> bool:
        """Whether a process of the server's group (tritonserver, the backend stub) is still running. Zombies do
        not count: an exited helper waits a moment for init to reap it."""
        assert self.process is not None
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == self.process.pid and fields[0] != "Z":
                return True
        return False

    def group_gone(self, grace_s: float = 10.0) -> bool:
        """Whether the whole group has exited, allowing ``grace_s`` for processes that are still on their way out
        (tritonserver's backend stub can outlive the server process by a moment)."""
        deadline = time.monotonic() + grace_s
        while self.group_alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def __exit__(self, *_: object) -> None:
        self.stop()
