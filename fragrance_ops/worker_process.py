"""A worker in a child process: the demo runs one, tests start, kill and restart them.

``supervise()`` restarts it whenever it exits on its own, as a deployment's supervisor
does (Kubernetes' restart policy, Compose's ``restart: unless-stopped``): the worker
crashes by design when it cannot go on (a failed batch, outputs not acknowledged in time,
input stalled), and a restart resumes from the committed offsets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fragrance_ops.processes import (
    kill_supervised,
    reap_supervised,
    spawn_supervised,
    stop_supervised,
)


def worker_env(**settings: str) -> dict[str, str]:
    """This process's environment plus settings given as ``KAFKA__TOPIC_PREFIX="x."``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.update({f"FRAGRANCE_OPS_{name.upper()}": value for name, value in settings.items()})
    return env


@dataclass(frozen=True)
class Exit:
    """A worker exit its supervisor restarted from."""

    returncode: int
    log: str  # what that run of the worker logged


class WorkerProcess:
    """Runs the worker CLI in its own process group; ``ready`` waits for Faust's readiness."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self._log_offset = 0
        self._env = env
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.exits: list[Exit] = []  # the exits a supervisor restarted from
        self._lock = threading.RLock()  # start/kill/stop against the supervisor's restarts
        self._supervisor: threading.Thread | None = None
        self._unsupervised = threading.Event()

    def supervise(self, poll_s: float = 0.5) -> None:
        """From now until ``stop()``: restart the worker whenever it exits on its own."""
        if self._supervisor is None:
            self._unsupervised.clear()
            self._supervisor = threading.Thread(
                target=self._restart_exited, args=(poll_s,), name="worker-supervisor", daemon=True
            )
            self._supervisor.start()

    def _restart_exited(self, poll_s: float) -> None:
        while not self._unsupervised.wait(poll_s):
            with self._lock:
                process = self._process
                if self._unsupervised.is_set() or process is None or process.poll() is None:
                    continue
                self.exits.append(Exit(process.returncode, self.log_since_start()))
                reap_supervised(process)  # what its group left, and our end of its pipe
                try:
                    self._start(timeout_s=90.0)
                except (RuntimeError, TimeoutError):  # tried again at the next poll
                    continue

    def start(self, timeout_s: float = 90.0) -> None:
        with self._lock:
            self._start(timeout_s)

    def _start(self, timeout_s: float) -> None:
        self._log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        with self._log_path.open("ab") as log:  # the child keeps its own descriptor
            self._process = spawn_supervised(
                [sys.executable, "-m", "fragrance_ops", "worker", "--loglevel", "info"],
                name="fragrance-ops-worker",
                log=log,
                grace_s=30.0,
                env=self._env,
            )
        self.starts += 1
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"worker exited with {self._process.returncode}:\n{self.tail()}")
            if "Worker ready" in self.log_since_start():
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout_s}s:\n{self.tail()}")

    @property
    def pid(self) -> int | None:
        """The worker's pid (the shell watchdog execs it), while started."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """Started and not exited (a crashed worker is not running)."""
        return self._process is not None and self._process.poll() is None

    def log_since_start(self) -> str:
        with self._log_path.open("rb") as log:
            log.seek(self._log_offset)
            return log.read().decode("utf-8", "replace")

    def tail(self, lines: int = 60) -> str:
        text = self._log_path.read_bytes().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown hooks, no final commit."""
        with self._lock:
            if self._process is not None:
                kill_supervised(self._process)
                self._process = None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the worker (and its supervision)."""
        self._unsupervised.set()
        with self._lock:
            if self._process is not None:
                stop_supervised(self._process, timeout_s)
                self._process = None
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None

    def __enter__(self) -> WorkerProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
