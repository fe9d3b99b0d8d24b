"""The vocabulary of progress events: one definition from the pipeline through the
daemon's API to the CLI (stdlib only, so the CLI may import it for nothing).

A step reports ``run``, then ``ok`` or ``failed``; a rollback reports ``undo``, then
``undone`` or ``undo_failed`` for each step it undoes. Around its steps an operation adds
``detail`` (a line of news from inside a stage, not journaled) and ``queued`` (waiting for
a boot slot, the label saying its place in line).

Literal types rather than an enum: every place that writes or compares a kind is checked
by mypy against this one definition (a misspelt kind is a type error, a comparison with
one is a non-overlapping check), and the API's JSON stays plain strings.
"""

from __future__ import annotations

from typing import Literal, get_args

StepEventKind = Literal["run", "ok", "failed", "undo", "undone", "undo_failed"]
EventKind = Literal[StepEventKind, "detail", "queued"]

# What the step engine (banger.pipeline.run_steps) emits, and every kind, in order.
STEP_EVENT_KINDS: tuple[StepEventKind, ...] = get_args(StepEventKind)
EVENT_KINDS: tuple[EventKind, ...] = get_args(EventKind)
