"""banger's ssh_config: ``ssh box.vm`` from any terminal, with banger's key and pinned keys.

Owns two files. banger's own config (:func:`render`, :func:`write`), rewritten whole by
the daemon whenever VMs change, with a ``Host <name>.vm`` block per VM. And one
marker-fenced ``Include`` block at the top of the user's ``~/.ssh/config``
(:func:`install`, :func:`uninstall`), the only bytes banger ever adds to that file: the
rest is kept byte for byte, as is the file's mode and owner. Run as root in someone's
home, it writes only into files and directories of that home's owner, never through a
link that leads elsewhere (:func:`_edit`). The block goes first
because an ``Include`` after a ``Host`` line only applies inside that ``Host`` block, and
because ssh keeps the first value it finds for an option.

Host keys are pinned: each VM's block names its ``HostKeyAlias`` in banger's known_hosts
(the key written there when the VM was created), with ``StrictHostKeyChecking yes``.

The guest is not trusted with anything of the host's: :data:`LOCKDOWN` (no agent, no X11,
no port forwarding, no tunnel, no local command) goes into every block and, as ``-o``
options before any other, into banger's own ssh argv (:mod:`banger.host.ssh`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

BEGIN = "# >>> banger >>>"
END = "# <<< banger <<<"
DEFAULT_ZONE = "vm"
USER = "root"

# ssh options that keep a guest from reaching back into the host, whatever the user's
# ssh_config says (ssh keeps the first value it finds: these come first). Each, and why:
LOCKDOWN: tuple[tuple[str, str], ...] = (
    # The user's agent would sign anything for whoever is root in the guest.
    ("ForwardAgent", "no"),
    # An X11 forward gives the guest the user's display: keystrokes, screenshots.
    ("ForwardX11", "no"),
    ("ForwardX11Trusted", "no"),
    # RemoteForward/DynamicForward would let the guest open connections on the host.
    # This clears LocalForward and -L too: a user who wants a tunnel into a guest says
    # so for that one command, `ssh -o ClearAllForwardings=no -L ... box.vm` (the
    # command line comes before this file).
    ("ClearAllForwardings", "yes"),
    # Never offer the agent even for authentication: banger logs in with its own key, and
    # a daemon started from a shell must not use (or hand on) that shell's SSH_AUTH_SOCK.
    ("IdentityAgent", "none"),
    # tun/tap forwarding puts the guest on a host network interface.
    ("Tunnel", "no"),
    # A LocalCommand (with % tokens the connection fills in) runs on the host.
    ("PermitLocalCommand", "no"),
    # A shared master (a user's ControlMaster auto) could carry a connection to another
    # VM that used the same forwarded port, or outlive this one.
    ("ControlMaster", "no"),
    ("ControlPath", "none"),
    # banger's endpoints are local (a forwarded port or the VM's tap address): a user's
    # ProxyCommand/ProxyJump for Host * would send them elsewhere or run a command.
    ("ProxyCommand", "none"),
    # The pinned host key stays the only one: the guest may not add keys for its alias.
    ("UpdateHostKeys", "no"),
)

# Characters that make ssh_config split or reinterpret an unquoted value.
_NEEDS_QUOTES = re.compile(r"[\s\"'\\#=]")


class SshConfigError(Exception):
    """The user's ssh config cannot be changed safely; the message says where and why."""


@dataclass(frozen=True)
class SshEntry:
    """One VM as ssh reaches it: ``<name>.<zone>`` goes to ``hostname:port`` and its
    host key is looked up as ``alias`` in banger's known_hosts. ``hostname=None`` leaves
    the name to DNS (tap mode with the ``.vm`` resolver in place)."""

    name: str
    hostname: str | None
    port: int
    alias: str


