"""The rating SDK for the feedback app: validate and publish a rating in one call.

    ratings = RatingClient()
    ratings.rate(4.5, user_id="u-17", formula_id="f-2031", run_id="ppo-run-42")

A rating names the run whose policy produced the formula (``run_id``); without one it
counts toward the configured default target. ``rate`` validates at once (1 to 5, ids
present) and raises ``InvalidEvent`` for a caller's bug; Kafka being down never raises or
blocks (events are buffered, then dropped and counted). Each rating gets a ``rating_id``
(pass your own to make app-side retries idempotent), so a rating delivered twice counts
once.
"""

from __future__ import annotations

import time
import uuid

from config.settings import Settings
from producers.transport import DeliveryStats, KafkaTransport, Transport
from schemas import Rating, Topic, encode, topic_name, validate


class RatingClient:
    def __init__(self, *, settings: Settings | None = None, transport: Transport | None = None):
        self.settings = settings if settings is not None else Settings()
        self._transport = transport if transport is not None else KafkaTransport(self.settings)
        self._topic = topic_name(Topic.RATINGS, self.settings.kafka.topic_prefix)

    @property
    def stats(self) -> DeliveryStats:
        return self._transport.stats

    def rate(
        self,
        rating: float,
        *,
        user_id: str,
        formula_id: str,
        run_id: str | None = None,
        rating_id: str | None = None,
    ) -> Rating:
        """Publish one rating; returns the event as sent."""
        event = validate(
            Rating,
            {
                "rating": float(rating),
                "user_id": user_id,
                "formula_id": formula_id,
                "run_id": run_id,
                "rating_id": rating_id if rating_id is not None else uuid.uuid4().hex,
                "ts": time.time(),
            },
        )
        self._transport.produce(self._topic, event.key().encode(), encode(event))
        return event

    def flush(self, timeout_s: float | None = None) -> int:
        return self._transport.flush(
            self.settings.sdk.close_timeout_s if timeout_s is None else timeout_s
        )

    def close(self) -> None:
        self._transport.close(self.settings.sdk.close_timeout_s)

    def __enter__(self) -> RatingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
