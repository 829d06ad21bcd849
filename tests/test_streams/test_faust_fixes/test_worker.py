"""The worker leaves the root logger at the level asked for, with no spinner handler."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import faust
import pytest

from streams.faust_fixes import QuietWorker


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield root
    root.setLevel(level)
    root.handlers[:] = handlers


@pytest.mark.parametrize("worker_class", [faust.Worker, QuietWorker])
def test_the_root_logger_keeps_the_level_asked_for(
    worker_class: type[faust.Worker], root_logger: logging.Logger
) -> None:
    app = faust.App("quiet-worker-test", broker="kafka://localhost:1", web_enabled=False)
    worker = worker_class(app, loglevel="warning", quiet=True)
    root_logger.handlers[:] = [logging.NullHandler()]
    worker.on_setup_root_logger(root_logger, logging.WARNING)
    spinning = any(type(h).__name__ == "SpinnerHandler" for h in root_logger.handlers)
    if worker_class is QuietWorker:
        assert root_logger.level == logging.WARNING
        assert not spinning
    else:  # the upstream behaviour this corrects: debug records built for a spinner
        assert root_logger.level == logging.DEBUG
        assert spinning