def render(entries: Iterable[SshEntry], key_path: Path, known_hosts_path: Path, *,
           zone: str = DEFAULT_ZONE) -> str:
    """banger's ssh_config text: a ``Host <name>.<zone>`` block per entry, sorted by name,
    then a ``Host *.<zone>`` block with the common options. Same input, same bytes."""
    zone = zone.strip(".").lower()
    common = [
        *LOCKDOWN,
        ("User", USER),
        ("IdentityFile", _path_value(key_path)),
        ("IdentitiesOnly", "yes"),
        ("UserKnownHostsFile", _path_value(known_hosts_path)),
        ("GlobalKnownHostsFile", "/dev/null"),
        ("StrictHostKeyChecking", "yes"),
    ]
    by_name: dict[str, SshEntry] = {}
    for e in entries:
        name = e.name.lower()
        if name in by_name:
            raise ValueError(f"two ssh entries for {name}.{zone}")
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", name):
            raise ValueError(f"invalid VM name for ssh_config: {e.name!r}")
        if not 0 < e.port < 65536:
            raise ValueError(f"invalid ssh port {e.port} for {name}")
        by_name[name] = e
    out = [
        "# Generated by banger: rewritten whenever a VM changes; edits here are lost.",
        "# Included from ~/.ssh/config (see the '# >>> banger >>>' block there).",
        "",
    ]
    for name in sorted(by_name):
        e = by_name[name]
        out.append(f"Host {name}.{zone}")
        if e.hostname is not None:
            out.append(f"    HostName {_value(e.hostname, tokens=True)}")
        out.append(f"    Port {e.port}")
        out.append(f"    HostKeyAlias {_value(e.alias, tokens=False)}")
        out += [f"    {k} {v}" for k, v in common]
        out.append("")
    # Options a VM's own block did not set come from here (ssh keeps the first value).
    out.append(f"Host *.{zone}")
    out += [f"    {k} {v}" for k, v in common]
    return "\n".join(out) + "\n"


def write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (0644), creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _replace_at(fd, path.name, text.encode(), mode=0o644, owner=None)
    finally:
        os.close(fd)


def install(user_ssh_config: Path, include_path: Path) -> bool:
    """Put the ``Include "<include_path>"`` block first in ``user_ssh_config``; True when
    the file changed. Creates ``~/.ssh`` (0700) and the file (0600) when missing. An
    existing block for another path, or not at the top, is replaced. See
    :func:`_edit` for what is refused."""
    block = _block(include_path)

    def change(path: Path, data: bytes | None) -> bytes | None:
        rest = data or b""
        span = _find_block(path, rest)
        if span is not None:
            if span[0] == 0 and rest[span[0]:span[1]] == block:
                return None
            rest = rest[:span[0]] + rest[span[1]:]
        return block + rest

    return _edit(user_ssh_config, change, create=True)


def uninstall(user_ssh_config: Path) -> bool:
    """Remove banger's block (and nothing else); True when the file changed."""
    if not os.path.lexists(user_ssh_config):
        return False

    def change(path: Path, data: bytes | None) -> bytes | None:
        span = _find_block(path, data) if data is not None else None
        if data is None or span is None:
            return None
        return data[:span[0]] + data[span[1]:]

    return _edit(user_ssh_config, change, create=False)


def is_installed(user_ssh_config: Path, include_path: Path | None = None) -> bool:
    """Whether banger's block is at the top of the file (including ``include_path``, when
    given). Raises :class:`SshConfigError` on a broken block."""
    target = _real(user_ssh_config)
    if not target.exists():
        return False
    data = target.read_bytes()
    span = _find_block(target, data)
    if span is None or span[0] != 0:
        return False
    return include_path is None or data[span[0]:span[1]] == _block(include_path)


def _block(include_path: Path) -> bytes:
    if not include_path.is_absolute():
        raise ValueError(f"the ssh_config Include path must be absolute: {include_path}")
    text = str(include_path)
    # Include expands globs (and, in newer OpenSSH, % tokens) with no way to escape them.
    if any(c in text for c in "*?[%"):
        raise SshConfigError(f"cannot Include {text} from ssh_config: the path contains a "
                             "glob or % character; set another banger state directory")
    lines = [
        BEGIN,
        "# Added by banger so that 'ssh <name>.vm' works; banger removes it on request.",
        "# Keep it first: an Include after a Host line would only apply to that Host.",
        f"Include {_value(text, tokens=False, always=True)}",
        END,
    ]
    return ("\n".join(lines) + "\n").encode()


