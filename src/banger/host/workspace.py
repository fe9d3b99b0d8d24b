"""Which files of a host git repo go into a VM: the selection side of workspace mode.

Owns :func:`select`, which reads the repo (git-tracked files by default, untracked
non-ignored ones on request) and refuses what cannot be copied exactly or would carry
another repository's history into the VM (:func:`check_git_dir`). Turning a selection
into the git checkout it becomes in the VM is :mod:`banger.host.repostage`.

Files are read without following a link out of the repo (:mod:`banger.host.repofiles`):
bangerd may run as root, the repo belongs to a user. Every git call on the user's repo
goes through :mod:`banger.host.repogit`, so nothing the repo's config names ever runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from banger.host import repogit
from banger.host.repofiles import Tree, WorkspaceFile
from banger.host.repofiles import WorkspaceError as WorkspaceError  # callers name it here
from banger.host.repofiles import check_name as check_name
from banger.host.repogit import RepoGit
from banger.host.runner import CommandError

_GITLINK = "160000"


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
    lines.append(f"{len(selection.files)} files, {human(selection.total_bytes)} "
                 f"({selection.total_bytes} bytes) from {selection.repo}")
    return lines

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
    check_git_dir(git)
    if _config(git, "core.sparseCheckout") == "true":
        raise WorkspaceError(f"{git.repo} is a sparse checkout, which banger cannot copy "
                             f"exactly yet; run `git sparse-checkout disable` or use a "
                             f"full clone")
    return git


# The file listings of a big repo pass the runner's default output cap (a 400k-file repo
# lists ~40 MiB): these come from the user's own repo, not a guest, so the cap is high.
LISTING_CAP = 1 << 30


def check_git_dir(git: RepoGit) -> None:
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


# -- git ----------------------------------------------------------------------------------

def _config(git: RepoGit, key: str) -> str | None:
    return git.out("config", "--get", key, check=False) or None


def human(n: int) -> str:
    """``n`` bytes for people: B, KiB, MiB or GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
