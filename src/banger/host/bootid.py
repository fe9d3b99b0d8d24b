"""This host boot's id: what a cached host fact (an image's verification, the KVM probe's
verdict) is keyed on, so that a reboot (a new kernel, new devices) makes it be redone."""

from __future__ import annotations

from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str:
    """The kernel's random id of this boot, or "" where it cannot be read."""
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""
