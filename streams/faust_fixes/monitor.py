"""Faust's monitor without its per-event bookkeeping.

Faust's default ``Monitor`` updates a dozen counters and timers for every message and
stream event (about 5% of the worker's main thread when profiled, when every input went
through Faust's streams). Inputs now reach the agents in batches (``consumer.py``), but
table changelogs in recovery and standby replicas still go record by record. The product's
metrics come from its own counters, so those four per-event hooks do nothing here but keep
the one time Faust's livelock check reads (the runtime records it for inputs); the hooks
for commits, sends, rebalances and tables stay Faust's. Tested by ``test_monitor.py``.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from faust.sensors import Monitor
from faust.types import TP, EventT, Message, StreamT


class LeanMonitor(Monitor):
    def on_message_in(self, tp: TP, offset: int, message: Message) -> None:
        pass

    def on_stream_event_in(
        self, tp: TP, offset: int, stream: StreamT[Any], event: EventT[Any]
    ) -> dict[str, Any] | None:
        # Faust's livelock check reads this; without it, it logged every busy partition as
        # "Stream has not started processing" once the worker had run for 5 minutes.
        self.stream_inbound_time[tp] = monotonic()
        return None

    def on_stream_event_out(
        self,
        tp: TP,
        offset: int,
        stream: StreamT[Any],
        event: EventT[Any],
        state: dict[str, Any] | None = None,
    ) -> None:
        pass

    def on_message_out(self, tp: TP, offset: int, message: Message) -> None:
        pass
