"""Child processes that never outlive their parent, even when the parent is SIGKILLed.

Each child runs in its own process group (``start_new_session=True``) so that stopping it
also takes down anything it forked, and under a tiny shell watchdog that holds the read end
of a pipe whose write end only the parent holds: when the parent dies, by any means, the
pipe reads EOF and the watchdog terminates the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

# Runs as `sh -c _WATCHDOG <argv0> <broker command...>`. fd 0 is the pipe from
# the parent; it is moved to fd 3 for the background watcher (an async list in a
# non-interactive shell gets /dev/null as stdin, hence the explicit redirection),
# then the shell execs the broker, so the broker's pid is the group id ($$ in
# the watcher). On EOF the watcher TERMs the group, waits up to the grace period
# for the broker to go, then KILLs whatever is left (itself included); it
# ignores TERM so that it survives its own group-wide signal.
_WATCHDOG = (
    "exec 3<&0; "
    '( trap "" TERM; while read -r _ <&3; do :; done; kill -TERM 0; i=0; '
    'while kill -0 "$$" && [ "$i" -lt {ticks} ]; do sleep 0.2; i=$((i + 1)); done; '
    "kill -KILL 0 ) </dev/null >/dev/null 2>&1 & "
    'exec "$@" </dev/null 3<&-'
)


def spawn_supervised(
    command: Sequence[str],
    *,
    name: str,
    log: IO[bytes],
    grace_s: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in a new process group under the orphan watchdog."""
    return subprocess.Popen(
        ["/bin/sh", "-c", _WATCHDOG.format(ticks=int(grace_s * 5)), name, *command],
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env=dict(env) if env is not None else None,
        start_new_session=True,
    )


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    """Whether a non-zombie process is still in group ``pgid`` (Linux /proc scan).

    Signals are delivered asynchronously, so right after killpg() the watchdog
    may still be listed; zombies do not count (init reaps them, maybe later).
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return False
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            text = stat.read_text()
            # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parens.
            state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                return True
    return False


def stop_supervised(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM the group, SIGKILL it after ``grace_s``, then sweep the rest (the watchdog
    ignores SIGTERM) and close our end of its pipe. Idempotent."""
    if process.poll() is None:
        signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            signal_group(process.pid, signal.SIGKILL)
            process.wait()
    reap_supervised(process)


def kill_supervised(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the whole group at once: no shutdown hooks (a crash, for fault tests)."""
    signal_group(process.pid, signal.SIGKILL)
    process.wait()
    reap_supervised(process)


def reap_supervised(process: subprocess.Popen[bytes]) -> None:
    """The child is gone: kill what is left of its group, wait for it, close the pipe."""
    signal_group(process.pid, signal.SIGKILL)  # the watchdog, anything forked
    deadline = time.monotonic() + 5.0
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.stdin is not None:
        process.stdin.close()
