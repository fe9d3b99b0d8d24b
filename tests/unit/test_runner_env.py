"""The runner's environment: entries added on top of the daemon's, None removes one."""

from __future__ import annotations

import pytest

from banger.host.runner import run


def test_env_none_removes_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BANGER_TEST_GONE", "inherited")
    monkeypatch.setenv("BANGER_TEST_KEPT", "inherited")
    out = run(["env"], env={"BANGER_TEST_GONE": None, "BANGER_TEST_NEW": "set"}).stdout
    lines = out.splitlines()
    assert "BANGER_TEST_KEPT=inherited" in lines and "BANGER_TEST_NEW=set" in lines
    assert not any(line.startswith("BANGER_TEST_GONE=") for line in lines)
