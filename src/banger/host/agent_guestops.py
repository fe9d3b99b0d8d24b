"""What banger itself does in a running guest, through its agent (no sshd involved): the
workspace push, ``[[file_sync]]`` and the git identity, the tool bootstrap's launch, the
listening sockets and the power-off.

Each function takes the VM's kept :class:`~banger.host.agent_client.AgentConnection`
(QEMU's channel serves one client: there is never a second connection). Files go as tar
streams (FILE_PUT); the few guest commands are argv execs of the guest's own tools
(``mv``, ``rm``, ``git``, ``setsid``), never a string for a shell to parse, except the
bootstrap's launch, a fixed program whose arguments arrive as "$1", "$2"...
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath

from banger.host import guestsh
from banger.host.agent_client import AgentConnection
from banger.host.agent_records import AgentError, AgentRequestError, safe_text
from banger.local.tarwrite import TarItem, tar_stream, walk
from banger.model.config import FileSync
from banger.model.errors import OperationFailed
from banger.ports import ListeningSocket

# What a guest command of banger's own gets: root's, with the image's tools on PATH.
ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "LANG": "C.UTF-8", "USER": "root", "LOGNAME": "root",
}
# Output banger only reads for an error message: the guest chooses what comes back.
CHATTER_CAP = 64 << 10
COMMAND_TIMEOUT = 60.0
# Each wait of a transfer (credit, DONE): a guest that takes nothing for this long is stuck.
TRANSFER_WAIT = 120.0
BOOTSTRAP_DIR = "/root/.banger"
BOOTSTRAP_LOG = f"{BOOTSTRAP_DIR}/bootstrap.log"


def run(conn: AgentConnection, argv: Sequence[str], *,
        timeout: float = COMMAND_TIMEOUT) -> tuple[int, str]:
    """Run ``argv`` in the guest; (its status, its stderr made printable). A command the
    guest cannot start raises AgentRequestError."""
    ex = conn.exec(argv, ENV, "/", timeout=timeout, max_output=CHATTER_CAP)
    try:
        status, _, err = ex.collect(timeout)
    except BaseException:
        # A guest command that hangs (a `mv` or `git` the guest made never end) would
        # run on and hold its chan: it goes with the timeout.
        with contextlib.suppress(AgentError, OSError):
            ex.kill()
        raise
    return status.returncode, safe_text(err.decode(errors="replace").strip(), 2000)


def _tar(items: Iterable[TarItem]) -> Iterator[bytes]:
    """What the guest's /root gets: owned by root, hard links kept."""
    return tar_stream(items, root_owned=True, hard_links=True)


def _checked(conn: AgentConnection, argv: Sequence[str], what: str) -> None:
    code, err = run(conn, argv)
    if code != 0:
        raise OperationFailed(f"{what} in the guest failed (`{' '.join(argv)}`, status "
                              f"{code}): {err or 'no message'}")


def push_tree(conn: AgentConnection, tree: Path, guest_path: str) -> None:
    """Replace ``guest_path`` with the contents of ``tree``. They are extracted in a
    sibling directory first and swapped in by two renames, so a push that fails at any
    point leaves the old tree in place."""
    target = PurePosixPath(guest_path)
    tag = secrets.token_hex(4)
    new = str(target.with_name(f".{target.name}.banger-new-{tag}"))
    old = str(target.with_name(f".{target.name}.banger-old-{tag}"))
    try:
        conn.put_tar(new, _tar(walk(tree)), TRANSFER_WAIT)
    except BaseException as exc:
        with contextlib.suppress(AgentError, OperationFailed):
            run(conn, ["rm", "-rf", "--", new])
        if isinstance(exc, OSError):
            raise OperationFailed(f"could not read {tree} to copy it: {exc}") from exc
        raise
    # Moved aside, not removed, until the new tree is in place. A guest_path that does not
    # exist fails this mv, and the next one then succeeds; one that exists and could not
    # be moved makes the next one fail (mv -T never moves into a directory).
    # Either mv may also fail to end (killed at its timeout): the old tree is then put
    # back too, so that no failure leaves guest_path empty.
    moved_code, moved_err = -1, ""
    try:
        moved_code, moved_err = run(conn, ["mv", "-T", "--", guest_path, old])
        code, err = run(conn, ["mv", "-T", "--", new, guest_path])
    except BaseException:
        _put_back(conn, guest_path, old, new, moved_code == 0)
        raise
    if code != 0:
        _put_back(conn, guest_path, old, new, moved_code == 0)
        raise OperationFailed(f"could not put {tree} in place at {guest_path} in the "
                              f"guest: {err or moved_err or f'mv status {code}'}")
    if moved_code == 0:
        with contextlib.suppress(AgentError, OperationFailed):
            run(conn, ["rm", "-rf", "--", old])


