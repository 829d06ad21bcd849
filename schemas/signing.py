"""Command signatures: HMAC-SHA256 over a record, carried in a Kafka record header.

The worker signs every ``trainer.commands`` record when ``security.command_signing_key`` is
set; a trainer with ``security.require_signed_commands`` applies only records whose
signature verifies. Plain Python, no Kafka import: any client can implement it.

Header ``fragrance-ops-signature``, value ``v1=<64 lowercase hex digits>``, the digits being

    HMAC-SHA256(key, b"v1\\n" + topic + b"\\n" + len(record_key) + b"\\n" + record_key
                     + b"\\n" + record_value)

with ``topic`` the contract topic name without the deployment prefix (``trainer.commands``)
and ``len(record_key)`` in ASCII decimal. What that binds:

- the value (the whole command: id, run, type, parameters, issue time) and the key (the
  run's partition key): changing a byte of either breaks the signature;
- the contract topic: a signature made for one topic is no good on another, should more
  topics be signed one day; the prefix is left out so a renamed or mirrored topic
  (MirrorMaker's ``source.trainer.commands``) still verifies. Deployments that share a
  cluster keep apart by having different keys;
- the key's length: no key/value split of the same bytes signs alike.

It does not bind time or the offset: a genuine record copied back onto the topic verifies.
The trainer SDK applies each command id once, which neutralises such a replay.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

SIGNATURE_HEADER = "fragrance-ops-signature"
VERSION = "v1"
_PREFIX = f"{VERSION}=".encode()
_DIGEST_HEX_LENGTH = 2 * hashlib.sha256().digest_size

UNSIGNED = "unsigned command"
INVALID = "invalid signature"
SIGNATURE_REJECTIONS = frozenset({UNSIGNED, INVALID})
"""Ack details of commands refused for their signature: a forgery's ack, to be ignored."""


class SignatureError(ValueError):
    """A record's signature is missing or does not verify; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _digest(key: bytes, topic: str, record_key: bytes, value: bytes) -> bytes:
    mac = hmac.new(key, digestmod=hashlib.sha256)
    mac.update(b"%s\n%s\n%d\n" % (VERSION.encode(), topic.encode(), len(record_key)))
    mac.update(record_key)
    mac.update(b"\n")
    mac.update(value)
    return mac.hexdigest().encode("ascii")


def sign(key: bytes, topic: str, record_key: bytes, value: bytes) -> bytes:
    """The header value signing ``record_key``/``value`` for the contract ``topic``."""
    if not key:
        raise ValueError("a signing key must not be empty")
    return _PREFIX + _digest(key, topic, record_key, value)


def signature_header(key: bytes, topic: str, record_key: bytes, value: bytes) -> tuple[str, bytes]:
    """The ``(name, value)`` record header carrying the signature."""
    return SIGNATURE_HEADER, sign(key, topic, record_key, value)


def verify(
    key: bytes,
    topic: str,
    record_key: bytes,
    value: bytes,
    headers: Iterable[tuple[str, bytes | None]],
) -> None:
    """Raise ``SignatureError`` unless a signature header of ``headers`` verifies.

    No signature header: ``UNSIGNED``. Signature headers, none valid (malformed, another
    version, another key, or changed key, value or topic): ``INVALID``.
    """
    if not key:
        raise ValueError("a verification key must not be empty")
    signatures = [header for name, header in headers if name == SIGNATURE_HEADER]
    if not signatures:
        raise SignatureError(UNSIGNED)
    expected = _digest(key, topic, record_key, value)
    for signature in signatures:
        if (
            signature is not None
            and len(signature) == len(_PREFIX) + _DIGEST_HEX_LENGTH
            and signature.startswith(_PREFIX)
            and hmac.compare_digest(signature[len(_PREFIX) :], expected)
        ):
            return
    raise SignatureError(INVALID)
