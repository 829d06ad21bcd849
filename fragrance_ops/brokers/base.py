"""Lifecycle shared by the local brokers: ports, readiness, teardown, no orphans.

Every broker runs in its own process group (``start_new_session=True``) so that
stopping it also takes down anything it forked. Three layers make sure no broker
outlives the Python process that started it:

1. ``stop()``/``kill()``/``close()`` (and the context manager) signal the group;
2. an ``atexit`` hook stops every broker still running at interpreter exit;
3. a tiny shell watchdog inside the group holds the read end of a pipe whose
   write end only the parent holds. When the parent dies, even by SIGKILL where
   ``atexit`` never runs, the pipe reads EOF and the watchdog kills the group.
"""

from __future__ import annotations

import abc
import atexit
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from fragrance_ops.processes import (
    kill_supervised,
    reap_supervised,
    spawn_supervised,
    stop_supervised,
)

LOCALHOST = "127.0.0.1"
LOG_TAIL_LINES = 40
STOP_GRACE_SECONDS = 15.0


class BrokerError(RuntimeError):
    """Base class for the harness's own errors (not Kafka errors)."""


class BrokerSetupError(BrokerError):
    """A prerequisite is missing (jars, java, binary); says how to get it."""


class BrokerStartError(BrokerError):
    """The broker exited or never became ready; carries the tail of its log."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        if log_tail:
            message = f"{message}\n--- last {LOG_TAIL_LINES} log lines ---\n{log_tail}"
        super().__init__(message)


def free_port(host: str = LOCALHOST, exclude: frozenset[int] = frozenset()) -> int:
    """Return a port that was free a moment ago (bind to 0, read it back).

    Racy by nature, but a fresh ephemeral port is rarely reused within the
    second it takes a broker to bind it, and it lets many runs share a machine.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in exclude:
            return port


