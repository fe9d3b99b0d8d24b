"""The guest port on this host: what is about sshd, for people (``vm ssh``,
``ssh <name>.vm``): banger's managed key, per-VM pinned host keys, sshd's readiness
(banger.host.ssh); and the host user's git identity. banger's own calls into a guest go
through its agent (banger.host.guest_agent)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from banger.host import ssh
from banger.host.runner import run
from banger.host.scratch import Scratch
from banger.model.errors import OperationFailed
from banger.model.layout import Layout
from banger.ports import Endpoint


class SshGuest:
    def __init__(self, layout: Layout) -> None:
        self._scratch = Scratch(layout.state_dir)
        self.key = layout.ssh_key
        self.known_hosts = layout.known_hosts
        self._known_hosts_lock = threading.Lock()

    def ensure_key(self) -> str:
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return ssh.ensure_key(self.key)

    def wait_ready(self, *, addr: Endpoint, alias: str, timeout: float, serial_log: Path,
                   alive: Callable[[], bool]) -> float:
        try:
            return ssh.wait_ready(port=addr.port, host=addr.host, key=self.key,
                                  known_hosts=self.known_hosts, alias=alias,
                                  timeout=timeout, serial_log=serial_log, alive=alive)
        except ssh.SshError as exc:
            raise OperationFailed(str(exc)) from exc

    def git_identity(self) -> dict[str, str]:
        """user.name and user.email from the host user's global git config, where set."""
        # One git process for both (a start asks on its path to the boot). -z: each
        # entry is "key\nvalue\0", whatever the value holds; the last one set wins,
        # as for `git config --get`.
        res = run(["git", "config", "--global", "-z", "--get-regexp",
                   r"^user\.(name|email)$"], check=False, timeout=10)
        out: dict[str, str] = {}
        if res.returncode != 0:
            return out
        for entry in res.stdout.split("\0"):
            key, _, value = entry.partition("\n")
            if key in ("user.name", "user.email") and value.strip():
                out[key] = value.strip()
        return out

    def new_host_key(self) -> tuple[bytes, str]:
        return ssh.host_keypair(self._scratch.disk())

    def trust_host(self, alias: str, public_key: str) -> None:
        with self._known_hosts_lock:
            ssh.trust_host_key(self.known_hosts, alias, public_key)

    def forget_host(self, alias: str) -> None:
        # ssh-keygen -R rewrites the file: serialise against concurrent starts and deletes.
        with self._known_hosts_lock:
            ssh.remove_known_host(self.known_hosts, alias)
