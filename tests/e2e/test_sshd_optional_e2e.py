"""sshd is for people, not for banger: a VM whose sshd cannot run starts, takes a
workspace, syncs files and the git identity, lists its ports, runs commands and stops,
and neither the CLI nor the daemon runs ssh for any of it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import finish, make_banger, qemu_pids

pytestmark = pytest.mark.e2e


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


def test_a_vm_without_sshd_does_everything_banger_does(image_dir: Path,
                                                       tmp_path: Path) -> None:
    gitcfg = tmp_path / "gitconfig"
    gitcfg.write_text("[user]\n\tname = First Name\n\temail = first@example.invalid\n")
    b = make_banger(images_dir=image_dir, extra_env={"GIT_CONFIG_GLOBAL": str(gitcfg)})
    try:
        b.run("vm", "run", "-d", "--name", "nosshd")
        # sshd goes away for good: its binary moves aside on the root disk (durable).
        b.run("vm", "exec", "nosshd", "--", "mv", "/usr/sbin/sshd", "/usr/sbin/sshd.off")
        b.run("vm", "stop", "nosshd")
        b.stop_daemon()
        # From here on an `ssh` first on PATH (the CLI's and the daemon's) leaves a mark.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        mark = tmp_path / "ssh-ran"
        (bin_dir / "ssh").write_text(f'#!/bin/sh\necho "$@" >> {mark}\nexit 255\n')
        (bin_dir / "ssh").chmod(0o755)
        b.env["PATH"] = f"{bin_dir}:{os.environ['PATH']}"
        secret = tmp_path / "npmrc"
        secret.write_text("token=2\n")
        (b.home / "config").mkdir(exist_ok=True)
        (b.home / "config" / "config.toml").write_text(
            f'[[file_sync]]\nhost = "{secret}"\nguest = "~/.npmrc"\nmode = "0600"\n')
        gitcfg.write_text("[user]\n\tname = Second Name\n\temail = second@example.invalid\n")

        started = b.run("vm", "start", "nosshd")
        assert "wait_ssh" not in started.stderr

        def guest(*argv: str) -> str:
            return b.run("vm", "exec", "nosshd", "--", *argv).stdout

        assert b.run("vm", "exec", "nosshd", "--", "pidof", "sshd",
                     check=False).returncode != 0, "sshd does not run"
        # file_sync and the changed git identity landed at start.
        assert guest("stat", "-c", "%a %u", "/root/.npmrc").split() == ["600", "0"]
        assert guest("cat", "/root/.npmrc") == "token=2\n"
        assert guest("git", "config", "--global", "user.name") == "Second Name\n"
        # A workspace into the running VM, then again (the old tree is swapped out).
        repo = tmp_path / "proj"
        repo.mkdir()
        _git(repo, "init", "-q", "-b", "main")
        (repo / "README").write_text("first\n")
        (repo / "run.sh").write_text("#!/bin/sh\necho ran\n")
        (repo / "run.sh").chmod(0o755)
        _git(repo, "add", "-A")
        _git(repo, "-c", "user.name=x", "-c", "user.email=x@x", "commit", "-q", "-m", "1")
        b.run("vm", "workspace", "prepare", "nosshd", str(repo))
        assert guest("/root/repo/run.sh") == "ran\n"
        (repo / "README").write_text("second\n")
        b.run("vm", "workspace", "prepare", "nosshd", str(repo))
        assert guest("cat", "/root/repo/README") == "second\n"
        assert [n for n in guest("ls", "-A", "/root").split() if ".banger-" in n] == [], \
            "no temporary tree is left beside /root/repo"
        # Ports come from the agent: no sshd on 22 any more.
        ports = json.loads(b.run("vm", "ports", "nosshd", "--json").stdout)
        assert isinstance(ports, list)
        assert not any(p["port"] == 22 and p["proto"] == "tcp" for p in ports)
        # A person's ssh says what is wrong, with the serial log, after a short wait.
        ssh = b.run("vm", "ssh", "nosshd", "true", check=False)
        assert ssh.returncode != 0 and "sshd in VM 'nosshd'" in ssh.stderr
        assert "serial log" in ssh.stderr
        # Stop: the guest powers off through its agent.
        b.run("vm", "stop", "nosshd")
        log = (b.home / "state" / "bangerd.log").read_text()
        assert "stop ok vm=nosshd stage=guest_poweroff" in log, log[-2000:]
        assert b.show("nosshd")["state"] == "stopped"
        assert qemu_pids(str(b.home)) == []
        assert not mark.exists(), f"ssh ran: {mark.read_text()}"
        b.run("vm", "delete", "nosshd")
    finally:
        finish(b)
