"""Faust's worker without its terminal spinner.

``faust.Worker`` always creates a spinner, and at a log level of WARN or above
(``on_setup_root_logger``, ``_setup_spinner_handler``) it sets the root logger to DEBUG and
adds a handler that spins for every record (``faust/worker.py``). Every library's debug line
is then built as a record (aiokafka logs one per partition per fetch): at 200 metrics/s,
about a quarter of the worker's busy time goes to ``logging``, and the log file holds the
spinner's escape codes. Without a spinner the root logger keeps the level asked for.
Tested by ``tests/test_streams/test_faust_fixes/test_worker.py``.
"""

from __future__ import annotations

from typing import Any

import faust


class QuietWorker(faust.Worker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None
