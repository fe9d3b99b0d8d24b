"""`banger --version` and `--help` cost little more than click: they load neither pydantic
nor httpx nor rich (issue 9; bench/cli_latency.py measures the time)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# wsproto: no CLI command loads it (the exec WebSocket has its own framer, and
# tests/integration/test_exec_fast.py pins what `vm exec` loads).
HEAVY = ("pydantic", "httpx", "rich", "wsproto")


def imported(*args: str) -> set[str]:
    """Top-level packages a `python -m banger.cli.main ARGS` run imports."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "banger.cli.main", *args],
                       capture_output=True, text=True, check=True, timeout=60)
    return {line.rsplit("|", 1)[-1].strip().split(".")[0]
            for line in r.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["vm", "--help"],
                                  ["vm", "run", "--help"], ["completion", "bash"]])
def test_version_and_help_load_no_heavy_package(args: list[str]) -> None:
    mods = imported(*args)
    assert "click" in mods and "banger" in mods  # the list is real
    assert not mods & set(HEAVY), sorted(mods & set(HEAVY))


def test_the_client_types_read_what_the_schema_writes() -> None:
    # The CLI reads the daemon's answers without pydantic: its dataclasses must have the
    # schema's fields, or a renamed field would silently read as its default.
    import dataclasses

    from banger.api import schema
    from banger.client import types

    for name in ("ErrorBody", "Health", "Runtime", "VMOut", "BatchItem", "BatchResponse",
                 "ProgressEvent", "Logs", "LogEvent", "SshTarget", "GuestPortOut", "VMPorts",
                 "SshConfig", "OperationOut", "Check", "Doctor", "FilesystemOut", "GuestStatsOut",
                 "VmmUsageOut", "VMStatsOut"):
        ours = {f.name for f in dataclasses.fields(getattr(types, name))}
        assert ours == set(getattr(schema, name).model_fields), name
    for body, model in (("CreateBody", "VMCreate"), ("SetBody", "VMSet"),
                        ("WorkspaceBody", "WorkspaceIn")):
        assert set(getattr(types, body).__annotations__) == set(
            getattr(schema, model).model_fields), body
