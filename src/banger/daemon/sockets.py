"""The daemon's Unix socket: owner-only, in a verified private directory, refusing to steal
a live daemon's socket, and removed at exit only while it is still this daemon's own."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from banger.local.trust import private_dir


@dataclass(frozen=True)
class BoundSocket:
    sock: socket.socket
    path: Path
    ident: tuple[int, int]  # (st_dev, st_ino) of the socket file this daemon bound

    def release(self) -> None:
        """Unlink the socket file if it is still the one bound here: after a stale-socket
        cleanup by someone else, the path may be another daemon's live socket."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self.ident:
            self.path.unlink(missing_ok=True)


def bind_socket(path: Path) -> BoundSocket:
    private_dir(path.parent, what="runtime directory")
    if path.exists():
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a dead daemon
        else:
            raise SystemExit(f"bangerd: another daemon is already serving {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    st = os.lstat(path)
    return BoundSocket(sock, path, (st.st_dev, st.st_ino))
