"""Command signatures (schemas/signing.py): the documented format, what they bind, failures."""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.signing import (
    INVALID,
    SIGNATURE_HEADER,
    UNSIGNED,
    SignatureError,
    sign,
    signature_header,
    verify,
)

KEY = b"0123456789abcdef-a-test-key"
TOPIC = "trainer.commands"
RECORD_KEY = b"run-1"
VALUE = b'{"command_id":"c-1","run_id":"run-1","type":"set_entropy_coef"}'


def reason(
    headers: list[tuple[str, bytes | None]],
    *,
    key: bytes = KEY,
    topic: str = TOPIC,
    record_key: bytes = RECORD_KEY,
    value: bytes = VALUE,
) -> str | None:
    """None when ``headers`` verify for the record, else the reason they do not."""
    try:
        verify(key, topic, record_key, value, headers)
    except SignatureError as exc:
        return exc.reason
    return None


def test_the_header_is_the_documented_hmac_over_topic_key_and_value() -> None:
    name, value = signature_header(KEY, TOPIC, RECORD_KEY, VALUE)
    message = b"v1\ntrainer.commands\n5\nrun-1\n" + VALUE
    assert name == SIGNATURE_HEADER == "fragrance-ops-signature"
    assert value == b"v1=" + hmac.new(KEY, message, hashlib.sha256).hexdigest().encode()
    assert reason([(name, value)]) is None


@pytest.mark.parametrize(
    "changes",
    [
        {"value": VALUE.replace(b"c-1", b"c-2")},
        {"value": VALUE + b" "},
        {"record_key": b"run-2"},
        {"topic": "llm.control"},
        {"topic": "prod.trainer.commands"},  # signatures bind the contract name only
        {"key": b"another-key-of-16-chars"},
    ],
    ids=["value", "trailing-byte", "record-key", "topic", "prefixed-topic", "signing-key"],
)
def test_any_change_to_what_is_signed_is_an_invalid_signature(changes: dict[str, Any]) -> None:
    assert reason([signature_header(KEY, TOPIC, RECORD_KEY, VALUE)], **changes) == INVALID


def test_no_signature_header_is_unsigned() -> None:
    assert reason([]) == UNSIGNED
    assert reason([("error.class", b"x"), ("fragrance-ops-signature-v2", b"v1=00")]) == UNSIGNED


@pytest.mark.parametrize(
    "header",
    [
        None,
        b"",
        b"v1=",
        b"v2=" + sign(KEY, TOPIC, RECORD_KEY, VALUE)[3:],
        sign(KEY, TOPIC, RECORD_KEY, VALUE)[3:],  # the digits without "v1="
        sign(KEY, TOPIC, RECORD_KEY, VALUE)[:-1],
        sign(KEY, TOPIC, RECORD_KEY, VALUE) + b"0",
        sign(KEY, TOPIC, RECORD_KEY, VALUE).upper(),
        b"v1=" + b"zz" * 32,
    ],
    ids=["null", "empty", "no-digits", "v2", "no-version", "short", "long", "upper", "not-hex"],
)
def test_malformed_signatures_are_invalid(header: bytes | None) -> None:
    assert reason([(SIGNATURE_HEADER, header)]) == INVALID


def test_one_valid_signature_among_several_headers_verifies() -> None:
    forged = (SIGNATURE_HEADER, b"v1=" + b"0" * 64)
    genuine = signature_header(KEY, TOPIC, RECORD_KEY, VALUE)
    assert reason([("trace", b"1"), forged, genuine]) is None


def test_the_key_value_boundary_is_signed() -> None:
    """b"a\\nb" + b"c" and b"a" + b"b\\nc" are the same bytes around the separator."""
    assert sign(KEY, TOPIC, b"a\nb", b"c") != sign(KEY, TOPIC, b"a", b"b\nc")
    header = signature_header(KEY, TOPIC, b"a\nb", b"c")
    assert reason([header], record_key=b"a", value=b"b\nc") == INVALID


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        sign(b"", TOPIC, RECORD_KEY, VALUE)
    with pytest.raises(ValueError, match="empty"):
        verify(b"", TOPIC, RECORD_KEY, VALUE, [])


@given(
    key=st.binary(min_size=1, max_size=64),
    record_key=st.binary(max_size=64),
    value=st.binary(max_size=512),
    flip=st.integers(min_value=0),
)
def test_signed_records_verify_and_any_flipped_bit_does_not(
    key: bytes, record_key: bytes, value: bytes, flip: int
) -> None:
    header = signature_header(key, TOPIC, record_key, value)
    verify(key, TOPIC, record_key, value, [header])
    signed = record_key + value
    if not signed:
        return
    position = flip % (8 * len(signed))
    flipped = bytearray(signed)
    flipped[position // 8] ^= 1 << (position % 8)
    tampered_key, tampered_value = (
        bytes(flipped[: len(record_key)]),
        bytes(flipped[len(record_key) :]),
    )
    with pytest.raises(SignatureError, match=INVALID):
        verify(key, TOPIC, tampered_key, tampered_value, [header])
