"""The shell programs banger runs in guests (banger/host/guest/sh/), run here by the
host's own sh exactly as the guest agent execs them (argv, no shell parsing the
arguments)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from importlib import resources
from pathlib import Path

from banger.host import guestsh

PROGRAMS = sorted(p.name for p in (resources.files("banger.host") / "guest" / "sh").iterdir())
# Words a path or URL may hold that a shell would act on if they reached it unquoted.
HOSTILE = "a b'c\"d$(touch pwned)`touch pwned2`;touch pwned3 *"


def test_every_program_is_valid_sh() -> None:
    assert PROGRAMS == ["start-bootstrap"]
    for name in PROGRAMS:
        done = subprocess.run(["sh", "-n", "-c", guestsh.program(name)], capture_output=True)
        assert done.returncode == 0, (name, done.stderr)


def test_argv_passes_each_argument_as_is() -> None:
    argv = guestsh.argv("start-bootstrap", HOSTILE, "/root/repo", "/l")
    assert argv[:2] == ["sh", "-c"] and argv[3:] == ["start-bootstrap", HOSTILE,
                                                     "/root/repo", "/l"]


def test_start_bootstrap_detaches_with_its_output_in_the_log(tmp_path: Path) -> None:
    # The program starts /root/.banger/banger-bootstrap: run it with that path pointed
    # at a stand-in (the test's own copy of the program).
    if shutil.which("setsid") is None:
        raise AssertionError("setsid (util-linux) is missing on this host")
    script = tmp_path / "bootstrap"
    script.write_text('#!/bin/sh\necho "args: $1 | $2"\nsleep 1\necho done\n')
    script.chmod(0o755)
    program = guestsh.program("start-bootstrap").replace("/root/.banger/banger-bootstrap",
                                                         str(script))
    log = tmp_path / "boot.log"
    done = subprocess.run(["sh", "-c", program, "start-bootstrap", HOSTILE, "/w", str(log)],
                          cwd=tmp_path, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"" and done.stderr == b"", "its output goes to the log"
    deadline = time.monotonic() + 20
    while b"done" not in (log.read_bytes() if log.exists() else b""):
        assert time.monotonic() < deadline, "the detached program did not finish"
        time.sleep(0.05)
    assert log.read_text().splitlines()[0] == f"args: {HOSTILE} | /w"
    assert not any("pwned" in n for n in os.listdir(tmp_path))
