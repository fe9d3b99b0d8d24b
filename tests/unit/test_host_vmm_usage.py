"""vmmproc.usage: a process's RSS and CPU time from /proc; None once it is gone."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from banger.host import vmmproc


def test_usage_of_a_running_process_grows_with_its_cpu_time() -> None:
    before = vmmproc.usage(os.getpid())
    assert before is not None and before.rss_bytes > 1 << 20  # this Python: MiBs
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    after = vmmproc.usage(os.getpid())
    assert after is not None and after.cpu_seconds >= before.cpu_seconds + 0.1


def test_usage_of_a_gone_or_zombie_process_is_none() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    # Exited but not reaped yet: a zombie has no memory to speak of.
    while vmmproc.usage(child.pid) is not None:
        assert time.monotonic() < deadline, "the child never became a zombie"
        time.sleep(0.01)
    child.wait()
    assert vmmproc.usage(child.pid) is None
