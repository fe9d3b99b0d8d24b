"""The console script ends without Python's finalization (cli.main.exit_now) and keeps
the exit statuses a user's script sees: 0, click's usage error 2, a SystemExit's code,
and a failed final flush of stdout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from banger.cli import main as climain


def _banger(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "banger.cli.main", *args],
                          capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload]


def test_statuses_of_the_console_script() -> None:
    ok = _banger("--version")
    assert ok.returncode == 0 and ok.stdout.startswith("banger, version")
    bad = _banger("vm", "nosuchcommand")
    assert bad.returncode == 2 and "No such command" in bad.stderr


@pytest.mark.parametrize(("code", "status", "said"), [
    (None, 0, ""), (7, 7, ""), (256 + 3, 3, ""), (-1, 255, ""), ("fatal: x", 1, "fatal: x\n"),
])
def test_exit_now_maps_codes_like_systemexit(code: object, status: int, said: str) -> None:
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # exit_now ends the process it runs in
        os.close(r)
        os.dup2(w, 2)
        sys.stderr = os.fdopen(2, "w")
        try:
            climain.exit_now(code)
        finally:
            os._exit(99)
    os.close(w)
    with os.fdopen(r) as f:
        assert f.read() == said
    _, wstatus = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(wstatus) == status


def test_a_closed_stdout_is_a_failure_not_a_success() -> None:
    # `banger ... | head -0`: the final flush fails; the status says so (as Python's
    # own finalization would: 120), with no traceback.
    r, w = os.pipe()
    os.close(r)
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; from banger.cli.main import exit_now; "
                           "sys.stdout.write('x'); exit_now(0)"],
                          stdout=w, stderr=subprocess.PIPE, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items()
                               if k != "PYTHONUNBUFFERED"})  # buffered: the flush fails
    os.close(w)
    assert proc.returncode == 120, proc.stderr
    assert "Traceback" not in proc.stderr


def test_closed_standard_streams_keep_the_status() -> None:
    # `banger ... >&- 2>&-` (cron, units): Python starts with sys.stdout/stderr None.
    for args, status in ((("--version",), 0), (("vm", "nosuchcommand"), 2)):
        proc = subprocess.run(
            [sys.executable, "-c", "import os, runpy, sys; os.close(1); os.close(2); "
             "sys.stdout = sys.stderr = None; sys.argv = ['banger', *sys.argv[1:]]; "
             "runpy.run_module('banger.cli.main', run_name='__main__')", *args],
            timeout=60)
        assert proc.returncode == status, args
