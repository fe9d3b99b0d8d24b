"""banger's TOML configuration (every key optional), parsed and validated.

    [[file_sync]]                 # copied into every VM at every start
    host = "~/.npmrc"             # on the host (~ is the user's home)
    guest = "~/.npmrc"            # under /root in the guest (~/ or /root/)
    mode = "0600"                 # optional; default: the host file's mode
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath


class ConfigError(ValueError):
    """The config file is invalid; the message names the file, the key and the fix."""


@dataclass(frozen=True)
class FileSync:
    host: Path
    guest: str  # absolute, under /root
    mode: int | None = None


@dataclass(frozen=True)
class Config:
    file_sync: tuple[FileSync, ...] = field(default_factory=tuple)


def load_config(path: Path, home: Path) -> Config:
    """The config at ``path``; an absent file is the empty config."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
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
    return Config(file_sync=tuple(out))


def _host_path(value: str, home: Path) -> Path:
    return home / value[2:] if value.startswith("~/") else Path(value)


def _guest_path(value: str, where: str) -> str:
    path = "/root/" + value[2:] if value.startswith("~/") else value
    p = PurePosixPath(path)
    if not p.is_absolute() or ".." in p.parts or p.parts[:2] != ("/", "root") or \
            len(p.parts) < 3:
        raise ConfigError(f"{where}: guest path {value!r} must be a file under ~/ or /root/")
    return str(p)


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
