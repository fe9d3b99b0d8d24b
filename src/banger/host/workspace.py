"""Which files of a host git repo go into a VM, and the git checkout they become there.

Owns the host side of workspace mode: :func:`select` reads the repo (git-tracked files by
default, untracked non-ignored ones on request) and refuses what cannot be copied exactly;
:func:`stage` turns a selection into a directory that is a real git checkout (history,
index, HEAD, branch, identity) ready to be written onto the work disk as /root/repo.

Files are read without following a link out of the repo (:mod:`banger.host.repofiles`):
bangerd may run as root, the repo belongs to a user. Every git call, on the user's repo
and on the staged copy, goes through :mod:`banger.host.repogit`, so nothing the repo's
config names ever runs; the copy itself is in-process, so its cost scales with bytes,
not with a process per file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from banger.host import repogit
from banger.host.repofiles import Tree, WorkspaceFile, copy_git_file
from banger.host.repofiles import WorkspaceError as WorkspaceError  # callers name it here
from banger.host.repofiles import check_name as check_name
from banger.host.repogit import RepoGit
from banger.host.runner import CommandError

_GITLINK = "160000"
# Staging on tmpfs makes the intermediate checkout nearly free (no journaled creates) as
# long as it is small against memory; beyond this share of MemAvailable, stage on disk.
TMPFS = Path("/dev/shm")
TMPFS_SHARE = 4


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
    git = _toplevel(path)
    top = git.repo
    tracked = _tracked(git)
    entries = [(p, True) for p in tracked]
    if include_untracked:
        entries += [(p, False) for p in _untracked(git)]
    files: list[WorkspaceFile] = []
    with Tree(top) as tree:
        for rel, is_tracked in sorted(entries):
            f = tree.inspect(rel, is_tracked)
            if f is not None:
                files.append(f)
    head = git.out("rev-parse", "--verify", "-q", "HEAD", check=False) or None
    branch = git.out("symbolic-ref", "-q", "--short", "HEAD", check=False) or None
    return Selection(
        repo=top, files=tuple(files), total_bytes=sum(f.size for f in files), head=head,
        branch=branch, user_name=_config(git, "user.name"),
        user_email=_config(git, "user.email"))


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
    src = repogit.for_repo(selection.repo)
    _check_git_dir(src)  # again: the repo may have changed since select
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
            f"--from {from_ref!r} checks out {_human(need)} of files, more than half of the "
            f"{_human(free)} free where banger stages the repo ({dest.parent}); free some "
            f"space or pick another commit")


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    return 0


# -- selection ----------------------------------------------------------------------------

def _toplevel(path: Path) -> RepoGit:
    if not path.exists():
        raise WorkspaceError(f"{path} does not exist; give the path of a git repository")
    if not path.is_dir():
        raise WorkspaceError(f"{path} is not a directory; give the path of a git repository")
    git = repogit.for_repo(path)
    try:
        flags = git.run("rev-parse", "--is-bare-repository", "--is-inside-work-tree",
                        timeout=60).stdout.split()
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
    worktree = _config(git, "core.worktree")
    if worktree is not None:
        # The files copied would be those under that path (any directory of the host),
        # not the ones next to the repo's .git.
        raise WorkspaceError(
            f"{path}: the repo's config sets core.worktree = {worktree!r}; banger copies "
            f"only a work tree that holds its own .git: `git config --unset core.worktree` "
            f"(or clone the repo) and retry")
    git = git.at(Path(git.out("rev-parse", "--show-toplevel")))
    _check_git_dir(git)
    if _config(git, "core.sparseCheckout") == "true":
        raise WorkspaceError(f"{git.repo} is a sparse checkout, which banger cannot copy "
                             f"exactly yet; run `git sparse-checkout disable` or use a "
                             f"full clone")
    return git


# The file listings of a big repo pass the runner's default output cap (a 400k-file repo
# lists ~40 MiB): these come from the user's own repo, not a guest, so the cap is high.
LISTING_CAP = 1 << 30


def _check_git_dir(git: RepoGit) -> None:
    """Refuse a work tree whose history lives elsewhere than its own ``.git``.

    A ``.git`` file (``gitdir: /etc/.git``) or symlink can name any repository bangerd
    can read, and the clone would carry all of that one's history into the VM. Allowed:
    a real ``.git`` directory, and a linked worktree (``git worktree add``), whose git
    directory points back at this work tree (only git writes that back-pointer, in the
    main repository's own ``.git/worktrees``).
    """
    top = git.repo
    git_dir = Path(git.out("rev-parse", "--absolute-git-dir"))
    # A git directory's `commondir` file moves its objects and refs anywhere (git reads it
    # in any git directory, not only a linked worktree's): the repository copied would be
    # that one. Only git writes it, for a linked worktree, pointing at the repository that
    # holds the worktree's own directory under `worktrees/`.
    common = Path(git.out("rev-parse", "--path-format=absolute", "--git-common-dir"))
    dot_git = top / ".git"
    if not dot_git.is_symlink() and dot_git.is_dir() and dot_git.resolve() == git_dir \
            and common.resolve() == git_dir.resolve():
        _check_refs(git_dir)
        return
    try:
        back = (git_dir / "gitdir").read_text().strip()
    except OSError:
        back = ""
    if dot_git.is_file() and not dot_git.is_symlink() and back and \
            Path(back).resolve() == dot_git.resolve() and \
            git_dir.resolve().parent == (common / "worktrees").resolve():
        _check_refs(common, git_dir)
        return
    if common.resolve() != git_dir.resolve():
        git_dir = common
    raise WorkspaceError(
        f"{top}: its .git points at {git_dir}, which is neither its own .git directory nor "
        f"a linked worktree of it; banger would copy that repository's history into the "
        f"VM. Use a checkout that holds its own .git (e.g. `git clone {top} somewhere`)")


def _check_refs(*git_dirs: Path) -> None:
    """Refuse a symlink among the refs (``packed-refs``, ``refs/``): git never makes one
    there, and git reads through it, so a link to another repository's refs (with
    ``objects/info/alternates`` naming that repository's objects) would carry its history
    into the VM. (A symlinked HEAD git checks itself: it must point into ``refs/``.)"""
    for git_dir in git_dirs:
        found = [p for p in (git_dir / "packed-refs", git_dir / "refs")
                 if p.is_symlink()]
        if not found and (git_dir / "refs").is_dir():
            for parent, dirs, files in os.walk(git_dir / "refs"):
                found += [Path(parent, n) for n in (*dirs, *files)
                          if os.path.islink(os.path.join(parent, n))]
        if found:
            raise WorkspaceError(
                f"{found[0]} is a symlink (to {os.readlink(found[0])}); git keeps refs as "
                f"plain files and banger will not follow a link out of the repository: "
                f"replace it with the ref it should hold (`git update-ref`) and retry")


def _tracked(git: RepoGit) -> list[str]:
    top = git.repo
    out = git.run("ls-files", "-z", "--stage", max_output=LISTING_CAP).stdout
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


def _untracked(git: RepoGit) -> list[str]:
    top = git.repo
    out = git.run("ls-files", "-z", "--others", "--exclude-standard",
                  max_output=LISTING_CAP).stdout
    paths = list(filter(None, out.split("\0")))
    # git lists an untracked directory holding its own repository as "dir/".
    nested = [p for p in paths if p.endswith("/")]
    if nested:
        raise WorkspaceError(
            f"{top} holds untracked git repositories ({', '.join(nested)}); banger copies "
            f"one repository: add them to .gitignore or drop --include-untracked")
    return paths


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


# -- git ----------------------------------------------------------------------------------

def _config(git: RepoGit, key: str) -> str | None:
    return git.out("config", "--get", key, check=False) or None


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
