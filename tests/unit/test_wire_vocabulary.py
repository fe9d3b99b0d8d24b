"""One event vocabulary from the pipeline through the API to the CLI (banger.model.events)."""

from __future__ import annotations

import typing

import pytest

from banger.api.schema import ProgressEvent
from banger.core.operations import Progress
from banger.model.events import EVENT_KINDS, STEP_EVENT_KINDS, EventKind
from banger.pipeline import Event, Step, StepFailed, run_steps


def _enum(schema: dict[str, typing.Any]) -> list[str]:
    for option in schema.get("anyOf", [schema]):
        if "enum" in option:
            return list(option["enum"])
    raise AssertionError(f"no enum in {schema}")


def test_api_progress_kinds_are_the_vocabulary() -> None:
    kind = ProgressEvent.model_json_schema()["properties"]["kind"]
    assert _enum(kind) == list(EVENT_KINDS)
    assert EVENT_KINDS == ("run", "ok", "failed", "undo", "undone", "undo_failed", "detail",
                           "queued")


def test_a_kind_outside_the_vocabulary_is_not_on_the_wire() -> None:
    with pytest.raises(ValueError, match="kind"):
        ProgressEvent.model_validate({"type": "progress", "kind": "started"})


def test_pipeline_and_operations_take_the_one_definition() -> None:
    hints = typing.get_type_hints(Event)
    assert hints["kind"] == EventKind
    assert typing.get_type_hints(Progress)["kind"] == EventKind


def test_the_engine_emits_step_kinds_only() -> None:
    events: list[Event] = []

    def boom(_: object) -> None:
        raise RuntimeError("boom")

    def undo_boom(_: object) -> None:
        raise OSError("undo boom")

    steps: list[Step[object]] = [Step("a", lambda _: None, undo=lambda _: None),
                                 Step("b", lambda _: None, undo=undo_boom),
                                 Step("c", boom)]
    with pytest.raises(StepFailed):
        run_steps(steps, object(), on_event=events.append)
    assert {e.kind for e in events} == set(STEP_EVENT_KINDS)
