"""`vm run --rm` leaves no VM however the CLI ends once the boot's result is in: a signal
between the stream and the guest command, or a stderr that is gone when "ready" is said."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
from click.testing import CliRunner

import banger.cli.main as cli_main
from banger.cli import render
from tests.integration.conftest import Daemon


def _fail_at_ready(monkeypatch: pytest.MonkeyPatch, fail: Any) -> None:
    real = render.err_console.print

    def print_(*args: Any, **kwargs: Any) -> None:
        if args and "ready" in str(args[0]):
            fail()
        real(*args, **kwargs)

    monkeypatch.setattr(render.err_console, "print", print_)


def _broken_pipe() -> None:
    raise BrokenPipeError(32, "Broken pipe")  # e.g. `banger vm run --rm ... 2>&1 | head`


def _ctrl_c() -> None:
    # Arrives after the stream's own handler is gone, before the guest command's is set.
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("fail", [_broken_pipe, _ctrl_c], ids=["stderr-gone", "sigint"])
def test_run_rm_deletes_the_vm_when_the_cli_ends_after_the_boot(
        daemon: Daemon, monkeypatch: pytest.MonkeyPatch, fail: Any) -> None:
    _fail_at_ready(monkeypatch, fail)
    result = CliRunner().invoke(cli_main.cli, ["vm", "run", "--rm", "--name", "eph", "--",
                                               "true"])
    assert result.exit_code != 0
    assert daemon.client.list_vms() == [], "the --rm VM was left behind"
    assert daemon.vmm.procs == {}


def test_prune_deletes_only_what_the_user_confirmed(daemon: Daemon,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # The question "delete old?" may wait an hour for its answer; a VM stopped meanwhile
    # (work on its disk) was not in it and must not be deleted with it.
    daemon.client.create({"name": "old", "start": False}, lambda _: None)
    daemon.client.create({"name": "dev"}, lambda _: None)

    def confirm(*_: Any, **__: Any) -> bool:
        daemon.client.stop("dev")  # while the question is on the screen
        return True

    monkeypatch.setattr("click.confirm", confirm)
    result = CliRunner().invoke(cli_main.cli, ["vm", "prune"])
    assert result.exit_code == 0, result.output
    assert [v.name for v in daemon.client.list_vms()] == ["dev"]
