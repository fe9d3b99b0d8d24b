"""Throwaway network namespaces for host tests, and a way into them from this process.

Python 3.11 has no ``os.setns``: :func:`entered` calls setns(2) through ctypes on the
calling thread only. Commands that thread starts meanwhile (``ip``, ``nft``) inherit the
namespace, and /proc/sys/net resolves against it too. /sys/class/net does not (sysfs
belongs to the mount namespace), which is why banger's network code reads ``ip -j`` only.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_SELF = "/proc/thread-self/ns/net"
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def current_inode() -> int:
    """Identity of the calling thread's network namespace."""
    return os.stat(_SELF).st_ino


@contextmanager
def throwaway(prefix: str = "bgt") -> Iterator[str]:
    """A named netns (``ip netns add``) removed afterwards with everything in it."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
                       check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@contextmanager
def entered(name: str) -> Iterator[None]:
    """Move the calling thread into netns ``name``; back to where it was afterwards."""
    original = os.open(_SELF, os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    before = current_inode()
    try:
        _setns(target)
        # The whole point: never run the code under test in the namespace we came from.
        assert current_inode() != before, "setns did not leave the original namespace"
        yield
    finally:
        _setns(original)
        os.close(target)
        os.close(original)
        assert current_inode() == before


def run_in(ns: str, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in netns ``ns`` (``ip netns exec``), output captured, no check."""
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          timeout=timeout, check=False)
