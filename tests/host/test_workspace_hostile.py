"""A hostile repo on the host: its config and hooks name programs, its index is a link;
selecting and staging it runs none of them, copies nothing else, and still gives the
right checkout (real git, real files)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_workspace import GIT_ENV, git, make_repo, status

from banger.host import repogit, repostage, workspace
from banger.host.workspace import WorkspaceError

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(shutil.which("git") is None, reason="git not installed"),
]

HOOKS = ("post-checkout", "post-index-change", "reference-transaction", "pre-commit",
         "post-commit", "pre-auto-gc", "post-rewrite", "fsmonitor-watchman", "pre-push",
         "post-merge", "push-to-checkout")


@pytest.fixture(autouse=True)
def _isolated_git(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)


def _marker_script(bin_dir: Path, markers: Path, name: str) -> Path:
    """A program that records that it ran, then passes stdin through (as a filter
    would, so that git itself carries on and every program gets its chance to run)."""
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\necho \"$0 $*\" >> {markers}/{name}\ncat\n")
    script.chmod(0o755)
    return script


def make_hostile(tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """(repo, markers dir, what the staged checkout must look like). Committed first,
    made hostile after, so that only banger's git calls can run the programs."""
    repo = make_repo(tmp_path)
    (repo / ".gitattributes").write_text("*.txt filter=evil diff=evil merge=evil\n"
                                         "*.dat filter=evil2 diff=evil2\n")
    (repo / "data.txt").write_text("filtered text\n")
    (repo / "blob.dat").write_text("filtered data\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "attributes")
    (repo / "data.txt").write_text("changed, not staged\n")
    (repo / "blob.dat").write_text("changed and staged\n")
    git(repo, "add", "blob.dat")
    (repo / "new.txt").write_text("untracked, filtered\n")
    expected = {"status": status(repo), "head": git(repo, "rev-parse", "HEAD").strip()}

    markers = tmp_path / "markers"
    markers.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    run = {name: str(_marker_script(bin_dir, markers, name)) for name in (
        "fsmonitor", "ssh-command", "clean", "smudge", "process", "textconv", "diff-cmd",
        "merge-driver", "credential", "pager", "editor", "askpass", "alternate-refs",
        "upload-pack", "receive-pack", "gpg", "clean2", "smudge2", "process2",
        "textconv2", "proxy", "external-diff")}
    for hook in HOOKS:
        _marker_script(repo / ".git" / "hooks", markers, hook)
    other_hooks = tmp_path / "hooks2"
    other_hooks.mkdir()
    for hook in HOOKS:
        _marker_script(other_hooks, markers, f"hooksPath-{hook}")
    included = tmp_path / "more.cfg"
    included.write_text(
        f"[core]\n\thooksPath = {other_hooks}\n\tgitProxy = {run['proxy']}\n"
        f"[filter \"evil2\"]\n\tclean = {run['clean2']}\n\tsmudge = {run['smudge2']}\n"
        f"\tprocess = {run['process2']}\n\trequired = true\n"
        f"[diff \"evil2\"]\n\ttextconv = {run['textconv2']}\n"
        f"[diff]\n\texternal = {run['external-diff']}\n"
        f"[remote \"origin\"]\n\turl = {tmp_path / 'elsewhere'}\n"
        f"\tuploadpack = {run['upload-pack']}\n\treceivepack = {run['receive-pack']}\n"
        f"[commit]\n\tgpgSign = true\n[gpg]\n\tprogram = {run['gpg']}\n")
    config = {
        "core.fsmonitor": run["fsmonitor"],
        "core.sshCommand": run["ssh-command"],
        "core.pager": run["pager"],
        "core.editor": run["editor"],
        "core.askPass": run["askpass"],
        "core.alternateRefsCommand": run["alternate-refs"],
        "credential.helper": run["credential"],
        "filter.evil.clean": run["clean"],
        "filter.evil.smudge": run["smudge"],
        "filter.evil.process": run["process"],
        "filter.evil.required": "true",
        "diff.evil.textconv": run["textconv"],
        "diff.evil.command": run["diff-cmd"],
        "merge.evil.driver": run["merge-driver"],
        "include.path": str(included),
    }
    for key, value in config.items():
        git(repo, "config", key, value)
    return repo, markers, expected


def ran(markers: Path) -> list[str]:
    return sorted(p.name for p in markers.iterdir())


def test_hostile_config_and_hooks_run_nothing_and_stage_right(tmp_path: Path) -> None:
    repo, markers, expected = make_hostile(tmp_path)
    sel = workspace.select(repo, include_untracked=True)
    assert not {f.path: f for f in sel.files}["new.txt"].tracked
    dest = tmp_path / "staged"
    repostage.stage(sel, dest)
    repostage.record_base(dest)
    assert ran(markers) == []
    # The checkout is still right: the host's status, HEAD, contents and base snapshot.
    assert status(dest) == expected["status"]
    assert git(dest, "rev-parse", "HEAD").strip() == expected["head"]
    assert (dest / "data.txt").read_text() == "changed, not staged\n"
    base = git(dest, "rev-parse", repostage.BASE_REF).strip()
    assert git(dest, "show", f"{base}:data.txt") == "changed, not staged\n"
    assert git(dest, "show", f"{base}:new.txt") == "untracked, filtered\n"
    # Nothing of the hostile config made it into the copy (remotes are kept, as data).
    local = git(dest, "config", "--local", "--list")
    for word in ("fsmonitor", "hookspath", "filter.", "include.", "diff.", "credential"):
        assert word not in local, word
    assert ran(markers) == []


def test_hostile_repo_staged_from_another_ref_on_a_branch(tmp_path: Path) -> None:
    repo, markers, expected = make_hostile(tmp_path)
    dest = tmp_path / "staged"
    repostage.stage(workspace.select(repo, include_untracked=True), dest, branch="guest",
                    from_ref="HEAD")  # reset --hard: checks out filtered files
    assert ran(markers) == []
    assert git(dest, "symbolic-ref", "HEAD").strip() == "refs/heads/guest"
    assert (dest / "data.txt").read_text() == "filtered text\n"
    assert status(dest) == "?? new.txt\n"


def test_overrides_cover_every_driver_and_helper_listed(tmp_path: Path) -> None:
    repo, _, _ = make_hostile(tmp_path)
    names = repogit.config_names(repo)
    # Included files are read: evil2 and the remote come from more.cfg.
    assert "filter.evil2.clean" in names and "remote.origin.uploadpack" in names
    got = dict(repogit.overrides(names))
    for driver in ("evil", "evil2"):
        for program in ("clean", "smudge", "process"):
            assert got[f"filter.{driver}.{program}"] == ""
        assert got[f"filter.{driver}.required"] == "false"
    assert got["diff.evil.textconv"] == got["diff.evil2.textconv"] == ""
    assert got["diff.evil.command"] == got["merge.evil.driver"] == ""
    assert got["remote.origin.uploadpack"] == "git-upload-pack"
    assert got["core.fsmonitor"] == "false" and got["core.hooksPath"] == "/dev/null"


def test_git_dir_and_index_in_the_environment_are_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path)
    (tmp_path / "other").mkdir()
    other = make_repo(tmp_path / "other")
    (other / "other-only").write_text("x")
    git(other, "add", "other-only")
    git(other, "commit", "-q", "-m", "other")
    # Left over from whatever started the daemon (a git hook running banger, say).
    monkeypatch.setenv("GIT_DIR", str(other / ".git"))
    monkeypatch.setenv("GIT_INDEX_FILE", str(other / ".git" / "index"))
    sel = workspace.select(repo)
    assert sel.repo == repo.resolve() and "other-only" not in {f.path for f in sel.files}
    monkeypatch.delenv("GIT_DIR")
    monkeypatch.delenv("GIT_INDEX_FILE")
    assert sel.head == git(repo, "rev-parse", "HEAD").strip()


