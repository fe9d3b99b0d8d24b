"""Real banger and bangerd processes on a fresh BANGER_HOME (no VMs: host ports are real but
nothing boots), and the processes of another uid that try to get in between them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

NOBODY = 65534


@dataclass
class Home:
    root: Path
    env: dict[str, str]

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.run_dir / "bangerd.sock"

    @property
    def log(self) -> Path:
        return self.root / "state" / "bangerd.log"

    def cli_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "banger.cli.main", *args]

    def cli(self, *args: str, timeout: float = 90,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.cli_argv(*args), env=env or self.env, capture_output=True,
                              text=True, timeout=timeout, cwd="/")

    def daemon(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "banger.daemon.main", *args],
                                env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd="/")

    def daemons(self) -> list[int]:
        """bangerd processes (not zombies) whose BANGER_HOME is this one, from /proc."""
        mine = f"BANGER_HOME={self.root}".encode()
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                env = (d / "environ").read_bytes().split(b"\0")
                # Bytes: another process's name (in stat) may be any bytes, not UTF-8.
                state = (d / "stat").read_bytes().rsplit(b") ", 1)[1][:1].decode()
            except (OSError, IndexError):
                continue
            if b"banger.daemon.main" in cmd and mine in env and state != "Z":
                out.append(int(d.name))
        return out

    def wait_health(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.cli("vm", "list").returncode != 0:
            assert time.monotonic() < deadline, f"no daemon answered: {self.log_text()}"
            time.sleep(0.2)

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else "(no bangerd.log)"


def wait_gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} still running after {timeout} s")


@pytest.fixture
def home() -> Iterator[Home]:
    # Short paths (Unix socket paths are limited to 108 bytes), under /tmp so that a test
    # may open a way in for another uid (pytest's tmp_path is under a 0700 directory).
    root = Path(tempfile.mkdtemp(prefix="bgt-", dir="/tmp"))
    (root / "config").mkdir()
    # No host DNS listener: tests run in parallel with other daemons on port 5354.
    (root / "config" / "config.toml").write_text("[network]\ndns_port = 0\n")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BANGER_") and k != "XDG_RUNTIME_DIR"}
    env["BANGER_HOME"] = str(root)
    h = Home(root, env)
    yield h
    for pid in h.daemons():
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
    shutil.rmtree(root, ignore_errors=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="making files of another uid needs root")


def as_nobody(code: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run Python ``code`` as uid/gid 65534 (the system Python: the venv's lives under a
    directory that uid cannot read)."""
    return subprocess.run(["/usr/bin/python3", "-c", code, *args], user=NOBODY,
                          group=NOBODY, extra_groups=[], capture_output=True, text=True,
                          timeout=timeout, cwd="/")
