"""banger's TOML configuration (every key optional), parsed and validated.

    [[file_sync]]                 # copied into every VM at every start
    host = "~/.npmrc"             # on the host (~ is the user's home)
    guest = "~/.npmrc"            # under /root in the guest (~/ or /root/), not one of
                                  # banger's own (~/.ssh/authorized_keys, ~/.banger/ ...)
    mode = "0600"                 # optional; default: the host file's mode

    [bootstrap]                   # the repo's tools (.mise.toml / .tool-versions)
    installer_url = "https://mise.run"   # fetched by the guest (needs --nat)

    [network]
    mode = "user"                 # default for new VMs: "user" (rootless) or "tap" (root)
    bridge = "banger0"            # tap mode: the bridge banger creates and owns
    subnet = "172.30.0.0/24"      # tap mode: guest addresses; the bridge gets the first
    dns_port = 5354               # the daemon's DNS for <name>.vm on 127.0.0.1 (0: off)

    [logs]
    serial_max_mib = 8            # a VM's serial.log is rotated to serial.log.1 past this

    [daemon]
    allow_root = false            # let root use your daemon's socket too (read at start)
    max_concurrent_boots = 4      # starts beyond this wait in line (default: CPUs, >= 2)
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from banger.model.vm import NetworkMode


class ConfigError(ValueError):
    """The config file is invalid; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class FileSync:
    host: Path
    guest: str  # absolute, under /root
    mode: int | None = None


DEFAULT_INSTALLER_URL = "https://mise.run"
DEFAULT_SERIAL_MAX_MIB = 8


@dataclass(frozen=True)
class NetworkConfig:
    mode: str = "user"
    bridge: str = "banger0"
    subnet: ipaddress.IPv4Network = field(
        default_factory=lambda: ipaddress.IPv4Network("172.30.0.0/24"))
    dns_port: int = 5354


@dataclass(frozen=True)
class Config:
    file_sync: tuple[FileSync, ...] = field(default_factory=tuple)
    installer_url: str = DEFAULT_INSTALLER_URL
    network: NetworkConfig = field(default_factory=NetworkConfig)
    serial_max_mib: int = DEFAULT_SERIAL_MAX_MIB
    allow_root: bool = False  # [daemon] allow_root: root may connect to this user's daemon
    max_concurrent_boots: int | None = None  # None: the daemon's default (CPUs, >= 2)


