"""vmmproc.kill_and_wait: True once the process is gone (woken by its pidfd), False when
it outlives the timeout; a process already gone is fine."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from banger.host import vmmproc


def _child(code: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", code])
    # The daemon reaps its QEMUs on a thread of their own: so here.
    threading.Thread(target=proc.wait, daemon=True).start()
    return proc


def test_gone_after_sigkill() -> None:
    proc = _child("import time; time.sleep(60)")
    assert vmmproc.kill_and_wait(proc.pid, signal.SIGKILL, 10)
    assert not vmmproc.pid_alive(proc.pid)


def test_waits_for_an_exit_on_its_own() -> None:
    proc = _child("import time; time.sleep(0.3)")
    assert vmmproc.kill_and_wait(proc.pid, 0, 10)  # signal 0: only wait


def test_false_when_it_outlives_the_timeout() -> None:
    proc = subprocess.Popen([sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, "
                             "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    try:
        assert not vmmproc.kill_and_wait(proc.pid, signal.SIGTERM, 0.3)
        assert vmmproc.pid_alive(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_already_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert vmmproc.kill_and_wait(proc.pid, signal.SIGKILL, 1)
