"""A new work disk's host key and git identity are asked for at once, in the background
(core/workinputs.py), and their failures surface when the work disk needs them."""

from __future__ import annotations

import threading

import pytest

from banger.core.workinputs import WorkInputs, WorkInputsFetch


class Guest:
    def __init__(self, fail: bool = False) -> None:
        self.both = threading.Barrier(2, timeout=10)
        self.fail = fail

    def new_host_key(self) -> tuple[bytes, str]:
        self.both.wait()  # returns only once git_identity runs too
        if self.fail:
            raise RuntimeError("ssh-keygen failed")
        return b"PRIVATE", "ssh-ed25519 AAAA banger-guest"

    def git_identity(self) -> dict[str, str]:
        self.both.wait()
        return {"user.name": "Ada"}


def test_both_asked_at_once() -> None:
    got = WorkInputsFetch(Guest()).result()  # type: ignore[arg-type]
    assert got == WorkInputs(b"PRIVATE", "ssh-ed25519 AAAA banger-guest", {"user.name": "Ada"})


def test_a_failure_surfaces_at_result() -> None:
    fetch = WorkInputsFetch(Guest(fail=True))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="ssh-keygen failed"):
        fetch.result()
