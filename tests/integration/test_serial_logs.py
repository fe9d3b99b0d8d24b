"""`vm logs` after the serial log was rotated past its cap, and delete removing both."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from banger.cli.main import cli
from banger.daemon.logstream import LOG_TAIL
from tests.integration.conftest import Daemon


def test_logs_reach_back_into_the_rotated_file_and_say_so(daemon: Daemon) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["vm", "create", "--name", "box"]).exit_code == 0
    paths = daemon.service.show("box").paths
    paths.serial_log_rotated.write_bytes(b"x" * LOG_TAIL + b"older end\n")
    paths.serial_log.write_bytes(b"newest\n")
    r = runner.invoke(cli, ["vm", "logs", "box"], catch_exceptions=False)
    assert r.exit_code == 0
    assert r.stdout.endswith("older end\nnewest\n")
    assert len(r.stdout) == LOG_TAIL  # the end of both, no more
    assert f"older output is in {paths.serial_log_rotated}" in r.stderr
    assert runner.invoke(cli, ["vm", "delete", "box"]).exit_code == 0
    assert not paths.serial_log_rotated.exists() and not Path(paths.dir).exists()
