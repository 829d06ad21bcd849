"""A real ``redis-server`` (Debian package) on a free loopback port, for the RedisCache tests.

Memory only (``--save "" --appendonly no``), in a temp dir that is deleted on ``close()``.
The server runs under ``fragrance_ops.processes.spawn_supervised``, like the brokers, so
it dies with the test process even when pytest is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

from fragrance_ops.brokers import free_port
from fragrance_ops.processes import spawn_supervised, stop_supervised

HOST = "127.0.0.1"
STOP_GRACE_SECONDS = 5.0


def redis_server_executable() -> str | None:
    """Path of ``redis-server`` (PATH, then the Debian location), or None if not installed."""
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    return found


def closed_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago): connects are refused."""
    return free_port(HOST)


class RedisServerError(RuntimeError):
    """redis-server is missing, exited, or did not answer PING in time (with its log tail)."""


class RedisServer:
    """One ``redis-server`` process owned by this Python process; restartable on its port."""

    def __init__(self, port: int | None = None, executable: str | None = None) -> None:
        self._executable = executable or redis_server_executable()
        if self._executable is None:
            raise RedisServerError("redis-server is not installed (apt-get install redis-server)")
        self.port = port if port is not None else free_port(HOST)
        self.work_dir = Path(tempfile.mkdtemp(prefix="fragrance-redis-"))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "redis.log"

    @property
    def pid(self) -> int | None:
        """The server's pid, which is also its process group id."""
        return self._proc.pid if self._proc is not None else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with self.log_path.open(encoding="utf-8", errors="replace") as log:
                return "".join(deque(log, maxlen=lines))
        except FileNotFoundError:
            return ""

    def start(self, timeout_s: float = 15.0) -> None:
        """Spawn the server and return once it answers PING as this very process."""
        if self._proc is not None:
            raise RedisServerError(f"{self!r} is already started")
        assert self._executable is not None
        command = [
            self._executable,
            "--port", str(self.port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.work_dir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self._proc = spawn_supervised(
                command,
                name="fragrance-redis",
                log=log,
                grace_s=STOP_GRACE_SECONDS,
                cwd=self.work_dir,
            )
        try:
            self._wait_ready(time.monotonic() + timeout_s)
        except BaseException:
            self.stop(grace_s=0.0)
            raise

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=0.5)
        try:
            while True:
                code = self._proc.poll()
                if code is not None:
                    raise RedisServerError(
                        f"redis-server on port {self.port} exited with {code}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(redis.RedisError):
                    # Free ports are racy: make sure the server answering is ours.
                    if client.ping() and client.info("server")["process_id"] == self._proc.pid:
                        return
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"redis-server on port {self.port} not ready:\n{self.log_tail()}"
                    )
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, grace_s: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; idempotent."""
        if self._proc is not None:
            stop_supervised(self._proc, grace_s)
            self._proc = None

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self.stop()
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self._proc is not None else "stopped"
        return f"<RedisServer {HOST}:{self.port} {state}>"