def _port_accepts(host: str, port: int) -> bool:
    """Cheap TCP probe, so the Kafka client is not spammed with refused connects."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


_instances: weakref.WeakSet[LocalBroker] = weakref.WeakSet()
_running: set[LocalBroker] = set()  # strong refs: a running broker is never GC'd
_registry_lock = threading.Lock()


@atexit.register
def _close_all_at_exit() -> None:
    """Second line of defence: the interpreter is exiting with brokers around."""
    with _registry_lock:
        brokers = set(_instances) | _running
    for broker in brokers:
        broker.close(grace=5.0)


class LocalBroker(abc.ABC):
    """A Kafka-compatible broker process on 127.0.0.1 owned by this Python process.

    Subclasses say how to launch the broker (``_command``) and optionally prepare
    its directory first (``_prepare``); this class owns everything else.
    """

    #: Whether data survives ``restart()`` (True only for disk-backed brokers).
    persistent: ClassVar[bool] = False
    #: Short name used in messages and the work dir prefix.
    kind: ClassVar[str] = "broker"

    def __init__(self, work_dir: Path | None = None, port: int | None = None) -> None:
        self._owns_work_dir = work_dir is None
        if work_dir is None:
            work_dir = Path(tempfile.mkdtemp(prefix=f"fragrance-{self.kind}-"))
        else:
            work_dir = Path(work_dir).resolve()
            work_dir.mkdir(parents=True, exist_ok=True)
        # Only a dir we created is ours to delete: on close(), at exit, or when
        # this object is garbage collected (which is why no __del__ is needed).
        # Not via the finalizer's own exit hook: that may run before ours and
        # pull the data dir out from under a broker that is still running.
        self._dir_finalizer: weakref.finalize[[str, bool], LocalBroker] | None = None
        if self._owns_work_dir:
            self._dir_finalizer = weakref.finalize(self, shutil.rmtree, str(work_dir), True)
            self._dir_finalizer.atexit = False
        self._work_dir = work_dir
        self._port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        with _registry_lock:
            _instances.add(self)

    # -- what subclasses provide -------------------------------------------------

    @abc.abstractmethod
    def _command(self) -> list[str]:
        """The argv that runs the broker in the foreground."""

    def _prepare(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Make the work dir ready before each start (config files, formatting)."""

    @property
    def cluster_id(self) -> str | None:
        """The id our broker reports in metadata, once known.

        Readiness requires it to match, so a stranger that grabbed the port
        (free ports are racy) is never mistaken for our broker.
        """
        return None

    # -- properties ------------------------------------------------------------

    @property
    def host(self) -> str:
        return LOCALHOST

    @property
    def port(self) -> int:
        return self._port

    @property
    def bootstrap_servers(self) -> str:
        """``host:port`` for ``bootstrap.servers``; stable across restarts."""
        return f"{self.host}:{self._port}"

    @property
    def work_dir(self) -> Path:
        return self._work_dir

    @property
    def log_path(self) -> Path:
        """The broker's stdout+stderr, appended to across restarts."""
        return self._work_dir / "broker.log"

    @property
    def pid(self) -> int | None:
        """Pid of the broker process, which is also its process group id."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with self.log_path.open("r", encoding="utf-8", errors="replace") as log:
                return "".join(deque(log, maxlen=lines)).rstrip("\n")
        except FileNotFoundError:
            return ""

    # -- lifecycle ---------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the broker and block until a client can fetch cluster metadata."""
        if self._proc is not None:
            if self._proc.poll() is None:
                raise BrokerError(f"{self!r} is already started")
            reap_supervised(self._proc)  # it crashed on its own; start afresh
            self._forget()
        deadline = time.monotonic() + timeout
        self._prepare()
        command = self._command()
        with self.log_path.open("ab") as log:
            log.write(f"=== fragrance-ops: starting {command!r}\n".encode())
            log.flush()
            try:
                self._proc = spawn_supervised(
                    command,
                    name=f"fragrance-{self.kind}",
                    log=log,
                    grace_s=STOP_GRACE_SECONDS,
                    cwd=self._work_dir,
                )
            except OSError as exc:
                raise BrokerStartError(f"could not spawn {command[0]}: {exc}") from exc
        with _registry_lock:
            _running.add(self)
        try:
            self._wait_ready(deadline, timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, deadline: float, timeout: float) -> None:
        admin: AdminClient | None = None
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise BrokerStartError(
                    f"{self.kind} on {self.bootstrap_servers} exited with code {code} "
                    f"during start (log: {self.log_path})",
                    self.log_tail(),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerStartError(
                    f"{self.kind} on {self.bootstrap_servers} not ready after {timeout:.0f}s "
                    f"(log: {self.log_path})",
                    self.log_tail(),
                )
            if admin is None and _port_accepts(self.host, self._port):
                # log_level 0: the probe's connection errors are expected noise.
                admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
            if admin is not None:
                try:
                    metadata = admin.list_topics(timeout=min(0.5, max(remaining, 0.1)))
                except KafkaException:
                    pass
                else:
                    expected = self.cluster_id
                    if metadata.brokers and expected in (None, metadata.cluster_id):
                        return
            time.sleep(0.05)

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Graceful stop: SIGTERM the group, SIGKILL it if still up after ``grace``."""
        if self._proc is not None:
            stop_supervised(self._proc, grace)
            self._forget()

    def kill(self) -> None:
        """Crash the broker (SIGKILL, no shutdown hooks), e.g. for fault tests."""
        if self._proc is not None:
            kill_supervised(self._proc)
            self._forget()

    def restart(self, timeout: float = 60.0) -> None:
        """Stop and start again on the same port and work dir.

        Data survives only if ``persistent`` (disk-backed); after ``kill()``
        this just starts the broker again (crash recovery).
        """
        self.stop()
        self.start(timeout)

    def close(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop, then delete the work dir if this object created it."""
        self.stop(grace)
        if self._dir_finalizer is not None:
            # detach + rmtree rather than calling the finalizer: finalizers are
            # disabled once the interpreter's weakref exit hook has run.
            self._dir_finalizer.detach()
            shutil.rmtree(self._work_dir, ignore_errors=True)

    def _forget(self) -> None:
        self._proc = None
        with _registry_lock:
            _running.discard(self)

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
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.bootstrap_servers} {state} {self._work_dir}>"
