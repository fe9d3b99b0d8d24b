"""Run a list of named steps forward; on failure undo them in reverse, keeping every error.

Contract (pinned by tests/unit/test_pipeline*.py):

1. Steps run forward in order; the first failing step stops the run.
2. The failing step's undo fires too: a step may have acquired part of its resource
   before it raised.
3. Every step that ran gets its undo called in reverse order; steps without an undo are
   skipped; every undo is attempted even when an earlier one fails.
4. The error raised is a :class:`StepFailed` exception group whose ``exceptions[0]`` is the
   root cause and whose other members are the undo failures, in the order they happened.
   We do not build on ``contextlib.ExitStack``: it lets an undo error replace the cause.
5. On success no undo fires.
6. Each step emits events (``run``, ``ok``, ``failed``, ``undo``, ``undone``,
   ``undo_failed``) carrying its stable name and timings. Events are a report: an
   ``on_event`` that raises is logged and never changes the run (a broken progress sink
   must not skip a rollback and leak what the steps acquired).
7. ``check`` (e.g. "was this operation cancelled?") is called before each step; when it
   raises, no further step runs and the steps that ran are rolled back as for a failure,
   the raised error being the root cause.
8. A step with ``when`` runs only if ``when(ctx)`` holds as its turn comes (decided then,
   not when the list was built: "is the VMM still running?"); otherwise it is passed over
   without an event. A ``best_effort`` step that fails is reported (``failed``) and the run
   goes on: it is one attempt among several (a guest poweroff before the VMM is told to
   quit), and what follows takes over.
9. A step reports details through the :class:`Detail` of its context, which the engine
   points at the step running (or being undone) so that no step can speak under another's
   name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from banger.model.events import EventKind

C = TypeVar("C")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step(Generic[C]):
    """A named unit of work and the undo of what it acquired.

    ``name`` is the stable stage id (logs, progress, API errors and tests use it);
    ``progress`` an optional user-facing label; ``when`` and ``best_effort``: see the
    module's contract (8).
    """

    name: str
    run: Callable[[C], None]
    undo: Callable[[C], None] | None = None
    progress: str | None = None
    when: Callable[[C], bool] | None = None
    best_effort: bool = False


@dataclass(frozen=True)
class Event:
    kind: EventKind
    step: str
    progress: str | None
    elapsed: float | None = None
    error: BaseException | None = None


class StepFailed(ExceptionGroup[Exception]):
    """Step ``step`` failed; ``exceptions[0]`` is the root cause, the rest undo failures."""

    step: str

    def __new__(cls, message: str, excs: Sequence[Exception], *, step: str = "") -> StepFailed:
        self = super().__new__(cls, message, excs)
        self.step = step
        return self

    def __init__(self, message: str, excs: Sequence[Exception], *, step: str = "") -> None:
        super().__init__(message, excs)

    def derive(self, excs: Sequence[Exception]) -> StepFailed:  # type: ignore[override]
        # subgroup()/split() build new groups through derive(); keep the step name.
        return StepFailed(self.message, excs, step=self.step)

    @property
    def cause(self) -> Exception:
        return self.exceptions[0]

    @property
    def undo_errors(self) -> tuple[Exception, ...]:
        return self.exceptions[1:]


class Detail:
    """Where steps report details (a line of progress) while they run: always under the
    name of the step the engine runs or undoes right now. Like events, details are a
    report: a sink that raises is logged and never fails the step."""

    def __init__(self, sink: Callable[[str, str], None], step: str = "") -> None:
        self._sink = sink
        self.step = step  # set by run_steps; before a run, the name details go under

    def __call__(self, message: str) -> None:
        try:
            self._sink(self.step, message)
        except Exception:
            log.exception("detail of step %r was lost: %s", self.step, message)


def run_steps(
    steps: Sequence[Step[C]],
    ctx: C,
    *,
    on_event: Callable[[Event], None] | None = None,
    check: Callable[[], None] | None = None,
    detail: Detail | None = None,
) -> None:
    """Run ``steps`` against ``ctx``; raise :class:`StepFailed` after rolling back."""
    emit = _reporting(on_event) if on_event else _ignore
    ran: list[Step[C]] = []
    for step in steps:
        if check is not None:
            try:
                check()
            except Exception as exc:
                undo_errors = _roll_back(ran, ctx, emit, detail)
                raise StepFailed(f"stopped before step {step.name!r}: {exc}",
                                 [exc, *undo_errors], step=step.name) from None
        if detail is not None:
            detail.step = step.name
        started = time.monotonic()
        try:
            # A ``when`` that raises fails its step, like the step itself raising.
            if step.when is not None and not step.when(ctx):
                continue
            emit(Event("run", step.name, step.progress))
            ran.append(step)
            step.run(ctx)
        except Exception as exc:
            emit(Event("failed", step.name, step.progress, time.monotonic() - started, exc))
            if step.best_effort:
                continue
            undo_errors = _roll_back(ran, ctx, emit, detail)
            message = f"step {step.name!r} failed: {exc}"
            raise StepFailed(message, [exc, *undo_errors], step=step.name) from None
        emit(Event("ok", step.name, step.progress, time.monotonic() - started))


def _roll_back(ran: Sequence[Step[C]], ctx: C, emit: Callable[[Event], None],
               detail: Detail | None) -> list[Exception]:
    errors: list[Exception] = []
    for step in reversed(ran):
        if step.undo is None:
            continue
        if detail is not None:
            detail.step = step.name
        emit(Event("undo", step.name, step.progress))
        started = time.monotonic()
        try:
            step.undo(ctx)
        except Exception as exc:
            errors.append(exc)
            emit(Event("undo_failed", step.name, step.progress, time.monotonic() - started, exc))
        else:
            emit(Event("undone", step.name, step.progress, time.monotonic() - started))
    return errors


def _reporting(on_event: Callable[[Event], None]) -> Callable[[Event], None]:
    def emit(event: Event) -> None:
        try:
            on_event(event)
        except Exception:
            log.exception("progress event %s of step %r was lost", event.kind, event.step)
    return emit


def _ignore(_: Event) -> None:
    return None
