"""The published JSON Schema documents stay in step with the code."""

from __future__ import annotations

import json

import jsonschema
import pytest

from schemas import Topic, encode
from schemas.jsonschema import SCHEMA_DIR, documents, render
from tests.test_schemas.test_events import SAMPLES


def test_published_documents_match_the_models() -> None:
    generated = documents()
    published = {path.name for path in SCHEMA_DIR.glob("*.json")}
    assert published == set(generated), "run: python -m schemas.jsonschema"
    for name, document in generated.items():
        assert (SCHEMA_DIR / name).read_bytes() == render(document), (
            f"{name} is stale; run: python -m schemas.jsonschema"
        )


def test_there_is_a_document_per_topic() -> None:
    assert {f"{topic.value}.json" for topic in Topic} == set(documents())


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_encoded_events_validate_against_the_published_documents(event: object) -> None:
    document = json.loads((SCHEMA_DIR / f"{event.TOPIC.value}.json").read_text())  # type: ignore[attr-defined]
    jsonschema.Draft202012Validator.check_schema(document)
    jsonschema.validate(json.loads(encode(event)), document)  # type: ignore[arg-type]


def test_documents_reject_what_the_decoder_rejects() -> None:
    document = json.loads((SCHEMA_DIR / "trainer.metrics.json").read_text())
    bad = {"run_id": "r", "step": -1, "loss": 1.0, "reward": 1.0, "ts": 1.0}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, document)
