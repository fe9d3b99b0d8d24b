"""The serial log cap: copy-truncate rotation against a real O_APPEND writer."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from banger.host.seriallog import SerialLogCap, new_boot, rotate_if_over
from banger.model.layout import Layout

CAP = 256 << 10
LINES = 200_000  # 21 bytes each


def test_rotation_keeps_the_newest_cap_bytes(tmp_path: Path) -> None:
    log, old = tmp_path / "serial.log", tmp_path / "serial.log.1"
    log.write_bytes(b"a" * 10 + b"b" * CAP)
    assert not rotate_if_over(log, old, CAP + 10)
    assert rotate_if_over(log, old, CAP)
    assert old.read_bytes() == b"b" * CAP and log.read_bytes() == b""
    assert not rotate_if_over(tmp_path / "missing", old, CAP)


def test_a_writer_flooding_the_log_stays_under_twice_the_cap(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "state", tmp_path / "cache", tmp_path / "config",
                    tmp_path / "run")
    paths = layout.vm("vm1")
    paths.dir.mkdir(parents=True)
    # Like QEMU with append=on: one O_APPEND descriptor, numbered lines, 4 MiB in all at
    # about 10 MiB/s (a console under TCG writes well under 1 MiB/s).
    writer = textwrap.dedent(f"""
        import os, time
        fd = os.open({str(paths.serial_log)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        for i in range(0, {LINES}, 500):
            os.write(fd, b"".join(b"%020d\\n" % n for n in range(i, i + 500)))
            time.sleep(0.001)
    """)
    cap = SerialLogCap(layout, lambda: CAP, interval=0.01)
    cap.start()
    proc = subprocess.Popen([sys.executable, "-c", writer])
    biggest = 0
    while proc.poll() is None:
        sizes = [p.stat().st_size if p.exists() else 0
                 for p in (paths.serial_log, paths.serial_log_rotated)]
        biggest = max(biggest, sum(sizes))
        time.sleep(0.002)
    cap.check()
    cap.stop()
    assert proc.returncode == 0
    assert paths.serial_log_rotated.exists(), "4 MiB written and never rotated"
    # About twice the cap: the current file overshoots by what arrives in one interval
    # (and in the moments the thread is not scheduled, on a busy machine).
    assert biggest < 3 * CAP, biggest
    current = paths.serial_log.read_bytes()
    older = paths.serial_log_rotated.read_bytes()
    assert b"\0" not in current, "a hole: the writer wrote past the truncation"
    # The copy also takes what arrived while it ran (a few KiB at this rate).
    assert len(older) <= CAP + (64 << 10) and len(current) <= 2 * CAP
    # The newest output is all there, in order, up to the last line written.
    lines = (older + current).split(b"\n")[1:-1]  # the first may be cut by the copy
    assert lines[-1] == b"%020d" % (LINES - 1)
    numbers = [int(n) for n in lines[-100:]]
    assert numbers == list(range(numbers[0], numbers[0] + 100))


def test_each_boot_starts_a_fresh_log_and_keeps_the_last(tmp_path: Path) -> None:
    log, old = tmp_path / "serial.log", tmp_path / "serial.log.1"
    new_boot(log, old)  # first boot: nothing to keep
    assert not old.exists()
    log.write_text("boot 1\n")
    new_boot(log, old)
    assert old.read_text() == "boot 1\n" and not log.exists()
