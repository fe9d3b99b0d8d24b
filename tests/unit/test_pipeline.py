"""The pipeline contract: the four tests of the original Go banger, ported, and the rest."""

from __future__ import annotations

import pytest

from banger.pipeline import Event, Step, StepFailed, run_steps


class Boom(Exception):
    pass


class UndoFail(Exception):
    pass


def _record(events: list[str], label: str):  # type: ignore[no-untyped-def]
    def fn(_: object) -> None:
        events.append(label)

    return fn


def _raise(events: list[str], label: str, exc: Exception):  # type: ignore[no-untyped-def]
    def fn(_: object) -> None:
        events.append(label)
        raise exc

    return fn


def test_rolls_back_in_reverse_on_failure() -> None:
    events: list[str] = []
    steps = [
        Step("first", _record(events, "run-first"), _record(events, "undo-first")),
        Step("second", _record(events, "run-second"), _record(events, "undo-second")),
        Step("third", _raise(events, "run-third", Boom("boom")), _record(events, "undo-third")),
        Step("fourth", _record(events, "run-fourth"), _record(events, "undo-fourth")),
    ]
    with pytest.raises(StepFailed) as info:
        run_steps(steps, None)
    assert "boom" in str(info.value)
    assert events == [
        "run-first", "run-second", "run-third",
        "undo-third", "undo-second", "undo-first",
    ]


def test_skips_missing_undos() -> None:
    undos: list[str] = []
    steps = [
        Step("has-undo", lambda _: None, _record(undos, "has-undo")),
        Step("no-undo", lambda _: None),
        Step("failing", _raise([], "x", Boom("x")), _record(undos, "failing")),
    ]
    with pytest.raises(StepFailed):
        run_steps(steps, None)
    assert undos == ["failing", "has-undo"]


def test_joins_rollback_errors_without_hiding_root_cause() -> None:
    root, undo_err = Boom("boom"), UndoFail("undo-fail")
    steps = [
        Step("ok", lambda _: None, _raise([], "u", undo_err)),
        Step("fail", _raise([], "r", root)),
    ]
    with pytest.raises(StepFailed) as info:
        run_steps(steps, None)
    err = info.value
    assert err.exceptions[0] is root
    assert err.cause is root
    assert err.undo_errors == (undo_err,)
    assert err.step == "fail"
    assert "'fail'" in str(err) and "boom" in str(err)
    # errors.Is equivalents: subgroup and except* find both.
    sub = err.subgroup(Boom)
    assert sub is not None and sub.exceptions == (root,)
    assert isinstance(sub, StepFailed) and sub.step == "fail"
    undo_sub = err.subgroup(UndoFail)
    assert undo_sub is not None and undo_sub.exceptions == (undo_err,)


def test_except_star_finds_root_cause() -> None:
    caught: list[BaseException] = []
    try:
        run_steps([Step("a", _raise([], "a", Boom("b")))], None)
    except* Boom as group:
        caught.extend(group.exceptions)
    assert len(caught) == 1 and isinstance(caught[0], Boom)


def test_happy_path_never_undoes() -> None:
    undone: list[str] = []
    steps = [Step("a", lambda _: None, _record(undone, "a")), Step("b", lambda _: None)]
    run_steps(steps, None)
    assert undone == []


def test_every_undo_attempted_even_when_earlier_undos_fail() -> None:
    events: list[str] = []
    e1, e2 = UndoFail("u1"), UndoFail("u2")
    steps = [
        Step("a", _record(events, "run-a"), _record(events, "undo-a")),
        Step("b", _record(events, "run-b"), _raise(events, "undo-b", e1)),
        Step("c", _record(events, "run-c"), _raise(events, "undo-c", e2)),
        Step("d", _raise(events, "run-d", Boom("d"))),
    ]
    with pytest.raises(StepFailed) as info:
        run_steps(steps, None)
    assert events == ["run-a", "run-b", "run-c", "run-d", "undo-c", "undo-b", "undo-a"]
    assert info.value.undo_errors == (e2, e1)


def test_events_carry_stage_names_and_timings() -> None:
    seen: list[Event] = []
    steps = [
        Step("one", lambda _: None, lambda _: None, progress="doing one"),
        Step("two", _raise([], "t", Boom("two"))),
    ]
    with pytest.raises(StepFailed):
        run_steps(steps, None, on_event=seen.append)
    assert [(e.kind, e.step) for e in seen] == [
        ("run", "one"), ("ok", "one"), ("run", "two"), ("failed", "two"),
        ("undo", "one"), ("undone", "one"),
    ]
    assert seen[0].progress == "doing one"
    assert all(e.elapsed is not None and e.elapsed >= 0 for e in seen if e.kind != "run"
               and e.kind != "undo")
    failed = seen[3]
    assert isinstance(failed.error, Boom)


def test_undo_failed_event() -> None:
    seen: list[Event] = []
    steps = [Step("a", lambda _: None, _raise([], "u", UndoFail("u"))),
             Step("b", _raise([], "b", Boom("b")))]
    with pytest.raises(StepFailed):
        run_steps(steps, None, on_event=seen.append)
    assert ("undo_failed", "a") in [(e.kind, e.step) for e in seen]


def test_context_is_threaded_through() -> None:
    ctx: dict[str, int] = {}

    def put(c: dict[str, int]) -> None:
        c["x"] = 1

    def take(c: dict[str, int]) -> None:
        c.pop("x")

    with pytest.raises(StepFailed):
        run_steps([Step("put", put, take), Step("fail", _raise([], "f", Boom("f")))], ctx)
    assert ctx == {}


def test_base_exceptions_are_not_swallowed() -> None:
    # KeyboardInterrupt is not a step failure: it propagates untouched, undos do not run.
    undone: list[str] = []

    def interrupt(_: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_steps([Step("a", lambda _: None, _record(undone, "a")), Step("b", interrupt)], None)
    assert undone == []


def test_a_failing_progress_sink_never_skips_the_rollback() -> None:
    events: list[str] = []
    steps = [
        Step("first", _record(events, "run-first"), _record(events, "undo-first")),
        Step("second", _raise(events, "run-second", Boom("boom")),
             _record(events, "undo-second")),
    ]

    def broken_sink(e: Event) -> None:
        if e.kind in ("run", "failed", "undo") and e.step == "second":
            raise OSError("the progress stream is gone")

    with pytest.raises(StepFailed) as info:
        run_steps(steps, None, on_event=broken_sink)
    assert isinstance(info.value.cause, Boom), "the root cause stays first"
    assert events == ["run-first", "run-second", "undo-second", "undo-first"]


def test_a_failing_sink_on_success_changes_nothing() -> None:
    events: list[str] = []

    def broken_sink(e: Event) -> None:
        raise OSError("the progress stream is gone")

    run_steps([Step("only", _record(events, "run"), _record(events, "undo"))], None,
              on_event=broken_sink)
    assert events == ["run"]


def test_check_stops_before_the_next_step_and_rolls_back() -> None:
    events: list[str] = []
    stop = {"now": False}

    def check() -> None:
        if stop["now"]:
            raise Boom("cancelled")

    def second(_: object) -> None:
        events.append("run-second")
        stop["now"] = True

    steps = [
        Step("first", _record(events, "run-first"), _record(events, "undo-first")),
        Step("second", second, _record(events, "undo-second")),
        Step("third", _record(events, "run-third"), _record(events, "undo-third")),
    ]
    with pytest.raises(StepFailed) as info:
        run_steps(steps, None, check=check)
    assert info.value.step == "third" and isinstance(info.value.cause, Boom)
    assert events == ["run-first", "run-second", "undo-second", "undo-first"]
