"""The guest port on this host: banger reaches a running guest over ssh
(banger.host.ssh) with its managed key and per-VM pinned host keys."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from banger.host import filesync, guestports, ssh
from banger.host.runner import CommandError, run
from banger.host.scratch import Scratch
from banger.model.config import FileSync
from banger.model.errors import OperationFailed
from banger.model.layout import Layout
from banger.ports import Endpoint, ListeningSocket


class SshGuest:
    def __init__(self, layout: Layout) -> None:
        self._scratch = Scratch(layout.state_dir)
        self.key = layout.ssh_key
        self.known_hosts = layout.known_hosts
        self._known_hosts_lock = threading.Lock()

    def _argv(self, addr: Endpoint, alias: str) -> list[str]:
        return ssh.ssh_base_argv(port=addr.port, host=addr.host, key=self.key,
                                 known_hosts=self.known_hosts, alias=alias)

    def ensure_key(self) -> str:
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return ssh.ensure_key(self.key)

    def wait_ready(self, *, addr: Endpoint, alias: str, timeout: float, serial_log: Path,
                   alive: Callable[[], bool]) -> float:
        return ssh.wait_ready(port=addr.port, host=addr.host, key=self.key,
                              known_hosts=self.known_hosts, alias=alias, timeout=timeout,
                              serial_log=serial_log, alive=alive)

    def poweroff(self, *, addr: Endpoint, alias: str, timeout: float) -> None:
        # The connection dies with the guest: a non-zero exit here is expected.
        run([*self._argv(addr, alias), "/usr/local/sbin/banger-poweroff"], check=False,
            timeout=timeout, max_output=ssh.CHATTER_CAP)

    def git_identity(self) -> dict[str, str]:
        return filesync.host_git_identity()

    def sync_files(self, *, addr: Endpoint, alias: str, entries: Sequence[FileSync],
                   identity: Mapping[str, str] | None) -> list[str]:
        try:
            return filesync.sync(port=addr.port, host=addr.host, key=self.key,
                                 known_hosts=self.known_hosts, alias=alias, entries=entries,
                                 identity=dict(identity or {}),
                                 tmp_dir=self._scratch.disk())
        except filesync.FileSyncError as exc:
            raise OperationFailed(str(exc)) from exc

    def push_tree(self, *, addr: Endpoint, alias: str, tree: Path, guest_path: str) -> None:
        try:
            ssh.push_tree(port=addr.port, host=addr.host, key=self.key,
                          known_hosts=self.known_hosts, alias=alias, tree=tree,
                          guest_path=guest_path)
        except ssh.SshError as exc:
            raise OperationFailed(str(exc)) from exc

    def start_bootstrap(self, *, addr: Endpoint, alias: str, workdir: str,
                        installer_url: str) -> str:
        try:
            return ssh.start_bootstrap(self._argv(addr, alias), workdir=workdir,
                                       installer_url=installer_url)
        except ssh.SshError as exc:
            raise OperationFailed(str(exc)) from exc

    def listening(self, *, addr: Endpoint, alias: str) -> list[ListeningSocket]:
        try:
            out = run([*self._argv(addr, alias), guestports.SS_COMMAND], timeout=30,
                      max_output=guestports.SS_OUTPUT_CAP)
        except CommandError as exc:
            raise OperationFailed(f"could not list the guest's sockets: {exc}") from exc
        try:
            found = guestports.parse_ss(out.stdout)
        except guestports.SsParseError as exc:
            raise OperationFailed(f"could not read the guest's `ss` output: {exc}") from exc
        return [ListeningSocket(s.proto, s.address, s.port, s.process) for s in found]

    def new_host_key(self) -> tuple[bytes, str]:
        return ssh.host_keypair(self._scratch.disk())

    def trust_host(self, alias: str, public_key: str) -> None:
        with self._known_hosts_lock:
            ssh.trust_host_key(self.known_hosts, alias, public_key)

    def forget_host(self, alias: str) -> None:
        # ssh-keygen -R rewrites the file: serialise against concurrent starts and deletes.
        with self._known_hosts_lock:
            ssh.remove_known_host(self.known_hosts, alias)