def test_core_worktree_elsewhere_is_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "key").write_text("host secret\n")
    # The work tree is a parent of the repo: selecting the repo path would copy files
    # of that directory, named by whatever the (hostile) index lists.
    git(repo, "config", "core.worktree", str(tmp_path))
    with pytest.raises(WorkspaceError, match=r"core\.worktree"):
        workspace.select(repo)


@pytest.mark.parametrize("which", ["index", "sharedindex"])
def test_symlinked_index_is_refused(tmp_path: Path, which: str) -> None:
    repo = make_repo(tmp_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET-BYTES-OF-THE-HOST\n" * 10)
    gitdir = repo / ".git"
    if which == "index":
        link = gitdir / "index"
    else:
        git(repo, "update-index", "--split-index")
        link = next(gitdir.glob("sharedindex.*"))
    sel = workspace.select(repo)
    # Swapped after select: git itself would refuse to read a foreign shared index.
    link.unlink()
    os.symlink(secret, link)
    dest = tmp_path / "staged"
    with pytest.raises(WorkspaceError, match=f"{link} is a symlink"):
        repostage.stage(sel, dest)
    for path in dest.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert b"SECRET-BYTES" not in path.read_bytes(), path


def test_fifo_index_is_refused_without_hanging(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    sel = workspace.select(repo)
    (repo / ".git" / "index").unlink()
    os.mkfifo(repo / ".git" / "index")
    with pytest.raises(WorkspaceError, match="not a regular file"):
        repostage.stage(sel, tmp_path / "staged")


@pytest.mark.parametrize("how", ["gitfile", "symlink"])
def test_git_dir_elsewhere_is_refused(tmp_path: Path, how: str) -> None:
    (tmp_path / "secret").mkdir()
    secret = make_repo(tmp_path / "secret")  # say /etc/.git (etckeeper)
    repo = tmp_path / "innocent"
    repo.mkdir()
    (repo / "README").write_text("hi\n")
    if how == "gitfile":
        (repo / ".git").write_text(f"gitdir: {secret / '.git'}\n")
    else:
        (repo / ".git").symlink_to(secret / ".git")
    with pytest.raises(WorkspaceError, match=f"points at {secret / '.git'}"):
        workspace.select(repo)


def test_linked_worktree_still_works(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    linked = tmp_path / "linked"
    git(repo, "worktree", "add", "-q", "-b", "side", str(linked))
    (linked / "README").write_text("changed in the linked worktree\n")
    sel = workspace.select(linked)
    assert sel.repo == linked.resolve() and sel.branch == "side"
    dest = tmp_path / "staged"
    repostage.stage(sel, dest)
    assert status(dest) == " M README\n"
    assert git(dest, "symbolic-ref", "HEAD").strip() == "refs/heads/side"


def test_git_dir_swapped_after_select_is_refused_by_stage(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (tmp_path / "secret").mkdir()
    secret = make_repo(tmp_path / "secret")
    sel = workspace.select(repo)
    shutil.rmtree(repo / ".git")
    (repo / ".git").write_text(f"gitdir: {secret / '.git'}\n")
    with pytest.raises(WorkspaceError, match=f"points at {secret / '.git'}"):
        repostage.stage(sel, tmp_path / "staged")


def _secret_repo(tmp_path: Path) -> Path:
    (tmp_path / "secret").mkdir()
    secret = make_repo(tmp_path / "secret")
    (secret / "key").write_text("SECRET-OF-THE-HOST\n")
    git(secret, "add", "key")
    git(secret, "commit", "-q", "-m", "secret")
    return secret


def _assert_no_secret(dest: Path, secret: Path) -> None:
    head = git(secret, "rev-parse", "HEAD").strip()
    if (dest / ".git").exists():
        res = subprocess.run(["git", "-C", str(dest), "cat-file", "-e", head],
                             capture_output=True)
        assert res.returncode != 0, "the other repository's history was copied"


def test_commondir_naming_another_repo_is_refused(tmp_path: Path) -> None:
    # A `commondir` file in a plain .git directory: git takes objects and refs from there,
    # and the clone carried another repository's whole history into the VM.
    secret = _secret_repo(tmp_path)
    repo = make_repo(tmp_path)
    (repo / ".git" / "commondir").write_text(f"{secret / '.git'}\n")
    with pytest.raises(WorkspaceError, match=f"points at {secret / '.git'}"):
        workspace.select(repo)


def test_commondir_swapped_in_after_select_is_refused_by_stage(tmp_path: Path) -> None:
    secret = _secret_repo(tmp_path)
    repo = make_repo(tmp_path)
    sel = workspace.select(repo)
    (repo / ".git" / "commondir").write_text(f"{secret / '.git'}\n")
    dest = tmp_path / "staged"
    with pytest.raises(WorkspaceError, match=f"points at {secret / '.git'}"):
        repostage.stage(sel, dest)
    _assert_no_secret(dest, secret)


def test_fake_linked_worktree_naming_another_repo_is_refused(tmp_path: Path) -> None:
    # What a linked worktree looks like (a .git file, a back-pointer), made by the repo's
    # author inside the repo, with a commondir naming another repository of the host.
    secret = _secret_repo(tmp_path)
    repo = make_repo(tmp_path)
    fake = repo / "fake" / "gd"
    fake.parent.mkdir()
    (repo / ".git").rename(fake)
    (repo / ".git").write_text(f"gitdir: {fake}\n")
    (fake / "gitdir").write_text(f"{repo / '.git'}\n")
    (fake / "commondir").write_text(f"{secret / '.git'}\n")
    with pytest.raises(WorkspaceError, match=f"points at {secret / '.git'}"):
        workspace.select(repo)


@pytest.mark.parametrize("link", ["refs/tags", "refs/heads/stolen", "packed-refs"])
def test_symlinked_refs_with_alternates_are_refused(tmp_path: Path, link: str) -> None:
    # A ref that is a link into another repository, and alternates naming its objects:
    # the clone took that repository's commits along.
    secret = _secret_repo(tmp_path)
    git(secret, "pack-refs", "--all")
    repo = make_repo(tmp_path)
    gitdir = repo / ".git"
    (gitdir / "objects" / "info" / "alternates").write_text(f"{secret / '.git/objects'}\n")
    target = secret / ".git/packed-refs"
    if link == "refs/heads/stolen":
        # a loose ref file holding the other repository's HEAD
        (tmp_path / "stolen").write_text(git(secret, "rev-parse", "HEAD"))
        target = tmp_path / "stolen"
    path = gitdir / link
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if link == "refs/tags":
        # loose refs, so the link leads to something git reads
        (tmp_path / "loose").mkdir()
        (tmp_path / "loose" / "t").write_text(git(secret, "rev-parse", "HEAD"))
        target = tmp_path / "loose"
    os.symlink(target, path)
    dest = tmp_path / "staged"
    with pytest.raises(WorkspaceError, match="is a symlink"):
        sel = workspace.select(repo)
        repostage.stage(sel, dest)
    _assert_no_secret(dest, secret)


def test_sparse_file_is_staged_sparse(tmp_path: Path) -> None:
    # A file of a huge size that takes no space (a tarball can carry one): copied byte
    # for byte it filled the staging tmpfs or the host disk.
    repo = make_repo(tmp_path)
    size = 256 << 20
    with open(repo / "README", "r+b") as f:
        f.write(b"head\n")
        f.truncate(size)
        f.seek(size - 5)
        f.write(b"tail\n")
    assert os.stat(repo / "README").st_blocks * 512 < 1 << 20
    sel = workspace.select(repo)
    dest = tmp_path / "staged"
    repostage.stage(sel, dest)
    st = os.stat(dest / "README")
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20, f"{st.st_blocks * 512} bytes written for a hole"
    with open(dest / "README", "rb") as f:
        assert f.read(5) == b"head\n"
        f.seek(size - 5)
        assert f.read() == b"tail\n"


def _git_bomb(repo: Path, copies: int = 64, blob_mib: int = 4) -> int:
    """A branch ``bomb`` whose tree names one blob of zeros ``copies`` times: a few KiB in
    the repo, ``copies * blob_mib`` MiB checked out. Returns the checked-out size."""
    blob = subprocess.run(["git", "-C", str(repo), "hash-object", "-w", "--stdin"],
                          input=bytes(blob_mib << 20), capture_output=True,
                          check=True).stdout.decode().strip()
    listing = "".join(f"100644 blob {blob}\tzeros{i}\n" for i in range(copies))
    tree = subprocess.run(["git", "-C", str(repo), "mktree"], input=listing.encode(),
                          capture_output=True, check=True).stdout.decode().strip()
    commit = git(repo, "commit-tree", tree, "-m", "bomb").strip()
    git(repo, "update-ref", "refs/heads/bomb", commit)
    return copies * blob_mib << 20


def test_from_ref_checkout_bigger_than_the_free_space_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `reset --hard` of a hostile --from ref inflated a few KiB of history into the
    # staging directory: on the tmpfs (as big as RAM here) or on the host's disk.
    repo = make_repo(tmp_path)
    size = _git_bomb(repo)
    sel = workspace.select(repo)
    # "The disk is small" (raising=False: on code without the check, the bomb goes off).
    monkeypatch.setattr(repostage, "_free_bytes", lambda _path: size, raising=False)
    dest = tmp_path / "staged"
    with pytest.raises(WorkspaceError, match=r"--from 'bomb' checks out 256\.0 MiB"):
        repostage.stage(sel, dest, branch="try", from_ref="bomb")
    assert not list(dest.glob("zeros*"))


def test_staging_parent_counts_the_from_ref_checkout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = make_repo(tmp_path)
    size = _git_bomb(repo)
    sel = workspace.select(repo)
    ram = tmp_path / "ram"
    ram.mkdir()
    monkeypatch.setattr(repostage, "_mem_available", lambda: 2 * size)
    assert repostage.staging_parent(sel, tmp_path, ram) == ram
    assert repostage.staging_parent(sel, tmp_path, ram, "bomb") == tmp_path
