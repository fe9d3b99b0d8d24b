"""Which files of a host git repo go into a VM, and the git checkout they become there.

Owns the host side of workspace mode: :func:`select` reads the repo (git-tracked files by
default, untracked non-ignored ones on request) and refuses what cannot be copied exactly;
:func:`stage` turns a selection into a directory that is a real git checkout (history,
index, HEAD, branch, identity) ready to be written onto the work disk as /root/repo.

Files are read through directory file descriptors opened with ``O_NOFOLLOW``: a symlink
in the repo is recorded as a link and never followed, and neither is a directory that was
swapped for a symlink after :func:`select` looked at it (bangerd may run as root; the repo
belongs to a user). Every git call goes through :func:`banger.host.runner.run`; the copy
itself is in-process, so its cost scales with bytes, not with a process per file.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from banger.host.runner import CommandError, run

# ext4 holds a name of at most 255 bytes; Linux path calls take at most 4095.
NAME_MAX = 255
PATH_MAX = 4095
_GITLINK = "160000"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 30
# Staging on tmpfs makes the intermediate checkout nearly free (no journaled creates) as
# long as it is small against memory; beyond this share of MemAvailable, stage on disk.
TMPFS = Path("/dev/shm")
TMPFS_SHARE = 4


class WorkspaceError(Exception):
    """The repo cannot be selected or staged; the message names the path and the fix."""


@dataclass(frozen=True)
class WorkspaceFile:
    path: str  # repo-relative POSIX path
    kind: Literal["file", "symlink"]
    size: int
    mode: int  # permission bits
    link_target: str | None
    tracked: bool = True


@dataclass(frozen=True)
class Selection:
    repo: Path  # the work tree's top level
    files: tuple[WorkspaceFile, ...]
    total_bytes: int
    head: str | None  # None in a repo without commits
    branch: str | None  # None on a detached HEAD
    user_name: str | None
    user_email: str | None


def select(path: Path, *, include_untracked: bool = False) -> Selection:
    """The files of the git work tree containing ``path`` that a VM would get."""
    top = _toplevel(path)
    tracked = _tracked(top)
    entries = [(p, True) for p in tracked]
    if include_untracked:
        entries += [(p, False) for p in _untracked(top)]
    files: list[WorkspaceFile] = []
    with _Tree(top) as tree:
        for rel, is_tracked in sorted(entries):
            f = tree.inspect(rel, is_tracked)
            if f is not None:
                files.append(f)
    head = _git(top, "rev-parse", "--verify", "-q", "HEAD", check=False) or None
    branch = _git(top, "symbolic-ref", "-q", "--short", "HEAD", check=False) or None
    return Selection(
        repo=top, files=tuple(files), total_bytes=sum(f.size for f in files), head=head,
        branch=branch, user_name=_config(top, "user.name"),
        user_email=_config(top, "user.email"))


# Files that pin a repo's tools; mise reads all of them (asdf's .tool-versions too).
TOOL_FILES = (".mise.toml", "mise.toml", ".tool-versions")


def tool_files(selection: Selection) -> tuple[str, ...]:
    """The tool-pinning files at the top of ``selection`` (what bootstrap installs from)."""
    present = {f.path for f in selection.files if f.kind == "file"}
    return tuple(name for name in TOOL_FILES if name in present)


def dry_run_lines(selection: Selection) -> list[str]:
    """What ``--dry-run`` prints: one line per file, then the total."""
    lines = []
    for f in selection.files:
        note = "" if f.tracked else "  (untracked)"
        if f.kind == "symlink":
            lines.append(f"{'link':>10}  {f.path} -> {f.link_target}{note}")
        else:
            lines.append(f"{f.size:>10}  {f.path}{note}")
    lines.append(f"{len(selection.files)} files, {_human(selection.total_bytes)} "
                 f"({selection.total_bytes} bytes) from {selection.repo}")
    return lines


def stage(selection: Selection, dest: Path, *, branch: str | None = None,
          from_ref: str | None = None) -> None:
    """Make ``dest`` a git checkout of ``selection``: ``git status`` there says what it says
    on the host (minus untracked files that were not selected).

    The objects and refs are copied with a local clone (bytes, not hardlinks: the guest
    cannot reach the host, and the image must not carry the host's inode owners); the
    host's index is copied too, so staged and unstaged changes stay as they were. The
    repo is configured to compare only mtime and size, which survive into the image, so
    the guest's first ``git status`` does not rehash every file.

    ``branch`` creates a guest-only branch at HEAD, keeping the selected work tree (as
    ``git checkout -b``). With ``from_ref`` the work tree is that commit's tree instead
    (on ``branch``, or a detached HEAD), plus the selected untracked files; uncommitted
    changes to tracked files do not come along, as they belong to another base.

    On an error ``dest`` may be left half-made; the caller removes its scratch directory.
    """
    if dest.exists() and any(dest.iterdir()):
        raise WorkspaceError(f"staging directory {dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    dest.chmod(0o755)
    gitdir = dest / ".git"
    try:
        run(["git", "clone", "-q", "--mirror", "--no-hardlinks", "--", str(selection.repo),
             str(gitdir)], timeout=3600)
    except CommandError as exc:
        raise WorkspaceError(f"cannot copy the git history of {selection.repo}: {exc}") from exc
    alternates = gitdir / "objects" / "info" / "alternates"
    if alternates.exists():
        # The clone borrows objects from host paths the guest cannot see: pack them in.
        _git(dest, "repack", "-a", "-d", "-q")
        alternates.unlink()
    _configure(selection, dest)
    target = _resolve(dest, from_ref) if from_ref is not None else selection.head
    if branch is not None:
        _new_branch(dest, branch, target)
    elif from_ref is not None:
        _git(dest, "update-ref", "--no-deref", "HEAD", str(target))
    elif selection.branch is not None:
        _git(dest, "symbolic-ref", "HEAD", f"refs/heads/{selection.branch}")
    elif selection.head is not None:
        _git(dest, "update-ref", "--no-deref", "HEAD", selection.head)
    if from_ref is not None:
        _git(dest, "reset", "-q", "--hard")
        _copy_files(selection, (f for f in selection.files if not f.tracked), dest,
                    exclusive=True)
        record_base(dest)
        return
    _copy_index(selection.repo, gitdir)
    _copy_files(selection, selection.files, dest, exclusive=False)
    # Rewrite the index in the copy: folds a split index into one file and drops
    # extensions tied to the host (untracked cache); racily-clean entries get rechecked.
    _git(dest, "update-index", "-q", "--no-split-index", "--no-untracked-cache")
    for shared in gitdir.glob("sharedindex.*"):
        shared.unlink()
    record_base(dest)


BASE_REF = "refs/banger/base"


def record_base(dest: Path) -> str:
    """Snapshot the staged work tree as commit ``refs/banger/base`` (index untouched).

    ``vm workspace export`` diffs against it by default, so the patch holds only what
    changed in the guest: the host's uncommitted and untracked files that were copied in
    are already in the host's work tree, and a patch repeating them would not apply.
    """
    index = dest / ".git" / "banger-base-index"
    env = {"GIT_INDEX_FILE": str(index)}
    real = dest / ".git" / "index"
    if real.exists():
        # Start from the real index: files whose stat matches are not hashed again.
        shutil.copy2(real, index)
    try:
        run(["git", "-C", str(dest), "add", "-A"], env=env, timeout=600)
        tree = run(["git", "-C", str(dest), "write-tree"], env=env).stdout.strip()
    finally:
        index.unlink(missing_ok=True)
    parent = _git(dest, "rev-parse", "--verify", "-q", "HEAD", check=False)
    argv = ["git", "-C", str(dest), "commit-tree", tree, "-m", "banger: workspace base"]
    if parent:
        argv[5:5] = ["-p", parent]
    ident = {"GIT_AUTHOR_NAME": "banger", "GIT_AUTHOR_EMAIL": "banger@localhost",
             "GIT_COMMITTER_NAME": "banger", "GIT_COMMITTER_EMAIL": "banger@localhost"}
    commit = run(argv, env=ident).stdout.strip()
    _git(dest, "update-ref", BASE_REF, commit)
    return commit


def staging_parent(selection: Selection, fallback: Path) -> Path:
    """Where :func:`stage` should put the checkout: tmpfs when it fits in a quarter of the
    available memory (the work-disk build reads it once, then it is gone), else
    ``fallback`` (the VM's directory, so the build moves it in with a rename)."""
    need = selection.total_bytes + _git_bytes(selection.repo)
    try:
        vfs = os.statvfs(TMPFS)
        avail = _mem_available()
    except OSError:
        return fallback
    if need * TMPFS_SHARE < avail and need * 2 < vfs.f_bavail * vfs.f_frsize:
        return TMPFS
    return fallback


def _git_bytes(repo: Path) -> int:
    out = _git(repo, "count-objects", "-v", check=False)
    kib = 0
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key in ("size", "size-pack", "size-garbage"):
            kib += int(value)
    return kib << 10


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    return 0


# -- selection ----------------------------------------------------------------------------

def _toplevel(path: Path) -> Path:
    if not path.exists():
        raise WorkspaceError(f"{path} does not exist; give the path of a git repository")
    if not path.is_dir():
        raise WorkspaceError(f"{path} is not a directory; give the path of a git repository")
    try:
        flags = run(["git", "-C", str(path), "rev-parse", "--is-bare-repository",
                     "--is-inside-work-tree"]).stdout.split()
    except CommandError as exc:
        if "dubious ownership" in exc.stderr:
            raise WorkspaceError(
                f"git refuses {path}: it belongs to another user than banger runs as; "
                f"run banger as the repo's owner (or mark it safe: "
                f"`git config --global --add safe.directory {path}`)") from exc
        raise WorkspaceError(
            f"{path} is not inside a git work tree ({exc.stderr.strip() or exc}); run "
            f"`git init` and commit there, or give the path of a git checkout") from exc
    if flags != ["false", "true"]:
        raise WorkspaceError(
            f"{path} is a bare git repository or a .git directory, not a work tree; "
            f"give the path of a checkout (e.g. `git clone {path} somewhere`)")
    top = Path(_git(path, "rev-parse", "--show-toplevel"))
    if _config(top, "core.sparseCheckout") == "true":
        raise WorkspaceError(f"{top} is a sparse checkout, which banger cannot copy exactly "
                             f"yet; run `git sparse-checkout disable` or use a full clone")
    return top


# The file listings of a big repo pass the runner's default output cap (a 400k-file repo
# lists ~40 MiB): these come from the user's own repo, not a guest, so the cap is high.
LISTING_CAP = 1 << 30


def _tracked(top: Path) -> list[str]:
    out = run(["git", "-C", str(top), "ls-files", "-z", "--stage"],
              max_output=LISTING_CAP).stdout
    paths: list[str] = []
    submodules: list[str] = []
    unmerged: set[str] = set()
    for record in filter(None, out.split("\0")):
        meta, _, rel = record.partition("\t")
        mode, _, stage_no = meta.split(" ")
        if mode == _GITLINK:
            submodules.append(rel)
        elif stage_no != "0":
            unmerged.add(rel)
        else:
            paths.append(rel)
    if submodules:
        raise WorkspaceError(
            f"{top} has submodules ({', '.join(submodules)}); banger copies one repository "
            f"and would leave them empty: vendor their files or remove the submodules")
    if unmerged:
        raise WorkspaceError(f"{top} has unresolved merge conflicts in "
                             f"{', '.join(sorted(unmerged))}; resolve or abort the merge")
    return paths


def _untracked(top: Path) -> list[str]:
    out = run(["git", "-C", str(top), "ls-files", "-z", "--others",
               "--exclude-standard"], max_output=LISTING_CAP).stdout
    paths = list(filter(None, out.split("\0")))
    # git lists an untracked directory holding its own repository as "dir/".
    nested = [p for p in paths if p.endswith("/")]
    if nested:
        raise WorkspaceError(
            f"{top} holds untracked git repositories ({', '.join(nested)}); banger copies "
            f"one repository: add them to .gitignore or drop --include-untracked")
    return paths


def check_name(rel: str) -> None:
    """Refuse a repo-relative path the work disk cannot hold or that would escape it."""
    why = None
    raw = rel.encode("utf-8", "surrogateescape")
    parts = rel.split("/")
    if not rel or rel.startswith("/"):
        why = "is empty or absolute"
    elif "\0" in rel or "\n" in rel or "\r" in rel:
        why = "contains a NUL, newline or carriage return"
    elif "\ufffd" in rel:
        why = "is not valid UTF-8"
    elif any(p in ("", ".", "..") for p in parts):
        why = "has an empty, '.' or '..' component"
    elif ".git" in parts:
        why = "has a '.git' component"
    elif len(raw) > PATH_MAX or any(len(p.encode("utf-8", "surrogateescape")) > NAME_MAX
                                    for p in parts):
        why = f"is longer than ext4 allows ({NAME_MAX} bytes a name, {PATH_MAX} a path)"
    if why is not None:
        raise WorkspaceError(f"cannot copy {rel!r}: the path {why}; rename it "
                             f"(or leave it out of the selection)")


# -- staging ------------------------------------------------------------------------------

def _configure(selection: Selection, dest: Path) -> None:
    _git(dest, "config", "core.bare", "false")
    _git(dest, "config", "--remove-section", "remote.origin")  # the host path
    # Inode, device and ctime change on the way into the image; mtime and size survive.
    _git(dest, "config", "core.checkStat", "minimal")
    _git(dest, "config", "core.trustctime", "false")
    remotes = _git(selection.repo, "config", "--local", "--null", "--get-regexp",
                   r"^remote\.", check=False)
    for item in filter(None, remotes.split("\0")):
        key, _, value = item.partition("\n")
        _git(dest, "config", "--add", key, value)
    for key, ident in (("user.name", selection.user_name),
                       ("user.email", selection.user_email)):
        if ident is not None:
            _git(dest, "config", key, ident)


def _resolve(dest: Path, ref: str) -> str:
    sha = _git(dest, "rev-parse", "--verify", "-q", "--end-of-options", f"{ref}^{{commit}}",
               check=False)
    if not sha:
        raise WorkspaceError(f"--from {ref!r} is not a commit, branch or tag of the repo")
    return sha


def _new_branch(dest: Path, branch: str, target: str | None) -> None:
    if run(["git", "check-ref-format", "--branch", branch], check=False).returncode != 0:
        raise WorkspaceError(f"--branch {branch!r} is not a valid git branch name")
    ref = f"refs/heads/{branch}"
    if _git(dest, "rev-parse", "--verify", "-q", ref, check=False):
        raise WorkspaceError(f"branch {branch!r} already exists in the repo; pick a new "
                             f"name for the guest-only branch")
    if target is not None:
        _git(dest, "update-ref", ref, target, "")
    _git(dest, "symbolic-ref", "HEAD", ref)


def _copy_index(repo: Path, gitdir: Path) -> None:
    index = Path(_git(repo, "rev-parse", "--path-format=absolute", "--git-path", "index"))
    if not index.exists():
        return  # no commits and nothing added
    # copy2 keeps the index mtime, which git's racy-entry check compares file mtimes to.
    shutil.copy2(index, gitdir / "index")
    for shared in index.parent.glob("sharedindex.*"):
        shutil.copy2(shared, gitdir / shared.name)


def _copy_files(selection: Selection, files: Iterable[WorkspaceFile], dest: Path, *,
                exclusive: bool) -> None:
    made: set[Path] = {dest}
    with _Tree(selection.repo) as tree:
        for f in files:
            target = dest / f.path
            _make_parents(dest, target.parent, made, f.path)
            if exclusive and os.path.lexists(target):
                raise WorkspaceError(f"untracked {f.path!r} would overwrite a file of the "
                                     f"--from commit; move it or drop --include-untracked")
            if f.kind == "symlink":
                os.symlink(str(f.link_target), target)
            else:
                tree.copy(f.path, target)


def _make_parents(dest: Path, parent: Path, made: set[Path], rel: str) -> None:
    missing = []
    while parent not in made:
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if d.is_symlink() or not d.is_dir():
                raise WorkspaceError(f"{rel!r} lies under {d.relative_to(dest)}, which is "
                                     f"not a directory in the checkout") from None
        d.chmod(0o755)  # git does not track directory modes; umask must not decide them
        made.add(d)


class _Tree:
    """Reads files under a root through directory fds, never following a symlink.

    Keeps the chain of open directories of the last path, so walking sorted paths opens
    each directory once.
    """

    def __init__(self, root: Path) -> None:
        self._root = os.open(root, _DIR_FLAGS)
        self._stack: list[tuple[str, int]] = []

    def __enter__(self) -> _Tree:
        return self

    def __exit__(self, *exc: object) -> None:
        for _, fd in self._stack:
            os.close(fd)
        os.close(self._root)

    def _dir(self, parts: tuple[str, ...]) -> int | None:
        keep = 0
        while (keep < len(self._stack) and keep < len(parts)
               and self._stack[keep][0] == parts[keep]):
            keep += 1
        for _, fd in self._stack[keep:]:
            os.close(fd)
        del self._stack[keep:]
        for part in parts[keep:]:
            parent = self._stack[-1][1] if self._stack else self._root
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    return None  # gone, or no longer a real directory
                raise
            self._stack.append((part, fd))
        return self._stack[-1][1] if self._stack else self._root

    def inspect(self, rel: str, tracked: bool) -> WorkspaceFile | None:
        """The file at ``rel``; None when it is not in the work tree (deleted, or under a
        directory replaced by a symlink, which git too treats as deleted)."""
        check_name(rel)
        p = PurePosixPath(rel)
        dfd = self._dir(p.parts[:-1])
        if dfd is None:
            return None
        try:
            st = os.lstat(p.name, dir_fd=dfd)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(p.name, dir_fd=dfd)
            return WorkspaceFile(rel, "symlink", st.st_size, 0o777, target, tracked)
        if stat.S_ISREG(st.st_mode):
            return WorkspaceFile(rel, "file", st.st_size, stat.S_IMODE(st.st_mode), None,
                                 tracked)
        if stat.S_ISDIR(st.st_mode):
            return None  # a tracked file replaced by a directory: deleted, to git
        raise WorkspaceError(f"cannot copy {rel!r}: it is not a regular file or symlink")

    def copy(self, rel: str, target: Path) -> None:
        """Copy the regular file ``rel`` to ``target`` with its mode and mtime."""
        p = PurePosixPath(rel)
        dfd = self._dir(p.parts[:-1])
        try:
            if dfd is None:
                raise FileNotFoundError(rel)
            src = os.open(p.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            raise WorkspaceError(f"{rel!r} changed while it was being copied ({exc}); "
                                 f"run again") from exc
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                raise WorkspaceError(f"{rel!r} is no longer a regular file; run again")
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                          stat.S_IMODE(st.st_mode))
            try:
                _copy_data(src, dst)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                # The copied index compares mtimes: the copy must keep the original's.
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
        finally:
            os.close(src)


def _copy_data(src: int, dst: int) -> None:
    # copy_file_range stays in the kernel (and reflinks where the filesystem can).
    try:
        while os.copy_file_range(src, dst, _CHUNK):
            pass
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    # Start over with plain reads: the kernel may have copied a part before refusing.
    os.lseek(src, 0, os.SEEK_SET)
    os.lseek(dst, 0, os.SEEK_SET)
    os.ftruncate(dst, 0)
    while block := os.read(src, 1 << 20):
        view = memoryview(block)
        while view:
            view = view[os.write(dst, view):]


# -- git ----------------------------------------------------------------------------------

def _git(cwd: Path, *args: str, check: bool = True) -> str:
    res = run(["git", "-C", str(cwd), *args], check=check, timeout=600)
    return res.stdout.strip() if res.returncode == 0 else ""


def _config(top: Path, key: str) -> str | None:
    return _git(top, "config", "--get", key, check=False) or None


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
