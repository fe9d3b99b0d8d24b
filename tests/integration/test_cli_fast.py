"""The CLI against a real daemon, as a separate process: `banger vm list` loads neither
pydantic nor httpx (nor rich, to a pipe), and shell completion lists the daemon's VMs
(issue 9)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from banger.cli.main import cli
from tests.integration.conftest import Daemon


def run(*args: str, env: dict[str, str] | None = None,
        importtime: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, *(["-X", "importtime"] if importtime else []),
            "-m", "banger.cli.main", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          env=env or dict(os.environ))


def modules(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip().split(".")[0]
            for line in stderr.splitlines() if line.startswith("import time:")}


def make(daemon: Daemon, *names: str) -> None:
    for name in names:
        r = CliRunner().invoke(cli, ["vm", "create", "--no-start", "--name", name])
        assert r.exit_code == 0, r.output


def test_vm_list_loads_neither_pydantic_nor_httpx_nor_rich(daemon: Daemon) -> None:
    make(daemon, "alpha", "beta", "gamma")
    r = run("vm", "list", importtime=True)
    assert r.returncode == 0, r.stderr
    assert all(n in r.stdout for n in ("alpha", "beta", "gamma")), r.stdout
    mods = modules(r.stderr)
    assert "banger" in mods and not mods & {"pydantic", "httpx", "wsproto"}, sorted(mods)
    # To a pipe, the table is plain text (what rich prints there): no rich at all.
    assert "rich" not in mods
    assert r.stdout.splitlines()[0].split() == ["ID", "NAME", "STATE", "IMAGE", "IP", "VCPU",
                                                "MEM", "DISK", "SSH", "CREATED"]


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What bash's Tab offers after ``words`` (click's bash_complete protocol)."""
    env = dict(os.environ if env is None else env)
    env.update(_BANGER_COMPLETE="bash_complete", COMP_WORDS=words,
               COMP_CWORD=str(len(words.split(" ")) - 1))
    r = run(env=env)
    assert r.returncode == 0, r.stderr
    return [line.split(",", 1)[1] for line in r.stdout.splitlines() if line]


def test_tab_after_a_vm_command_lists_the_vms(daemon: Daemon) -> None:
    make(daemon, "box", "web")
    assert complete("banger vm stop ") == ["box", "web"]
    assert complete("banger vm stop w") == ["web"]
    assert complete("banger vm ssh b") == ["box"]
    assert complete("banger vm workspace export ") == ["box", "web"]
    assert "stop" in complete("banger vm st")  # commands complete as ever


def test_tab_without_a_daemon_offers_nothing_and_starts_none(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
    env["BANGER_HOME"] = str(tmp_path / "h")
    assert complete("banger vm stop ", env) == []
    assert not (tmp_path / "h").exists()  # no daemon, not even its directories


def test_completion_prints_the_script_for_each_shell() -> None:
    for shell, needle in (("bash", "complete -o nosort -F"), ("zsh", "compdef"),
                          ("fish", "complete --no-files --command banger")):
        r = run("completion", shell)
        assert r.returncode == 0 and needle in r.stdout and "_BANGER_COMPLETE" in r.stdout, (
            shell, r.stdout)
