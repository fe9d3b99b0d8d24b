"""Which accelerator QEMU should use: KVM when it really runs a guest, else TCG.

Owns the probe. "/dev/kvm exists" is not enough: under nested PVM it opens, but a stock
guest hangs. So the probe boots a tiny guest the way the real boot does (``-M microvm``,
``-cpu max``, the same qboot firmware, a PVH ELF entered in 32-bit protected mode, like
the real vmlinux) and requires it to reach a known exit through ``isa-debug-exit``
within a few seconds. The result is cached per process; ``BANGER_ACCEL`` overrides it.
"""

from __future__ import annotations

import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from banger.host.qemu_cmdline import SANDBOX
from banger.host.runner import CommandError, run
from banger.host.vmmuser import RunAs

QEMU = "qemu-system-x86_64"
ENV_OVERRIDE = "BANGER_ACCEL"
PROBE_TIMEOUT = 4.0
# The guest writes this to the isa-debug-exit port; QEMU exits with (value << 1) | 1.
PROBE_CODE = 0x2A
PROBE_EXIT = (PROBE_CODE << 1) | 1
_DEBUG_EXIT_PORT = 0xF4


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" | "tcg"
    reason: str


_cache: AccelChoice | None = None
_lock = threading.Lock()


def probe_accel(runas: RunAs | None = None) -> AccelChoice:
    """KVM if a test guest really runs under it, else TCG; cached after the first call.
    ``runas``: the identity the real QEMU runs as, which must be able to open /dev/kvm."""
    forced = os.environ.get(ENV_OVERRIDE, "").strip().lower()
    if forced in ("kvm", "tcg"):
        return AccelChoice(forced, f"forced by {ENV_OVERRIDE}={forced}")
    global _cache
    with _lock:
        if _cache is None:
            _cache = _probe(runas=runas)
        return _cache


def reset_cache() -> None:
    global _cache
    with _lock:
        _cache = None


def _probe(kvm: Path = Path("/dev/kvm"), runas: RunAs | None = None) -> AccelChoice:
    if not kvm.exists():
        return AccelChoice("tcg", f"{kvm} does not exist; using TCG software emulation")
    if runas is not None and not runas.can_access(kvm, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"{kvm} is not accessible to QEMU's user {runas.name!r} "
                                  "(give /dev/kvm to the kvm group, mode 0660); using TCG "
                                  "software emulation")
    if runas is None and not os.access(kvm, os.R_OK | os.W_OK):
        return AccelChoice("tcg", f"{kvm} is not accessible to this user (add it to the "
                                  "kvm group); using TCG software emulation")
    ok, detail = run_probe_guest("kvm")
    if ok:
        return AccelChoice("kvm", f"a test guest ran under KVM ({detail})")
    return AccelChoice("tcg", f"{kvm} is present but a test guest did not run under it "
                              f"({detail}); using TCG software emulation")


def run_probe_guest(accel: str, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the probe guest under ``accel``; (reached the known exit, what happened)."""
    with tempfile.TemporaryDirectory(prefix="banger-kvm-probe-") as tmp:
        stub = Path(tmp) / "probe.elf"
        stub.write_bytes(probe_elf())
        argv = probe_argv(stub, accel)
        started = time.monotonic()
        try:
            res = run(argv, check=False, timeout=timeout)
        except CommandError as exc:
            if exc.returncode is None and exc.reason and "timed out" in exc.reason:
                return False, f"no exit within {timeout:.0f} s"
            return False, str(exc.reason or exc)
        took = time.monotonic() - started
        if res.returncode == PROBE_EXIT:
            return True, f"known exit in {took:.2f} s"
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"qemu exited with status {res.returncode}: {last}"


def probe_argv(stub: Path, accel: str) -> list[str]:
    """The probe's command line: the real boot's machine and CPU, nothing else."""
    accel_arg = "kvm" if accel == "kvm" else "tcg"
    return [
        QEMU, "-sandbox", SANDBOX,  # as the real VMM runs: proves QEMU starts so
        "-M", "microvm,acpi=on", "-cpu", "max", "-accel", accel_arg,
        "-m", "32", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(stub),
        "-device", f"isa-debug-exit,iobase={_DEBUG_EXIT_PORT:#x},iosize=0x04",
    ]


# Assembled from this (GNU as --64, linked at 0x100100, source in guest/kvm-probe.S)
# and kept as bytes so no assembler is needed at run time. Entered like vmlinux's PVH
# entry (32-bit, paging off), it does what a kernel does first: identity-map 2 MiB with
# PAE paging, set EFER.LME, enable paging, load a GDT, far-jump into 64-bit mode, load
# an IDT, and then executes int3, the breakpoint the kernel itself relies on while it
# patches its code at boot. Only the #BP handler writes the known exit. Under nested PVM
# every step up to int3 runs; the int3 never arrives, just as a stock kernel hangs there.
_PROBE_CODE_HEX = (
    "c7050010100003201000c7050020100003301000c70500301000830000000f20e083c8200f22e0b8"
    "001010000f22d8b9800000c00f320d000100000f300f20c00d010000800f22c00f011590011000ea"
    "56011000080066b810008ed88ed048c7c4000020000f011c25a0011000ccf4ebfdb02ae6f4f4ebfd"
    "000000000000000000000000009a20000000000000920000170078011000662e0f1f840000000000"
    "3f00b001100000000000660f1f440000000000000000000000000000000000000000000000000000"
    "00000000000000000000000000000000000000000000000071010800008e10000000000000000000"
)
_PROBE_BASE = 0x100000
_PROBE_CODE_OFFSET = 0x100
_PROBE_MEMSZ = 0x4000  # code, then zeroed PML4, PDPT and PD pages at +0x1000..+0x3fff


def probe_elf() -> bytes:
    """A 64-bit ELF with a PVH entry note, like vmlinux, carrying the probe code."""
    base = _PROBE_BASE
    code = bytes.fromhex(_PROBE_CODE_HEX)
    if bytes([0xB0, PROBE_CODE, 0xE6, _DEBUG_EXIT_PORT]) not in code:
        raise AssertionError("probe code does not report PROBE_CODE")
    ehdr_size, phdr_size = 64, 56
    note_off = ehdr_size + 2 * phdr_size
    entry = base + _PROBE_CODE_OFFSET
    # Elf64_Nhdr: namesz, descsz, type (XEN_ELFNOTE_PHYS32_ENTRY = 18), "Xen\0", entry.
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)
    head_len = note_off + len(note)
    total = _PROBE_CODE_OFFSET + len(code)
    ehdr = struct.pack(
        "<4sBBBBB7sHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,   # ELF64, little-endian, SysV
        2, 62, 1,                                # ET_EXEC, EM_X86_64, version
        entry, ehdr_size, 0, 0,                  # entry, phoff, shoff, flags
        ehdr_size, phdr_size, 2, 64, 0, 0,
    )
    load = struct.pack("<IIQQQQQQ", 1, 7, 0, base, base, total, _PROBE_MEMSZ, 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, base + note_off, base + note_off,
                        len(note), len(note), 4)
    pad = b"\0" * (_PROBE_CODE_OFFSET - head_len)
    return ehdr + load + pnote + note + pad + code
