"""Deadlines of LLM calls: a call still running at its deadline counts as a failure then.

An async call (or stream) is cancelled at its deadline and raises ``DeadlineExceeded``. A
sync call cannot be interrupted from outside its thread, so it is *recorded* at the
deadline instead: one ``DeadlineWatcher`` thread per client fires ``on_expiry`` for every
watched call still running when its deadline passes, and the call, whenever it returns or
raises, goes back to its caller unchanged; its late outcome is not recorded again.

The contract between a call and the watcher is ``Watch.settle()``: the first of the two
(the call finishing, the deadline firing) wins, exactly once, under one lock. So an
outcome is recorded once per call, whichever comes first.

Plain Python: no Kafka import.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

_ARMED, _SETTLED, _EXPIRED = 0, 1, 2
_COMPACT_MIN = 1024  # heap entries before settled ones are purged eagerly


class DeadlineExceeded(TimeoutError):
    """An LLM call or stream ran past its deadline (async: it was cancelled)."""


class Watch:
    """One sync call's deadline; ``settle()`` is True for the call if it beat the deadline."""

    __slots__ = ("_state", "_watcher", "deadline")

    def __init__(self, watcher: DeadlineWatcher | None, deadline: float) -> None:
        self._watcher = watcher
        self._state = _ARMED
        self.deadline = deadline  # time.monotonic()

    def settle(self) -> bool:
        """The call finished: True when its outcome is still to be recorded (once)."""
        watcher = self._watcher
        if watcher is None:  # no deadline: nothing races the call
            if self._state != _ARMED:
                return False
            self._state = _SETTLED
            return True
        with watcher._lock:
            if self._state != _ARMED:
                return False
            self._state = _SETTLED
            watcher._armed -= 1
            return True

    @property
    def expired(self) -> bool:
        return self._state == _EXPIRED


class DeadlineWatcher:
    """One daemon thread that fires the callbacks of sync calls still running at deadline.

    Started with the first watched call, stopped by ``close()``. A callback runs on the
    watcher's thread and must not raise (the SDK's callbacks log and count their own errors;
    anything escaping is logged here).
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._heap: list[tuple[float, int, Watch, Callable[[], None]]] = []
        self._order = itertools.count()
        self._armed = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, after_s: float | None, on_expiry: Callable[[], None]) -> Watch:
        """Watch a call starting now; ``after_s`` None: no deadline (a Watch that never fires)."""
        if after_s is None:
            return Watch(None, float("inf"))
        deadline = time.monotonic() + after_s
        watch = Watch(self, deadline)
        with self._lock:
            if self._closed:  # the client is closed: calls still work, without a deadline
                watch._watcher = None
                return watch
            if self._thread is None:
                # Started before anything is queued: if no thread can start, this raises
                # with the watcher unchanged (the call goes on unwatched, the next one retries).
                thread = threading.Thread(
                    target=self._run, name=f"llm-deadlines-{self._name}", daemon=True
                )
                thread.start()
                self._thread = thread
            first = not self._heap or deadline < self._heap[0][0]
            heapq.heappush(self._heap, (deadline, next(self._order), watch, on_expiry))
            self._armed += 1
            if len(self._heap) > _COMPACT_MIN and len(self._heap) > 4 * self._armed:
                self._heap = [entry for entry in self._heap if entry[2]._state == _ARMED]
                heapq.heapify(self._heap)
            if first:
                self._wake.notify()
        return watch

    def close(self) -> None:
        """Stop the thread; pending deadlines no longer fire."""
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            due: list[Callable[[], None]] = []
            with self._lock:
                while not self._closed:
                    now = time.monotonic()
                    while self._heap and (
                        self._heap[0][0] <= now or self._heap[0][2]._state != _ARMED
                    ):
                        _, _, watch, on_expiry = heapq.heappop(self._heap)
                        if watch._state == _ARMED:
                            watch._state = _EXPIRED
                            self._armed -= 1
                            due.append(on_expiry)
                    if due:
                        break
                    self._wake.wait(self._heap[0][0] - now if self._heap else None)
                if self._closed:
                    return
            for on_expiry in due:
                try:
                    on_expiry()
                except Exception:
                    log.exception("an LLM deadline callback failed")
