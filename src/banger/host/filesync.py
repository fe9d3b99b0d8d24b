"""`[[file_sync]]` entries and the host's git identity, copied into a running guest.

Read on the host, sent as one tar stream over one SSH session (extracted at / so the
entries land at their /root paths, owned by root), then the identity is set with
`git config --global` in the guest. A missing host file is a warning; anything else
(unreadable file, a directory) aborts with the path named.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from banger.host import guestsh, ssh
from banger.host.runner import run
from banger.model.config import FileSync


class FileSyncError(Exception):
    pass


def host_git_identity() -> dict[str, str]:
    """user.name and user.email from the host user's global git config, where set."""
    out = {}
    for key in ("user.name", "user.email"):
        res = run(["git", "config", "--global", "--get", key], check=False, timeout=10)
        if res.returncode == 0 and res.stdout.strip():
            out[key] = res.stdout.strip()
    return out


def sync(*, port: int, key: Path, known_hosts: Path, alias: str,
         entries: Sequence[FileSync], identity: dict[str, str], tmp_dir: Path,
         host: str = "127.0.0.1") -> list[str]:
    """Copy ``entries`` and set ``identity`` in the guest; return warnings. The copies are
    staged in ``tmp_dir`` (the daemon's scratch directory, swept at its start)."""
    warnings: list[str] = []
    base = ssh.ssh_base_argv(port=port, key=key, known_hosts=known_hosts, alias=alias,
                             host=host)
    with tempfile.TemporaryDirectory(prefix="filesync-", dir=tmp_dir) as tmp:
        staged: list[str] = []
        for e in entries:
            if not e.host.exists():
                warnings.append(f"file_sync: {e.host} does not exist on the host: skipped")
                continue
            if not e.host.is_file():
                raise FileSyncError(f"file_sync: {e.host} is not a regular file")
            rel = e.guest.lstrip("/")
            dest = Path(tmp) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(e.host, dest)
            except OSError as exc:
                raise FileSyncError(f"file_sync: cannot read {e.host}: {exc}") from exc
            dest.chmod(e.mode if e.mode is not None else e.host.stat().st_mode & 0o7777)
            staged.append(rel)
        if staged:
            ssh.push_files(argv=base, root=Path(tmp), members=staged)
    if identity:
        pairs = [word for pair in sorted(identity.items()) for word in pair]
        res = run([*base, guestsh.command("git-identity", *pairs)], check=False, timeout=60,
                  max_output=ssh.CHATTER_CAP)
        if res.returncode != 0:
            raise FileSyncError(f"setting the git identity in the guest failed: "
                                f"{res.stderr.strip()}")
    return warnings
