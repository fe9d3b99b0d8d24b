"""The pending workspace of a never-started VM lives with its record, not in daemon memory.

A "restarted daemon" here is a second VMService with fresh fakes over the same SQLite
file and state directory: all it knows is what the first one wrote down.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from banger.core import pendingws
from banger.core.service import VMService
from banger.model.errors import OperationFailed
from banger.model.layout import Layout
from banger.model.vm import PendingWorkspace, VMSpec, VMState
from banger.ports import WorkspaceRequest
from tests.fakes import FakeDisks, FakeGuest, FakeWorkspace, agent_of, fake_service


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})


def daemon(tmp_path: Path, layout: Layout) -> tuple[VMService, FakeDisks, FakeGuest]:
    """A daemon started on the state directory (the previous one died or stopped)."""
    svc, _images, disks, _vmm, guest, _db = fake_service(tmp_path, layout)
    return svc, disks, guest


def make_repo(tmp_path: Path, name: str = "proj", text: str = "hi") -> Path:
    repo = tmp_path / name
    (repo / ".git").mkdir(parents=True)
    (repo / "README").write_text(text)
    return repo


def test_request_is_written_with_the_record(tmp_path: Path, layout: Layout) -> None:
    svc, *_ = daemon(tmp_path, layout)
    repo = make_repo(tmp_path)
    req = WorkspaceRequest(repo, include_untracked=True, branch="feat", from_ref="main",
                           bootstrap=False)
    vm = svc.create(name="ws", spec=VMSpec(), workspace=req, start=False)
    again, *_ = daemon(tmp_path, layout)
    assert again.resolve("ws").pending_workspace == PendingWorkspace(
        str(repo), include_untracked=True, branch="feat", from_ref="main", bootstrap=False)
    assert vm.pending_workspace == again.resolve("ws").pending_workspace


def test_restarted_daemon_still_copies_the_repo_in(tmp_path: Path, layout: Layout) -> None:
    first, first_disks, _ = daemon(tmp_path, layout)
    repo = make_repo(tmp_path)
    vm = first.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(repo), start=False)
    del first  # the daemon restarts between create and first start
    svc, disks, _ = daemon(tmp_path, layout)
    started = svc.start("ws")
    work_disk = layout.vm(vm.id).work_disk
    assert disks.work_trees[work_disk] == ("repo", [".git", "README"])
    assert first_disks.work_trees == {}
    # Nothing is pending once a work disk holds the repo, for this daemon or the next.
    assert started.pending_workspace is None
    assert daemon(tmp_path, layout)[0].resolve("ws").pending_workspace is None


def test_start_fails_naming_the_repo_when_it_is_gone(tmp_path: Path, layout: Layout) -> None:
    first, *_ = daemon(tmp_path, layout)
    repo = make_repo(tmp_path)
    vm = first.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(repo), start=False)
    shutil.rmtree(repo)
    svc, disks, _ = daemon(tmp_path, layout)
    with pytest.raises(OperationFailed) as err:
        svc.start("ws")
    msg = str(err.value)
    assert str(repo) in msg and "banger vm workspace prepare ws PATH" in msg, msg
    assert "banger vm delete ws" in msg and err.value.stage == "work_disk"
    rec = svc.resolve("ws")
    assert rec.state is VMState.ERROR and str(repo) in (rec.last_error or "")
    assert rec.last_error_stage == "work_disk"
    assert not layout.vm(vm.id).work_disk.exists() and disks.work_trees == {}
    # Kept: the VM still lacks its repo. Pointing it at one again is the fix.
    assert rec.pending_workspace is not None
    moved = make_repo(tmp_path, "moved", "moved here")
    svc.prepare_workspace("ws", WorkspaceRequest(moved))
    svc.start("ws")
    assert disks.work_trees[layout.vm(vm.id).work_disk] == ("repo", [".git", "README"])
    assert svc.resolve("ws").pending_workspace is None


def test_prepare_on_never_started_vm_survives_a_restart(tmp_path: Path,
                                                        layout: Layout) -> None:
    first, *_ = daemon(tmp_path, layout)
    vm = first.create(name="p", spec=VMSpec(), start=False)
    assert vm.pending_workspace is None
    repo = make_repo(tmp_path)
    first.prepare_workspace("p", WorkspaceRequest(repo))
    svc, disks, guest = daemon(tmp_path, layout)
    svc.start("p")
    assert disks.work_trees[layout.vm(vm.id).work_disk][0] == "repo"
    assert agent_of(svc).pushed == []


def test_start_cut_off_by_daemon_death_keeps_the_request(tmp_path: Path,
                                                         layout: Layout) -> None:
    """The daemon died during the start (before the work disk was made): reconcile
    demotes the VM and the next start copies the repo in."""
    first, *_ = daemon(tmp_path, layout)
    repo = make_repo(tmp_path)
    vm = first.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(repo), start=False)
    first.ctx.repo.update(vm.with_state(VMState.STARTING, 1.0))  # where the kill caught it
    svc, disks, _ = daemon(tmp_path, layout)
    (after,) = svc.reconcile()
    assert after.state is VMState.ERROR and after.pending_workspace is not None
    svc.start("ws")
    assert disks.work_trees[layout.vm(vm.id).work_disk][0] == "repo"
    assert svc.resolve("ws").pending_workspace is None


def test_work_disk_made_before_the_death_is_not_made_again(tmp_path: Path,
                                                           layout: Layout) -> None:
    """A work disk exists only complete: one a killed start made holds the repo, so
    the next start neither rebuilds it nor needs the repo (it may be gone since)."""
    first, *_ = daemon(tmp_path, layout)
    repo = make_repo(tmp_path)
    vm = first.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(repo), start=False)
    work_disk = layout.vm(vm.id).work_disk
    work_disk.write_bytes(b"ext4 with the repo")  # what the killed start left
    first.ctx.repo.update(vm.with_state(VMState.STARTING, 1.0))
    shutil.rmtree(repo)
    svc, disks, _ = daemon(tmp_path, layout)
    svc.reconcile()
    started = svc.start("ws")
    assert started.state is VMState.RUNNING and started.pending_workspace is None
    assert disks.work_trees == {} and work_disk.read_bytes() == b"ext4 with the repo"


def test_failed_first_start_keeps_the_request_on_disk(tmp_path: Path, layout: Layout) -> None:
    first, *_ = daemon(tmp_path, layout)
    repo = make_repo(tmp_path)
    first.ctx.failpoint = "wait_agent"  # after the work disk was made: its undo removes it
    with pytest.raises(OperationFailed):
        first.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(repo))
    assert first.resolve("ws").pending_workspace is not None
    svc, disks, _ = daemon(tmp_path, layout)
    vm = svc.start("ws")
    assert disks.work_trees[layout.vm(vm.id).work_disk][0] == "repo"


def test_service_keeps_no_workspace_in_memory(tmp_path: Path, layout: Layout) -> None:
    svc, *_ = daemon(tmp_path, layout)
    assert not any("pending" in name for name in vars(svc.ctx))


def test_tool_install_still_started_after_a_start_killed_past_the_work_disk(
        tmp_path: Path, layout: Layout) -> None:
    from banger.model.config import Config
    first, *_ = daemon(tmp_path, layout)
    repo = make_repo(tmp_path, "tools")
    (repo / ".tool-versions").write_text("python 3.12.1\n")
    vm = first.create(name="t", spec=VMSpec(nat=True), workspace=WorkspaceRequest(repo),
                      start=False)
    layout.vm(vm.id).work_disk.write_bytes(b"ext4 with the repo")  # the killed start's
    svc, disks, guest = daemon(tmp_path, layout)
    svc.ctx.load_config = lambda: Config(installer_url="http://10.0.2.2:9/i.sh")
    svc.start("t")
    assert disks.work_trees == {}  # not made again
    assert [b[1] for b in agent_of(svc).bootstraps] == ["/root/repo"]
    assert svc.resolve("t").pending_workspace is None


def test_host_key_trusted_before_the_work_disk_exists(tmp_path: Path, layout: Layout) -> None:
    """A daemon killed right after the work disk was made must not leave a disk whose
    host key no one trusts: the next start takes the disk as made and its ssh would
    refuse the guest."""
    svc, disks, guest = daemon(tmp_path, layout)
    trusted_at_build: list[bool] = []
    build = disks.build_work_disk

    def watched(path: Path, *args: object, **kwargs: object) -> None:
        trusted_at_build.append(layout.vm(vm_id[0]).names.ssh_alias in guest.trusted)
        build(path, *args, **kwargs)  # type: ignore[arg-type]

    disks.build_work_disk = watched  # type: ignore[method-assign]
    vm_id: list[str] = []
    svc.create(name="k", spec=VMSpec(), start=False, on_record=lambda v: vm_id.append(v.id))
    svc.start("k")
    assert trusted_at_build == [True]


def test_vm_run_reads_the_repo_once(tmp_path: Path, layout: Layout) -> None:
    svc, *_ = daemon(tmp_path, layout)
    repo = make_repo(tmp_path)
    svc.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(repo))  # create + start
    workspace = svc.ctx.host.workspace
    assert isinstance(workspace, FakeWorkspace)
    assert workspace.selected == [WorkspaceRequest(repo)]


def test_a_request_changed_since_the_create_read_is_read_again(tmp_path: Path,
                                                               layout: Layout) -> None:
    svc, *_ = daemon(tmp_path, layout)
    old, new = make_repo(tmp_path, "old"), make_repo(tmp_path, "new")
    vm = svc.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(new), start=False)
    stale = svc.ctx.host.workspace.select(WorkspaceRequest(old))
    chosen = pendingws.for_start(svc.ctx.host, vm, layout.vm(vm.id), just_read=stale)
    assert chosen is not None and chosen.repo == new
