"""A real QEMU whose guest floods its serial port: the log stays capped (issue 8).

The "guest" is the KVM probe stub with its first instructions replaced by a loop that
writes 'x' to the UART (0x3f8) forever, launched with banger's real QEMU command line.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from test_host_qemu_process import stub_config, vmdir

from banger.host import kvm, qemu, qemu_cmdline
from banger.host.seriallog import SerialLogCap
from banger.model.layout import Layout

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(shutil.which(qemu_cmdline.QEMU) is None, reason="QEMU not installed"),
]
__all__ = ["vmdir"]  # the fixture

# mov $0x3f8, %edx; mov $'x', %al; 1: out %al, (%dx); jmp 1b  (32-bit, the PVH entry)
FLOOD = bytes.fromhex("baf8030000" "b078" "ee" "ebfd")
CAP = 128 << 10


def test_qemu_flooding_its_console_stays_under_twice_the_cap(vmdir: Path) -> None:
    layout = Layout(vmdir / "state", vmdir / "c", vmdir / "cfg", vmdir / "run")
    paths = layout.vm("vm1")
    paths.dir.mkdir(parents=True)
    cfg = stub_config(vmdir, serial_log=paths.serial_log)
    elf = bytearray(kvm.probe_elf())
    elf[0x100:0x100 + len(FLOOD)] = FLOOD  # the entry point (base + 0x100)
    cfg.boot.kernel.write_bytes(elf)
    cap = SerialLogCap(layout, lambda: CAP, interval=0.05)
    cap.start()
    try:
        qemu.launch(cfg, "tcg")
        deadline = time.monotonic() + 60
        rotations, biggest, last = 0, 0, -1
        while rotations < 4:  # at least 4 caps' worth written
            assert time.monotonic() < deadline, "the guest did not write enough"
            size = paths.serial_log.stat().st_size
            old = (paths.serial_log_rotated.stat().st_size
                   if paths.serial_log_rotated.exists() else 0)
            rotations += size < last
            last = size
            biggest = max(biggest, size + old)
            time.sleep(0.01)
    finally:
        cap.stop()
    assert biggest < 2 * CAP + (CAP // 2), biggest
    # append=on: after each truncation QEMU wrote at the new end, leaving no hole.
    assert set(paths.serial_log.read_bytes()) <= {ord("x")}
    assert set(paths.serial_log_rotated.read_bytes()) == {ord("x")}