def _find_block(path: Path, data: bytes) -> tuple[int, int] | None:
    """Byte span of the one complete block (through END's line ending), or None."""
    begin = end = None
    offset = 0
    for lineno, line in enumerate(data.splitlines(keepends=True), start=1):
        marker = line.rstrip(b"\r\n").strip()
        if marker == BEGIN.encode():
            if begin is not None:
                raise SshConfigError(f"{path}:{lineno}: a second '{BEGIN}' line; "
                                     f"remove banger's block by hand and retry")
            if end is not None:
                raise SshConfigError(f"{path}:{end[2]}: '{END}' before '{BEGIN}'; "
                                     f"remove banger's block by hand and retry")
            begin = (offset, lineno)
        elif marker == END.encode():
            if begin is None or end is not None:
                raise SshConfigError(f"{path}:{lineno}: '{END}' without a matching "
                                     f"'{BEGIN}'; remove banger's block by hand and retry")
            end = (offset, offset + len(line), lineno)
        offset += len(line)
    if begin is None:
        return None
    if end is None:
        raise SshConfigError(f"{path}:{begin[1]}: '{BEGIN}' without a closing '{END}'; "
                             "remove banger's block by hand and retry")
    return begin[0], end[1]


def _real(path: Path) -> Path:
    # A dotfile manager's symlink must stay a symlink: write through it to its target.
    return path.resolve() if path.is_symlink() else path


# -- editing a file in someone's home, possibly as root --------------------------------------

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _edit(user_ssh_config: Path, change: Callable[[Path, bytes | None], bytes | None], *,
          create: bool) -> bool:
    """Replace the file ``user_ssh_config`` names (its target when it is a symlink) with
    ``change(path, old bytes or None)`` unless that returns None; True when it did.

    The file belongs to the owner of the home it is in (``~/.ssh/config``'s grandparent):
    the caller, or anyone when the caller is root (root setting up a user's ssh). As root
    banger must not be led by that user (or a third) to write elsewhere, so it refuses,
    naming the path and its owner, when: the home's owner is not the caller (and the
    caller is not root); a directory on the way to the file is owned by anyone but that
    owner or root; the directory the file is in, or the file itself, is not that owner's.
    A symlinked ~/.ssh/config (dotfile managers) works when its target passes the same
    checks. Every step goes through directory file descriptors opened without following
    symlinks, so a path swapped between the checks and the write is refused, not
    followed; the write is a new file in the same directory renamed over the old one.
    """
    path = Path(os.path.abspath(user_ssh_config))
    home = path.parent.parent
    owner = _existing_owner(home)
    me = os.geteuid()
    if me not in (0, owner[0]):
        raise SshConfigError(f"refusing to edit {path}: the home {home} belongs to "
                             f"{_who(owner[0])}, not to you ({_who(me)})")
    trusted = {0, owner[0]}
    try:
        fd = _walk(path.parent, trusted, owner if create else None)
    except FileNotFoundError:
        if create:
            raise
        return False  # nothing there to remove a block from
    try:
        name = path.name
        if _is_link(fd, name):
            # Resolved once, then walked again without following: a link swapped in
            # meanwhile ends the walk with an error instead of being followed.
            target = Path(os.path.realpath(path))
            os.close(fd)
            fd = -1
            try:
                fd = _walk(target.parent, trusted, owner if create else None)
            except FileNotFoundError:
                if create:
                    raise
                return False  # a dangling link: no block to remove
            name = target.name
            path = target
        dst = os.fstat(fd)
        if dst.st_uid != owner[0]:
            raise SshConfigError(f"refusing to edit {path}: its directory belongs to "
                                 f"{_who(dst.st_uid)}, not to {_who(owner[0])} whose home "
                                 f"{home} it is for")
        data, st = _read(fd, name, path)
        if st is not None and st.st_uid != owner[0]:
            raise SshConfigError(f"refusing to edit {path}: it belongs to {_who(st.st_uid)}, "
                                 f"not to {_who(owner[0])} whose home {home} it is in; "
                                 f"fix its owner (chown) and retry")
        if data is None and not create:
            return False
        new = change(path, data)
        if new is None:
            return False
        if st is None:
            mode, keep = 0o600, (owner[0], dst.st_gid)
        else:
            mode, keep = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
        _replace_at(fd, name, new, mode=mode, owner=keep)
        return True
    finally:
        if fd >= 0:
            os.close(fd)


