"""The lean monitor still feeds Faust's livelock check the one time it reads."""

from __future__ import annotations

from time import monotonic
from typing import Any, cast

from faust.types import TP

from streams.faust_fixes import LeanMonitor


def test_a_stream_event_records_when_the_partition_was_last_processed() -> None:
    # Faust's verify_event_path reports a partition with records waiting and no entry here
    # as "Stream has not started processing" (seen in the long fault profile's logs).
    monitor = LeanMonitor()
    tp = TP("trainer.metrics", 3)
    before = monotonic()
    assert monitor.on_stream_event_in(tp, 7, cast(Any, None), cast(Any, None)) is None
    assert before <= monitor.stream_inbound_time[tp] <= monotonic()