def load_config(path: Path, home: Path) -> Config:
    """The config at ``path``; an absent file is the empty config."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    unknown = set(data) - {"file_sync", "bootstrap", "network", "logs", "daemon"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (known: file_sync, "
                          "bootstrap, network, logs, daemon)")
    return Config(file_sync=_file_sync(data, path, home),
                  installer_url=_bootstrap(data, path),
                  network=_network(data, path),
                  serial_max_mib=_serial_max(data, path),
                  allow_root=_allow_root(data, path),
                  max_concurrent_boots=_max_boots(data, path))


DAEMON_KEYS = {"allow_root", "max_concurrent_boots"}


def _max_boots(data: dict[str, Any], path: Path) -> int | None:
    table = _table(data, "daemon", path, DAEMON_KEYS)
    n = table.get("max_concurrent_boots")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 256):
        raise ConfigError(f"{path}: [daemon] max_concurrent_boots must be a number from 1 "
                          f"to 256, not {n!r}")
    return n


def _table(data: dict[str, Any], key: str, path: Path, known: set[str]) -> dict[str, Any]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {key} must be a table ([{key}])")
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{path}: [{key}] has unknown keys {sorted(unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    return table


def _bootstrap(data: dict[str, Any], path: Path) -> str:
    table = _table(data, "bootstrap", path, {"installer_url"})
    url = table.get("installer_url", DEFAULT_INSTALLER_URL)
    if not isinstance(url, str) or not re.fullmatch(r"https?://\S+", url):
        raise ConfigError(f"{path}: [bootstrap] installer_url must be an http(s) URL, "
                          f"not {url!r}")
    return url


def _serial_max(data: dict[str, Any], path: Path) -> int:
    table = _table(data, "logs", path, {"serial_max_mib"})
    mib = table.get("serial_max_mib", DEFAULT_SERIAL_MAX_MIB)
    if not isinstance(mib, int) or isinstance(mib, bool) or not 1 <= mib <= 4096:
        raise ConfigError(f"{path}: [logs] serial_max_mib must be a whole number of MiB "
                          f"from 1 to 4096, not {mib!r}")
    return mib


def _allow_root(data: dict[str, Any], path: Path) -> bool:
    value = _table(data, "daemon", path, DAEMON_KEYS).get("allow_root", False)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}: [daemon] allow_root must be true or false, not {value!r}")
    return value


_BRIDGE_NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_-]{0,14}")


def _network(data: dict[str, Any], path: Path) -> NetworkConfig:
    table = _table(data, "network", path, {"mode", "bridge", "subnet", "dns_port"})
    default = NetworkConfig()
    mode = table.get("mode", default.mode)
    if mode not in tuple(NetworkMode):
        raise ConfigError(f"{path}: [network] mode must be \"user\" or \"tap\", not {mode!r}")
    bridge = table.get("bridge", default.bridge)
    if not isinstance(bridge, str) or not _BRIDGE_NAME.fullmatch(bridge):
        raise ConfigError(f"{path}: [network] bridge {bridge!r} is not a valid interface "
                          "name (a letter, then up to 14 letters, digits, - or _)")
    raw_subnet = table.get("subnet", str(default.subnet))
    try:
        subnet = ipaddress.IPv4Network(raw_subnet) if isinstance(raw_subnet, str) else None
    except ValueError:
        subnet = None
    if subnet is None or not 16 <= subnet.prefixlen <= 29:
        raise ConfigError(f"{path}: [network] subnet {raw_subnet!r} must be an IPv4 network "
                          "like \"172.30.0.0/24\" (prefix /16 to /29)")
    port = table.get("dns_port", default.dns_port)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigError(f"{path}: [network] dns_port must be a port number (0 turns the "
                          f"host-side DNS off), not {port!r}")
    return NetworkConfig(mode=mode, bridge=bridge, subnet=subnet, dns_port=port)


def _file_sync(data: dict[str, Any], path: Path, home: Path) -> tuple[FileSync, ...]:
    entries = data.get("file_sync", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: file_sync must be an array of tables ([[file_sync]])")
    out = []
    for i, entry in enumerate(entries, 1):
        where = f"{path}: file_sync entry {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("host"), str) or not \
                isinstance(entry.get("guest"), str):
            raise ConfigError(f"{where}: needs string keys host and guest")
        unknown = set(entry) - {"host", "guest", "mode"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        out.append(FileSync(host=_host_path(entry["host"], home),
                            guest=_guest_path(entry["guest"], where),
                            mode=_mode(entry.get("mode"), where)))
    return tuple(out)


def _host_path(value: str, home: Path) -> Path:
    return home / value[2:] if value.startswith("~/") else Path(value)


# What banger itself puts under /root in a guest (see core/startplan.py's work disk and
# banger-init): a file_sync entry there would lock banger out or undo its work.
# (path, True when everything under it is banger's too, why).
BANGER_GUEST_PATHS: tuple[tuple[str, bool, str], ...] = (
    ("/root/.ssh/authorized_keys", False,
     "it holds banger's key for the guest's sshd: replacing it locks banger out of the VM"),
    ("/root/.ssh/rc", False,
     "sshd runs it before every command banger sends: it could hang or break them all"),
    ("/root/.banger", True,
     "banger keeps the guest's hostname, ssh host key and tool bootstrap there"),
    ("/root/repo", True,  # core.startplan.WORKSPACE_GUEST_PATH
     "banger copies the workspace (`vm run ./repo`) there; a synced file would end up in "
     "the repo and in `vm workspace export`"),
)


def _guest_path(value: str, where: str) -> str:
    path = "/root/" + value[2:] if value.startswith("~/") else value
    # Spelled any way (~/.ssh/../.ssh/x, //root/x, x/, x/.), the same file in the guest.
    norm = "/" + posixpath.normpath(path).lstrip("/") if path.startswith("/") else path
    p = PurePosixPath(norm)
    if not p.is_absolute() or p.parts[:2] != ("/", "root") or len(p.parts) < 3:
        raise ConfigError(f"{where}: guest path {value!r} must be a file under ~/ or /root/")
    for own, tree, why in BANGER_GUEST_PATHS:
        mine = PurePosixPath(own)
        if p == mine or (tree and mine in p.parents) or p in mine.parents:
            what = f"{own}/..." if tree else own
            raise ConfigError(f"{where}: guest path {value!r} ({norm}) is banger's own "
                              f"{what}: {why}; sync the file elsewhere under ~/")
    return norm


def _mode(value: object, where: str) -> int | None:
    if value is None:
        return None
    try:
        mode = int(value, 8) if isinstance(value, str) else -1
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise ConfigError(f"{where}: mode {value!r} must be an octal string like \"0600\"")
    return mode