def _existing_owner(path: Path) -> tuple[int, int]:
    """(uid, gid) of ``path``, or of its nearest existing parent (a home not made yet)."""
    while True:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if path.parent == path:
                raise
            path = path.parent
            continue
        return st.st_uid, st.st_gid


def _who(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _walk(directory: Path, trusted: set[int], create: tuple[int, int] | None) -> int:
    """An fd of ``directory``, reached from / one component at a time without following
    a symlink, each owned by a uid in ``trusted``. Missing ones are made (0700, owned by
    ``create``) when ``create`` is given."""
    real = Path(os.path.realpath(directory))
    fd = os.open("/", _DIR)
    try:
        walked = Path("/")
        for part in real.parts[1:]:
            walked = walked / part
            try:
                nfd = os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if create is None:
                    raise
                # mkdir's mode passes through the umask, and ssh insists on a private
                # ~/.ssh; root making a user's ~/.ssh makes it that user's.
                os.mkdir(part, 0o700, dir_fd=fd)
                nfd = os.open(part, _DIR, dir_fd=fd)
                os.fchmod(nfd, 0o700)
                if os.geteuid() == 0:
                    os.fchown(nfd, *create)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise SshConfigError(f"refusing to edit under {directory}: {walked} "
                                         f"changed into a symlink or file while banger "
                                         f"looked at it; check it and retry") from exc
                raise
            os.close(fd)
            fd = nfd
            uid = os.fstat(fd).st_uid
            if uid not in trusted:
                raise SshConfigError(f"refusing to edit under {directory}: {walked} belongs "
                                     f"to {_who(uid)}, who could redirect the write; only "
                                     f"{' or '.join(_who(u) for u in sorted(trusted))} "
                                     f"may own it")
        return fd
    except BaseException:
        os.close(fd)
        raise


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except FileNotFoundError:
        return False


def _read(dir_fd: int, name: str, path: Path) -> tuple[bytes | None, os.stat_result | None]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SshConfigError(f"refusing to edit {path}: it changed into a symlink while "
                                 f"banger looked at it; check it and retry") from exc
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SshConfigError(f"refusing to edit {path}: it is not a regular file")
        return f.read(), st


def _replace_at(dir_fd: int, name: str, data: bytes, *, mode: int,
                owner: tuple[int, int] | None) -> None:
    """Atomically replace ``name`` in ``dir_fd`` (a new file renamed over it), fsynced."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if owner is not None and os.geteuid() == 0:
                # root editing a user's file (sudo): the file stays the user's.
                os.fchown(f.fileno(), *owner)
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    os.fsync(dir_fd)


def _path_value(path: Path) -> str:
    return _value(str(path), tokens=True)


def _value(text: str, *, tokens: bool, always: bool = False) -> str:
    """``text`` as one ssh_config argument: quoted when it needs to be, with ``"`` and
    ``\\`` escaped, and ``%`` doubled where ssh expands % tokens."""
    if any(c in text for c in "\n\r\0") or "${" in text:
        raise SshConfigError(f"cannot write {text!r} into an ssh_config: it contains a "
                             "line break, NUL or '${' that ssh would reinterpret")
    if tokens:
        text = text.replace("%", "%%")
    if not text or always or _NEEDS_QUOTES.search(text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text
