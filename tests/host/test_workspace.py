"""Workspace selection and staging on real temporary git repos, and the work disk they
end up on (read back with debugfs, never mounted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from banger.host import disks, repostage, workspace
from banger.host.workspace import WorkspaceError

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(shutil.which("git") is None, reason="git not installed"),
]

NEEDS_E2FS = pytest.mark.skipif(
    shutil.which("mkfs.ext4", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None,
    reason="e2fsprogs not installed")

# Tests must not depend on (or read) the identity of whoever runs them.
GIT_ENV = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}


@pytest.fixture(autouse=True)
def _isolated_git(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True).stdout


def make_repo(root: Path) -> Path:
    repo = root / "src-repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.name", "Ada Lovelace")
    git(repo, "config", "user.email", "ada@example.com")
    (repo / "README").write_text("hello\n")
    (repo / "bin").mkdir()
    (repo / "bin" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (repo / "bin" / "run.sh").chmod(0o755)
    (repo / ".gitignore").write_text("*.log\nbuild/\n")
    os.symlink("/etc/passwd", repo / "outside")
    os.symlink("README", repo / "inside")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "debug.log").write_text("ignored\n")
    (repo / "build").mkdir()
    (repo / "build" / "out.o").write_bytes(b"\0" * 10)
    (repo / "notes.txt").write_text("untracked\n")
    return repo


def paths(sel: workspace.Selection) -> list[str]:
    return [f.path for f in sel.files]


def status(repo: Path, *extra: str) -> str:
    return git(repo, "status", "--porcelain", *extra)


def test_tracked_only_by_default(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    sel = workspace.select(repo / "bin")  # any path inside the work tree
    assert sel.repo == repo.resolve()
    assert paths(sel) == [".gitignore", "README", "bin/run.sh", "inside", "outside"]
    by = {f.path: f for f in sel.files}
    assert by["bin/run.sh"].mode == 0o755 and by["README"].mode & 0o111 == 0
    assert by["outside"].kind == "symlink" and by["outside"].link_target == "/etc/passwd"
    assert sel.total_bytes == sum(f.size for f in sel.files)
    assert sel.branch == "main" and sel.head == git(repo, "rev-parse", "HEAD").strip()
    assert (sel.user_name, sel.user_email) == ("Ada Lovelace", "ada@example.com")
    lines = workspace.dry_run_lines(sel)
    assert any(line.endswith("outside -> /etc/passwd") for line in lines)
    assert lines[-1].startswith("5 files, ")


def test_untracked_opt_in_ignored_never(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    sel = workspace.select(repo, include_untracked=True)
    assert "notes.txt" in paths(sel)
    assert not {"debug.log", "build/out.o"} & set(paths(sel))
    assert not {f.path: f for f in sel.files}["notes.txt"].tracked


def test_deleted_tracked_file_is_skipped(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "README").unlink()
    assert "README" not in paths(workspace.select(repo))


def test_newline_name_refused_with_the_path(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "new\nline").write_text("x")
    workspace.select(repo)  # untracked, so not selected
    with pytest.raises(WorkspaceError) as err:
        workspace.select(repo, include_untracked=True)
    assert repr("new\nline") in str(err.value)


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/etc/passwd", "a//b", "a\0b",
                                  "x" * 256, "sub/.git/config", "bad\ufffdutf8"])
def test_names_ext4_cannot_hold_or_that_escape_are_refused(name: str) -> None:
    # git refuses most of these itself; select checks every listed path anyway.
    with pytest.raises(WorkspaceError) as err:
        workspace.check_name(name)
    assert repr(name) in str(err.value)


def test_submodule_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    sub = tmp_path / "sub"
    shutil.copytree(repo, sub, symlinks=True)
    subprocess.run(["git", "-C", str(repo), "-c", "protocol.file.allow=always", "submodule",
                    "add", "-q", str(sub), "vendor/sub"], check=True, capture_output=True)
    with pytest.raises(WorkspaceError, match=r"submodules \(vendor/sub\)"):
        workspace.select(repo)


def test_untracked_nested_repo_refused(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    git(repo / "bin", "init", "-q", "nested")
    (repo / "bin" / "nested" / "f").write_text("x")
    workspace.select(repo)  # not selected without --include-untracked
    with pytest.raises(WorkspaceError, match="bin/nested/"):
        workspace.select(repo, include_untracked=True)


def test_not_a_work_tree_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(WorkspaceError, match=f"{plain} is not inside a git work tree"):
        workspace.select(plain)
    with pytest.raises(WorkspaceError, match="does not exist"):
        workspace.select(tmp_path / "missing")
    git(tmp_path, "init", "-q", "--bare", "bare.git")
    with pytest.raises(WorkspaceError, match="bare"):
        workspace.select(tmp_path / "bare.git")


def stage(tmp_path: Path, sel: workspace.Selection, **kw: str) -> Path:
    dest = tmp_path / "staged"
    repostage.stage(sel, dest, **kw)
    return dest


def test_staged_checkout_is_clean_with_host_head_and_identity(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    dest = stage(tmp_path, workspace.select(repo))
    assert status(dest) == ""
    assert git(dest, "rev-parse", "HEAD") == git(repo, "rev-parse", "HEAD")
    assert git(dest, "symbolic-ref", "HEAD").strip() == "refs/heads/main"
    assert git(dest, "config", "--local", "user.name").strip() == "Ada Lovelace"
    assert git(dest, "config", "--local", "user.email").strip() == "ada@example.com"
    assert os.readlink(dest / "outside") == "/etc/passwd"
    assert os.stat(dest / "bin" / "run.sh").st_mode & 0o777 == 0o755
    assert not (dest / "notes.txt").exists() and not (dest / "debug.log").exists()
    assert "origin" not in git(dest, "remote")  # the host path means nothing in a guest
    # The history came along as bytes: the copy works with the host repo gone.
    shutil.rmtree(repo)
    assert git(dest, "log", "--format=%s").strip() == "first"
    git(dest, "fsck", "--no-progress")


def test_uncommitted_changes_come_along_as_on_the_host(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "README").write_text("changed, not staged\n")
    (repo / "staged.txt").write_text("added\n")
    git(repo, "add", "staged.txt")
    (repo / "bin" / "run.sh").unlink()
    dest = stage(tmp_path, workspace.select(repo))
    assert (dest / "README").read_text() == "changed, not staged\n"
    assert status(dest) == status(repo, "--untracked-files=no")
    assert status(dest) == " M README\n D bin/run.sh\nA  staged.txt\n"
    assert git(dest, "diff", "--cached", "--name-only") == "staged.txt\n"


def test_untracked_files_show_as_untracked(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    dest = stage(tmp_path, workspace.select(repo, include_untracked=True))
    assert status(dest) == "?? notes.txt\n"


def test_base_snapshot_is_the_staged_tree_and_leaves_the_index_alone(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "README").write_text("changed, not staged\n")
    dest = stage(tmp_path, workspace.select(repo, include_untracked=True))
    before = status(dest)
    base = git(dest, "rev-parse", repostage.BASE_REF).strip()
    assert git(dest, "rev-parse", f"{base}^").strip() == git(repo, "rev-parse", "HEAD").strip()
    # The snapshot holds exactly the staged work tree: uncommitted and untracked included.
    assert git(dest, "show", f"{base}:README") == "changed, not staged\n"
    assert git(dest, "show", f"{base}:notes.txt") == "untracked\n"
    assert git(dest, "diff", base, "--", "README", "bin") == ""  # tracked files match it
    assert status(dest) == before == " M README\n?? notes.txt\n"
    assert not (dest / ".git" / "banger-base-index").exists()


def test_same_size_edit_in_the_index_second_is_not_missed(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    git(repo, "status")  # the index is written now...
    (repo / "README").write_text("HELLO\n")  # ...and the file changed in the same second
    dest = stage(tmp_path, workspace.select(repo))
    assert status(dest) == " M README\n"


def test_guest_only_branch_from_ref(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    main = git(repo, "rev-parse", "main").strip()
    git(repo, "switch", "-q", "-c", "topic")
    (repo / "topic.txt").write_text("topic\n")
    git(repo, "add", "topic.txt")
    git(repo, "commit", "-q", "-m", "topic")
    (repo / "README").write_text("dirty on topic\n")
    dest = stage(tmp_path, workspace.select(repo, include_untracked=True), branch="feat",
                 from_ref="main")
    assert git(dest, "symbolic-ref", "--short", "HEAD").strip() == "feat"
    assert git(dest, "rev-parse", "HEAD").strip() == main
    assert not (dest / "topic.txt").exists()
    assert (dest / "README").read_text() == "hello\n"
    assert status(dest) == "?? notes.txt\n"
    assert "feat" not in git(repo, "branch", "--list")  # guest-only
    with pytest.raises(WorkspaceError, match="already exists"):
        repostage.stage(workspace.select(repo), tmp_path / "again", branch="main")
    with pytest.raises(WorkspaceError, match="not a commit"):
        repostage.stage(workspace.select(repo), tmp_path / "x", branch="b", from_ref="nope")


def test_branch_without_from_keeps_the_work_tree(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    (repo / "README").write_text("dirty\n")
    dest = stage(tmp_path, workspace.select(repo), branch="feat")
    assert git(dest, "symbolic-ref", "--short", "HEAD").strip() == "feat"
    assert status(dest) == " M README\n"


def test_linked_worktree(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    git(repo, "worktree", "add", "-q", "-b", "side", str(tmp_path / "wt"))
    sel = workspace.select(tmp_path / "wt")
    assert sel.branch == "side"
    dest = stage(tmp_path, sel)
    assert git(dest, "symbolic-ref", "--short", "HEAD").strip() == "side"
    assert status(dest) == ""


def test_directory_swapped_for_symlink_is_not_followed(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    sel = workspace.select(repo)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "run.sh").write_text("secret\n")
    shutil.rmtree(repo / "bin")
    os.symlink(secret, repo / "bin")
    with pytest.raises(WorkspaceError, match=r"bin/run\.sh"):
        repostage.stage(sel, tmp_path / "staged")


def debugfs(img: Path, request: str) -> str:
    return subprocess.run([disks.tool("debugfs"), "-R", request, str(img)],
                          capture_output=True, text=True, check=True).stdout


@NEEDS_E2FS
def test_work_disk_with_staged_repo(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    dest = stage(tmp_path, workspace.select(repo))
    img = tmp_path / "work.ext4"
    disks.build_work_disk(img, 64 << 20, {".banger/hostname": (b"box\n", 0o644)},
                          trees={"repo": dest})
    assert debugfs(img, "cat repo/README") == "hello\n"
    assert "Type: symlink" in debugfs(img, "stat repo/outside")
    assert 'Fast link dest: "/etc/passwd"' in debugfs(img, "stat repo/outside")
    for path in ("/repo", "/repo/.git", "/repo/.git/HEAD", "/repo/bin/run.sh"):
        info = disks.stat_in_image(img, path)
        assert (info.uid, info.gid) == (0, 0), path
    assert disks.stat_in_image(img, "/repo/bin/run.sh").mode == 0o100755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src-repo", "work.ext4"]


@NEEDS_E2FS
def test_work_disk_too_small_for_the_repo(tmp_path: Path) -> None:
    tree = tmp_path / "big"
    tree.mkdir()
    (tree / "blob").write_bytes(os.urandom(12 << 20))
    with pytest.raises(disks.DiskError, match="too small for its 12 MiB"):
        disks.build_work_disk(tmp_path / "w.ext4", 8 << 20, {}, trees={"repo": tree})
    assert not (tmp_path / "w.ext4").exists()


@NEEDS_E2FS
def test_tree_owned_by_root_when_built_by_a_user(tmp_path: Path) -> None:
    """The unshare -r path: a user's staged tree lands in the image as root's."""
    user = "bangertest"
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root to switch to an unprivileged test user")
    if subprocess.run(["id", user], capture_output=True).returncode != 0:
        if shutil.which("useradd") is None:
            pytest.skip("cannot create the unprivileged test user")
        subprocess.run(["useradd", "--create-home", user], check=True)
    if subprocess.run(["runuser", "-u", user, "--", "unshare", "-r", "true"],
                      capture_output=True).returncode != 0:
        pytest.skip("unprivileged user namespaces are disabled here")
    src = Path(workspace.__file__).parents[2]
    if any(not os.stat(p).st_mode & 0o005 for p in (src, *src.parents) if str(p) != "/"):
        pytest.skip(f"{src} is not readable by other users")
    out = Path(subprocess.run(["runuser", "-u", user, "--", "mktemp", "-d"], check=True,
                              capture_output=True, text=True).stdout.strip())
    try:
        code = (
            "import os; from pathlib import Path; from banger.host import disks\n"
            f"out = Path({str(out)!r}); t = out / 'tree'; (t / 'd').mkdir(parents=True)\n"
            "(t / 'd' / 'f').write_text('hi'); os.symlink('/etc/passwd', t / 'l')\n"
            f"disks.build_work_disk(out / 'w.ext4', {64 << 20}, {{}}, trees={{'repo': t}})\n")
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"
        res = subprocess.run(["runuser", "-u", user, "--", "env", f"PYTHONPATH={src}",
                              python, "-c", code], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        img = out / "w.ext4"
        for path in ("/repo", "/repo/d", "/repo/d/f", "/repo/l"):
            info = disks.stat_in_image(img, path)
            assert (info.uid, info.gid) == (0, 0), path
        assert "Type: symlink" in debugfs(img, "stat repo/l")
    finally:
        shutil.rmtree(out)


def test_staging_parent_prefers_tmpfs_only_when_small(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if not repostage.TMPFS.is_dir():
        pytest.skip(f"{repostage.TMPFS} does not exist here")
    sel = workspace.select(make_repo(tmp_path))
    ram = Path(tempfile.mkdtemp(dir=repostage.TMPFS))
    try:
        assert repostage.staging_parent(sel, tmp_path, ram) == ram
        assert repostage.staging_parent(sel, tmp_path, None) == tmp_path
        monkeypatch.setattr(repostage, "TMPFS_SHARE", 1 << 50)  # "memory is tiny"
        assert repostage.staging_parent(sel, tmp_path, ram) == tmp_path
    finally:
        ram.rmdir()


def test_repo_without_commits_and_detached_head(tmp_path: Path) -> None:
    repo = tmp_path / "fresh"
    git(tmp_path, "init", "-q", "-b", "main", "fresh")
    (repo / "a").write_text("x\n")
    git(repo, "add", "a")
    sel = workspace.select(repo)
    assert (sel.head, sel.branch) == (None, "main")
    dest = stage(tmp_path, sel)
    assert status(dest) == "A  a\n"
    git(repo, "-c", "user.name=a", "-c", "user.email=b@c", "commit", "-q", "-m", "1")
    git(repo, "checkout", "-q", "--detach")
    sel = workspace.select(repo)
    assert sel.branch is None and sel.head is not None
    repostage.stage(sel, tmp_path / "detached")
    assert git(tmp_path / "detached", "rev-parse", "HEAD").strip() == sel.head
    assert status(tmp_path / "detached") == ""
