"""Where banger keeps things: per-user XDG directories and the files of a VM's directory.

The VM directory is the model of a VM on disk (every file name is a named constant in
:class:`~banger.model.vm.ResourceNames`); sockets go in a short runtime directory because a
Unix socket path is limited to 108 bytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from banger.model.vm import ResourceNames

UNIX_PATH_MAX = 108
# The environment variables Layout.for_user reads that name directories.
PATH_ENV = ("HOME", "BANGER_HOME", "BANGER_RUNTIME_DIR", "BANGER_IMAGES_DIR", "XDG_STATE_HOME",
            "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR")

# bangerd's exit status when another bangerd already holds the state directory's lock: the
# CLI that autostarted it keeps waiting for that other daemon instead of failing.
EXIT_ALREADY_RUNNING = 75  # EX_TEMPFAIL


@dataclass(frozen=True)
class Layout:
    state_dir: Path    # SQLite, VM directories, ssh key
    cache_dir: Path    # built images
    config_dir: Path   # config.toml
    runtime_dir: Path  # daemon socket, VMM control sockets

    @classmethod
    def for_user(cls, env: dict[str, str] | None = None) -> Layout:
        env = dict(os.environ) if env is None else env
        images = Path(env["BANGER_IMAGES_DIR"]) if env.get("BANGER_IMAGES_DIR") else None
        home = Path(env.get("HOME", "/root"))
        root = env.get("BANGER_HOME")
        if root:
            base = Path(root)
            run_dir = Path(env.get("BANGER_RUNTIME_DIR") or base / "run")
            return cls(base / "state", base / "cache", base / "config", run_dir, images)
        state = Path(env.get("XDG_STATE_HOME") or home / ".local/state") / "banger"
        cache = Path(env.get("XDG_CACHE_HOME") or home / ".cache") / "banger"
        config = Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "banger"
        xdg_run = env.get("XDG_RUNTIME_DIR")
        run_dir = Path(xdg_run) / "banger" if xdg_run else Path(f"/tmp/banger-{os.getuid()}")
        return cls(state, cache, config, run_dir, images)

    @property
    def db(self) -> Path:
        return self.state_dir / "banger.db"

    @property
    def daemon_socket(self) -> Path:
        return self.runtime_dir / "bangerd.sock"

    @property
    def daemon_lock(self) -> Path:
        """flock'd by the one bangerd of this state directory for its whole life."""
        return self.state_dir / "bangerd.lock"

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def daemon_log(self) -> Path:
        return self.state_dir / "bangerd.log"

    @property
    def ssh_key(self) -> Path:
        return self.state_dir / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / "ssh" / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        """banger's own ssh_config (``Host <name>.vm`` blocks), rewritten by the daemon and
        Included from the user's ~/.ssh/config by ``banger ssh-config --install``."""
        return self.state_dir / "ssh" / "config"

    images_override: Path | None = None  # BANGER_IMAGES_DIR: share built images (tests, CI)

    @property
    def images_dir(self) -> Path:
        return self.images_override or self.cache_dir / "images"

    @property
    def vms_dir(self) -> Path:
        """One directory per VM, named by its id."""
        return self.state_dir / "vms"

    def vm(self, vm_id: str) -> VMPaths:
        return VMPaths(self.vms_dir / vm_id, self.runtime_dir / "vms" / vm_id,
                       ResourceNames(vm_id))


@dataclass(frozen=True)
class VMPaths:
    dir: Path
    sock_dir: Path
    names: ResourceNames

    @property
    def root_disk(self) -> Path:
        return self.dir / self.names.root_disk

    @property
    def work_disk(self) -> Path:
        return self.dir / self.names.work_disk

    @property
    def serial_log(self) -> Path:
        return self.dir / self.names.serial_log

    @property
    def serial_log_rotated(self) -> Path:
        return self.dir / self.names.serial_log_rotated

    @property
    def vmm_log(self) -> Path:
        return self.dir / self.names.vmm_log

    @property
    def handles(self) -> Path:
        return self.dir / self.names.handles

    @property
    def pending_workspace(self) -> Path:
        """A workspace staged for a stopped VM, pushed in at its next start."""
        return self.dir / "workspace-pending"

    @property
    def control_socket(self) -> Path:
        """The VMM's control socket (QMP for QEMU)."""
        return self.sock_dir / self.names.control_socket

    @property
    def agent_socket(self) -> Path:
        """The host end of the guest agent's channel, served by the VMM."""
        return self.sock_dir / self.names.agent_socket
