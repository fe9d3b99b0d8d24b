"""A real guest flooding its console: the daemon keeps its serial log capped (issue 8)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Banger

pytestmark = pytest.mark.e2e

MIB = 1 << 20


def test_console_flood_stays_under_twice_the_cap(banger: Banger) -> None:
    config = banger.home / "config" / "config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("[logs]\nserial_max_mib = 1\n")
    banger.run("vm", "run", "-d", "--name", "loud")
    vm = banger.show("loud")
    log = Path(str(vm["serial_log"]))
    old = log.with_name(log.name + ".1")
    biggest = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal biggest
        while not done.is_set():
            sizes = [p.stat().st_size if p.exists() else 0 for p in (log, old)]
            biggest = max(biggest, sum(sizes))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # console=ttyS0 (host/qemu.py): 4 MiB of 'x' on the guest's serial console.
        banger.run("vm", "ssh", "loud", "--", "sh", "-c",
                   "head -c 4194304 /dev/zero | tr '\\0' x > /dev/ttyS0", timeout=300)
    finally:
        done.set()
        watcher.join()
    assert old.exists(), "4 MiB on the console and the log was never rotated"
    assert old.read_bytes().count(b"x") > MIB // 2
    assert biggest < 2 * MIB + MIB // 2, f"serial logs reached {biggest} bytes"
    logs = banger.run("vm", "logs", "loud")
    assert "older output is in" in logs.stderr and str(old) in logs.stderr.replace("\n", "")
    assert "xxxx" in logs.stdout