def _put_back(conn: AgentConnection, guest_path: str, old: str, new: str,
              moved: bool) -> None:
    """After a failed swap: the old tree back at ``guest_path`` (when it was moved
    aside), the new one removed; best effort."""
    with contextlib.suppress(AgentError, OperationFailed):
        if moved:
            run(conn, ["mv", "-T", "--", old, guest_path])
        run(conn, ["rm", "-rf", "--", new])


def sync_files(conn: AgentConnection, entries: Sequence[FileSync],
               identity: Mapping[str, str]) -> list[str]:
    """Copy ``entries`` (with their modes, owned by root) and set ``identity`` with
    ``git config --global``; return warnings (a missing host file, no git in the
    guest); raise OperationFailed on anything else, naming the path."""
    warnings: list[str] = []
    items: list[TarItem] = []
    for e in entries:
        if not e.host.exists():
            warnings.append(f"file_sync: {e.host} does not exist on the host: skipped")
            continue
        if not e.host.is_file():
            raise OperationFailed(f"file_sync: {e.host} is not a regular file")
        try:
            mode = e.mode if e.mode is not None else e.host.stat().st_mode & 0o7777
            with e.host.open("rb"):
                pass  # unreadable: said here, naming the file, not half way into the tar
        except OSError as exc:
            raise OperationFailed(f"file_sync: cannot read {e.host}: {exc}") from exc
        items.append(TarItem(e.host, e.guest.lstrip("/"), mode))
    if items:
        try:
            conn.put_tar("/", _tar(items), TRANSFER_WAIT)
        except (AgentError, OSError) as exc:
            raise OperationFailed(f"file_sync: copying into the guest failed: {exc}") from exc
    for key, value in sorted(identity.items()):
        try:
            _checked(conn, ["git", "config", "--global", key, value],
                     "setting the git identity")
        except AgentRequestError as exc:
            warnings.append(f"git identity not set: the guest has no git ({exc})")
            break
    return warnings


def start_bootstrap(conn: AgentConnection, workdir: str, installer_url: str) -> str:
    """Install banger-bootstrap in the guest and start it detached (its own session, its
    output in its log, so it outlives this exec and the agent's session); return the
    guest path of its log."""
    script = resources.files("banger.host") / "guest" / "banger-bootstrap"
    with resources.as_file(script) as path:
        conn.put_tar(BOOTSTRAP_DIR, _tar([TarItem(path, "banger-bootstrap", 0o755)]),
                     TRANSFER_WAIT)
    _checked(conn, guestsh.argv("start-bootstrap", installer_url, workdir, BOOTSTRAP_LOG),
             "starting the tool bootstrap")
    return BOOTSTRAP_LOG


def listening(conn: AgentConnection, timeout: float) -> list[ListeningSocket]:
    """The guest's listening TCP and bound UDP sockets, each once, sorted."""
    return [ListeningSocket(s.proto, s.address, s.port, s.process)
            for s in conn.listening(timeout)]
