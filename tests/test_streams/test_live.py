"""Where an input entered the system: its own position, or the one its re-keyed copy names."""

from __future__ import annotations

from faust.types import Message

from streams.live import input_origin, origin_header


def message(topic: str, partition: int, offset: int, headers: object = None) -> Message:
    return Message(topic, partition, offset, 0.0, 0, headers, b"key", b"{}", None)  # type: ignore[arg-type]


def test_an_input_is_placed_by_its_own_partition_and_offset() -> None:
    assert input_origin(message("p.feedback.ratings", 2, 41)) == ("2:p.feedback.ratings", 41)


def test_a_rekeyed_copy_is_placed_where_its_original_was() -> None:
    original = message("p.feedback.ratings", 3, 907)
    for headers in ([origin_header(original)], dict([origin_header(original)])):
        copy = message("p.app-ratings-by-target", 0, 12, headers)
        assert input_origin(copy) == ("3:p.feedback.ratings", 907)


def test_other_headers_do_not_matter() -> None:
    copy = message("by-target", 1, 5, [("fragrance-ops-signature", b"x")])
    assert input_origin(copy) == ("1:by-target", 5)
