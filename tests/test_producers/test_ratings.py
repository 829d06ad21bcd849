"""The rating SDK: one call validates and publishes."""

from __future__ import annotations

import orjson
import pytest

from producers import InMemoryTransport, RatingClient
from schemas import InvalidEvent, Topic


def test_a_rating_is_published_keyed_by_its_run_with_an_id() -> None:
    transport = InMemoryTransport()
    ratings = RatingClient(transport=transport)
    ratings.rate(4.5, user_id="u-1", formula_id="f-9", run_id="run-3")
    ratings.rate(2, user_id="u-2", formula_id="f-9", rating_id="app-42")
    first, second = transport.records(Topic.RATINGS)
    assert (first.key, second.key) == (b"run-3", b"f-9")  # no run: keyed by formula
    assert orjson.loads(first.value)["rating"] == 4.5
    assert len(orjson.loads(first.value)["rating_id"]) == 32
    assert orjson.loads(second.value)["rating_id"] == "app-42"


@pytest.mark.parametrize(
    ("rating", "user_id", "field"),
    [(0.5, "u", "rating"), (5.5, "u", "rating"), (float("nan"), "u", "rating"), (3, "", "user_id")],
)
def test_bad_ratings_raise_a_clear_error_and_publish_nothing(
    rating: float, user_id: str, field: str
) -> None:
    transport = InMemoryTransport()
    with pytest.raises(InvalidEvent) as raised:
        RatingClient(transport=transport).rate(rating, user_id=user_id, formula_id="f")
    assert raised.value.field == field
    assert transport.records(Topic.RATINGS) == []
