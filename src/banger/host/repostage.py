"""The git checkout a selection becomes in a VM: the staging side of workspace mode.

Owns :func:`stage`, which turns a :class:`~banger.host.workspace.Selection` into a
directory that is a real git checkout (history, index, HEAD, branch, identity) ready to
be written onto the work disk as /root/repo; :func:`record_base`, the snapshot ``vm
workspace export`` diffs against; and :func:`staging_parent`, where to stage (tmpfs or
disk) and the size checks that keep a checkout from filling either.

Every git call, on the user's repo and on the staged copy, goes through
:mod:`banger.host.repogit`, so nothing the repo's config names ever runs; files are
copied without following a link out of the repo (:mod:`banger.host.repofiles`), in
process, so the cost scales with bytes, not with a process per file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from banger.host import repogit
from banger.host.repofiles import Tree, WorkspaceError, WorkspaceFile, copy_git_file
from banger.host.repogit import RepoGit
from banger.host.runner import CommandError
from banger.host.workspace import LISTING_CAP, Selection, check_git_dir, human

# Staging on tmpfs makes the intermediate checkout nearly free (no journaled creates) as
# long as it is small against memory; beyond this share of MemAvailable, stage on disk.
TMPFS = Path("/dev/shm")
TMPFS_SHARE = 4


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
    src = repogit.for_repo(selection.repo)
    check_git_dir(src)  # again: the repo may have changed since select
    try:
        src.run_here("clone", "-q", "--mirror", "--no-hardlinks", "--", str(selection.repo),
                     str(gitdir), timeout=3600)
    except CommandError as exc:
        raise WorkspaceError(f"cannot copy the git history of {selection.repo}: {exc}") from exc
    # The copy's config is the host's global config plus the keys _configure copies
    # from the repo's: neutralise what either names.
    git = repogit.for_repo(dest, selection.repo)
    alternates = gitdir / "objects" / "info" / "alternates"
    if alternates.exists():
        # The clone borrows objects from host paths the guest cannot see: pack them in.
        git.out("repack", "-a", "-d", "-q")
        alternates.unlink()
    _configure(selection, src, git)
    target = _resolve(git, from_ref) if from_ref is not None else selection.head
    if branch is not None:
        _new_branch(git, branch, target)
    elif from_ref is not None:
        git.out("update-ref", "--no-deref", "HEAD", str(target))
    elif selection.branch is not None:
        git.out("symbolic-ref", "HEAD", f"refs/heads/{selection.branch}")
    elif selection.head is not None:
        git.out("update-ref", "--no-deref", "HEAD", selection.head)
    if from_ref is not None:
        _check_fits(dest, _checkout_bytes(git, str(target)), from_ref)
        git.out("reset", "-q", "--hard")
        _copy_files(selection, (f for f in selection.files if not f.tracked), dest,
                    exclusive=True)
        record_base(dest, git)
        return
    _copy_index(src, gitdir)
    _copy_files(selection, selection.files, dest, exclusive=False)
    # Rewrite the index in the copy: folds a split index into one file and drops
    # extensions tied to the host (untracked cache); racily-clean entries get rechecked.
    git.out("update-index", "-q", "--no-split-index", "--no-untracked-cache")
    for shared in gitdir.glob("sharedindex.*"):
        shared.unlink()
    record_base(dest, git)


BASE_REF = "refs/banger/base"


def record_base(dest: Path, git: RepoGit | None = None) -> str:
    """Snapshot the staged work tree as commit ``refs/banger/base`` (index untouched).

    ``vm workspace export`` diffs against it by default, so the patch holds only what
    changed in the guest: the host's uncommitted and untracked files that were copied in
    are already in the host's work tree, and a patch repeating them would not apply.
    """
    git = git or repogit.for_repo(dest)
    index = dest / ".git" / "banger-base-index"
    env = {"GIT_INDEX_FILE": str(index)}
    real = dest / ".git" / "index"
    if real.exists():
        # Start from the real index: files whose stat matches are not hashed again.
        shutil.copy2(real, index)
    try:
        git.run("add", "-A", env=env)
        tree = git.run("write-tree", env=env).stdout.strip()
    finally:
        index.unlink(missing_ok=True)
    parent = git.out("rev-parse", "--verify", "-q", "HEAD", check=False)
    args = ["commit-tree", tree, "-m", "banger: workspace base"]
    if parent:
        args += ["-p", parent]
    ident = {"GIT_AUTHOR_NAME": "banger", "GIT_AUTHOR_EMAIL": "banger@localhost",
             "GIT_COMMITTER_NAME": "banger", "GIT_COMMITTER_EMAIL": "banger@localhost"}
    commit = git.run(*args, env=ident).stdout.strip()
    git.out("update-ref", BASE_REF, commit)
    return commit


def staging_parent(selection: Selection, fallback: Path, tmpfs: Path | None,
                   from_ref: str | None = None) -> Path:
    """Where :func:`stage` should put the checkout: ``tmpfs`` (the daemon's own directory
    there) when it fits in a quarter of the available memory (the work-disk build reads it
    once, then it is gone), else ``fallback`` (the VM's directory, so the build moves it in
    with a rename). With ``from_ref`` the checkout is that commit's files, whose size is
    counted (not the work tree's)."""
    if tmpfs is None:
        return fallback
    need = selection.total_bytes + _git_bytes(selection.repo)
    if from_ref is not None:
        git = repogit.for_repo(selection.repo)
        commit = git.out("rev-parse", "--verify", "-q", "--end-of-options",
                         f"{from_ref}^{{commit}}", check=False)
        if not commit:
            return fallback  # stage says what is wrong with it
        need += _checkout_bytes(git, commit)
    try:
        vfs = os.statvfs(tmpfs)
        avail = _mem_available()
    except OSError:
        return fallback
    if need * TMPFS_SHARE < avail and need * 2 < vfs.f_bavail * vfs.f_frsize:
        return tmpfs
    return fallback


def _git_bytes(repo: Path) -> int:
    out = repogit.for_repo(repo).out("count-objects", "-v", check=False)
    kib = 0
    for line in out.splitlines():
        key, _, value = line.partition(": ")
        if key in ("size", "size-pack", "size-garbage"):
            kib += int(value)
    return kib << 10


def _checkout_bytes(git: RepoGit, commit: str) -> int:
    """What a checkout of ``commit`` writes: the sum of its files' sizes. Not what they
    take in the repo: a blob of zeros compresses a thousandfold and a tree may name one
    blob any number of times (a few MiB of history can check out as terabytes)."""
    out = git.run("ls-tree", "-r", "-l", "-z", commit, max_output=LISTING_CAP).stdout
    total = 0
    for record in filter(None, out.split("\0")):
        meta = record.partition("\t")[0].split()
        if len(meta) == 4 and meta[1] == "blob" and meta[3].isdigit():
            total += int(meta[3])
    return total


def _free_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bavail * vfs.f_frsize


def _check_fits(dest: Path, need: int, from_ref: str) -> None:
    """Refuse a checkout that would take more than half the free space where it is
    staged (the host's disk, or a tmpfs: its memory), before a byte of it is written."""
    free = _free_bytes(dest)
    if need * 2 > free:
        raise WorkspaceError(
            f"--from {from_ref!r} checks out {human(need)} of files, more than half of the "
            f"{human(free)} free where banger stages the repo ({dest.parent}); free some "
            f"space or pick another commit")


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    return 0


# -- staging ------------------------------------------------------------------------------

def _configure(selection: Selection, src: RepoGit, dest: RepoGit) -> None:
    dest.out("config", "core.bare", "false")
    dest.out("config", "--remove-section", "remote.origin")  # the host path
    # Inode, device and ctime change on the way into the image; mtime and size survive.
    dest.out("config", "core.checkStat", "minimal")
    dest.out("config", "core.trustctime", "false")
    remotes = src.out("config", "--local", "--null", "--get-regexp", r"^remote\.",
                      check=False)
    for item in filter(None, remotes.split("\0")):
        key, _, value = item.partition("\n")
        dest.out("config", "--add", key, value)
    for key, ident in (("user.name", selection.user_name),
                       ("user.email", selection.user_email)):
        if ident is not None:
            dest.out("config", key, ident)


def _resolve(dest: RepoGit, ref: str) -> str:
    sha = dest.out("rev-parse", "--verify", "-q", "--end-of-options", f"{ref}^{{commit}}",
                   check=False)
    if not sha:
        raise WorkspaceError(f"--from {ref!r} is not a commit, branch or tag of the repo")
    return sha


def _new_branch(dest: RepoGit, branch: str, target: str | None) -> None:
    if dest.run("check-ref-format", "--branch", branch, check=False).returncode != 0:
        raise WorkspaceError(f"--branch {branch!r} is not a valid git branch name")
    ref = f"refs/heads/{branch}"
    if dest.out("rev-parse", "--verify", "-q", ref, check=False):
        raise WorkspaceError(f"branch {branch!r} already exists in the repo; pick a new "
                             f"name for the guest-only branch")
    if target is not None:
        dest.out("update-ref", ref, target, "")
    dest.out("symbolic-ref", "HEAD", ref)


def _copy_index(repo: RepoGit, gitdir: Path) -> None:
    # Not `--git-path index`: its absolute form resolves symlinks, the link included.
    index = Path(repo.out("rev-parse", "--absolute-git-dir")) / "index"
    if not os.path.lexists(index):
        return  # no commits and nothing added
    # Kept with its mtime, which git's racy-entry check compares file mtimes to.
    copy_git_file(index, gitdir / "index")
    for shared in index.parent.glob("sharedindex.*"):
        copy_git_file(shared, gitdir / shared.name)


def _copy_files(selection: Selection, files: Iterable[WorkspaceFile], dest: Path, *,
                exclusive: bool) -> None:
    made: set[Path] = {dest}
    with Tree(selection.repo) as tree:
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
