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


# ---- observers, checks and details that misbehave ------------------------------------
# Without the engine's wrapping of ``on_event`` (steps._reporting), the observer's error
# escapes run_steps from the first event it raises on: the tests below then see an
# OSError, not StepFailed, and the undos after that point never run.


def _plan(events: list[str], *, fail_at: str | None) -> list[Step[None]]:
    steps: list[Step[None]] = []
    for name in ("a", "b", "c"):
        run = (_raise(events, f"run-{name}", Boom(name)) if name == fail_at
               else _record(events, f"run-{name}"))
        steps.append(Step(name, run, _record(events, f"undo-{name}")))
    return steps


@pytest.mark.parametrize("fail_at", [None, "a", "c"])
def test_an_observer_raising_on_every_event_changes_nothing(fail_at: str | None) -> None:
    events: list[str] = []
    seen: list[tuple[str, str]] = []

    def observer(e: Event) -> None:
        seen.append((e.kind, e.step))
        raise OSError("the progress stream is gone")

    if fail_at is None:
        run_steps(_plan(events, fail_at=None), None, on_event=observer)
        assert events == ["run-a", "run-b", "run-c"]
        return
    with pytest.raises(StepFailed) as info:
        run_steps(_plan(events, fail_at=fail_at), None, on_event=observer)
    ran = ["a", "b", "c"][:["a", "b", "c"].index(fail_at) + 1]
    assert events == [f"run-{n}" for n in ran] + [f"undo-{n}" for n in reversed(ran)]
    assert isinstance(info.value.cause, Boom) and info.value.undo_errors == ()
    # The observer was still told everything, although it raised every time.
    assert ("failed", fail_at) in seen and ("undone", "a") in seen


@pytest.mark.parametrize("raise_on", ["undo", "undone", "undo_failed"])
def test_an_observer_raising_during_the_undo_never_cuts_the_rollback_short(
        raise_on: str) -> None:
    events: list[str] = []
    undo_err = UndoFail("b's undo")
    steps = [
        Step("a", _record(events, "run-a"), _record(events, "undo-a")),
        Step("b", _record(events, "run-b"), _raise(events, "undo-b", undo_err)),
        Step("c", _record(events, "run-c"), _record(events, "undo-c")),
        Step("d", _raise(events, "run-d", Boom("d")), _record(events, "undo-d")),
    ]

    def observer(e: Event) -> None:
        if e.kind == raise_on:
            raise OSError(f"observer broke on {e.kind} of {e.step}")

    with pytest.raises(StepFailed) as info:
        run_steps(steps, None, on_event=observer)
    assert events == ["run-a", "run-b", "run-c", "run-d",
                      "undo-d", "undo-c", "undo-b", "undo-a"]
    err = info.value
    assert err.step == "d" and isinstance(err.cause, Boom)
    assert err.undo_errors == (undo_err,), "observer errors are not undo errors"


def test_a_raising_check_rolls_back_and_observer_errors_do_not_hide_it() -> None:
    events: list[str] = []
    calls = {"n": 0}

    def check() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("the operation was cancelled")

    def observer(e: Event) -> None:
        raise OSError("the progress stream is gone")

    with pytest.raises(StepFailed) as info:
        run_steps(_plan(events, fail_at=None), None, on_event=observer, check=check)
    assert events == ["run-a", "run-b", "undo-b", "undo-a"]
    assert info.value.step == "c" and isinstance(info.value.cause, RuntimeError)


def test_a_check_raising_before_the_first_step_runs_nothing() -> None:
    events: list[str] = []

    def check() -> None:
        raise Boom("cancelled before it began")

    with pytest.raises(StepFailed) as info:
        run_steps(_plan(events, fail_at=None), None, check=check)
    assert events == [] and info.value.step == "a" and info.value.undo_errors == ()


def test_details_go_under_the_step_running_or_undoing() -> None:
    from banger.pipeline import Detail

    said: list[tuple[str, str]] = []
    detail = Detail(lambda stage, msg: said.append((stage, msg)))

    def speak(msg: str):  # type: ignore[no-untyped-def]
        def fn(_: object) -> None:
            detail(msg)
        return fn

    steps = [Step("a", speak("a ran"), speak("a undone")),
             Step("b", speak("b ran")),
             Step("c", _raise([], "c", Boom("c")), speak("c undone"))]
    with pytest.raises(StepFailed):
        run_steps(steps, None, detail=detail)
    assert said == [("a", "a ran"), ("b", "b ran"), ("c", "c undone"), ("a", "a undone")]


def test_a_raising_detail_sink_never_fails_the_step() -> None:
    from banger.pipeline import Detail

    def broken(stage: str, msg: str) -> None:
        raise OSError("the progress stream is gone")

    detail = Detail(broken)
    events: list[str] = []
    steps = [Step("a", lambda _: detail("hello")), Step("b", _record(events, "run-b"))]
    run_steps(steps, None, detail=detail)
    assert events == ["run-b"]


def test_a_step_whose_when_is_false_is_passed_over_without_events() -> None:
    events: list[str] = []
    seen: list[Event] = []
    state = {"gone": False}

    def first(_: object) -> None:
        events.append("run-first")
        state["gone"] = True

    steps = [
        Step("first", first, _record(events, "undo-first")),
        Step("skipped", _record(events, "run-skipped"), _record(events, "undo-skipped"),
             when=lambda _: not state["gone"]),
        Step("last", _raise(events, "run-last", Boom("last"))),
    ]
    with pytest.raises(StepFailed):
        run_steps(steps, None, on_event=seen.append)
    assert events == ["run-first", "run-last", "undo-first"]
    assert "skipped" not in {e.step for e in seen}


def test_a_when_that_raises_fails_its_step() -> None:
    events: list[str] = []

    def broken(_: object) -> bool:
        raise Boom("cannot tell")

    steps = [Step("a", _record(events, "run-a"), _record(events, "undo-a")),
             Step("b", _record(events, "run-b"), when=broken)]
    with pytest.raises(StepFailed) as info:
        run_steps(steps, None)
    assert info.value.step == "b" and isinstance(info.value.cause, Boom)
    assert events == ["run-a", "undo-a"]


def test_a_failed_best_effort_step_is_reported_and_the_run_goes_on() -> None:
    events: list[str] = []
    seen: list[Event] = []
    steps = [
        Step("try", _raise(events, "run-try", Boom("no luck")), _record(events, "undo-try"),
             best_effort=True),
        Step("next", _record(events, "run-next")),
    ]
    run_steps(steps, None, on_event=seen.append)
    assert events == ["run-try", "run-next"], "no rollback, no error"
    assert [(e.kind, e.step) for e in seen] == [("run", "try"), ("failed", "try"),
                                                ("run", "next"), ("ok", "next")]
    assert isinstance(seen[1].error, Boom)
