"""Core use cases against stateful fakes, with a failure injected at every start stage."""

from __future__ import annotations

import signal
from dataclasses import replace
from pathlib import Path

import pytest

from banger.core.operations import Operations, Progress
from banger.core.service import VMService
from banger.core.startplan import StartContext, start_steps
from banger.model.errors import ConflictError, InvalidRequest, NotFoundError, OperationFailed
from banger.model.layout import Layout
from banger.model.vm import KernelKind, VMSpec, VMState
from banger.ports import ExecRequest, ListeningSocket, UserNet
from banger.store.vms import OperationLog, VMRepository
from tests.fakes import FakeVmm, agent_of, fake_service


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    layout = Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})
    svc, images, disks, vmm, guest, db = fake_service(tmp_path, layout)
    return svc, vmm, guest, disks, images, layout, db


def stage_names(svc: VMService, spec: VMSpec | None = None) -> list[str]:
    vm = svc.create(name="probe", spec=spec or VMSpec(), start=False)
    ctx = StartContext(vm=vm, paths=svc.layout.vm(vm.id), host=svc.host,
                       handles=svc.ctx.handles, clock=svc.ctx.clock)
    names = [s.name for s in start_steps(ctx)]
    svc.delete("probe")
    return names


def assert_no_runtime_leak(svc: VMService, vmm: FakeVmm, vm_id: str) -> None:
    paths = svc.layout.vm(vm_id)
    assert vmm.procs == {}, "a VMM process is left"
    assert not paths.control_socket.exists()
    assert not paths.sock_dir.exists()
    assert not paths.handles.exists()
    assert svc.ctx.handles.get(vm_id) is None


def test_microvm_kernel_boots_without_initramfs_and_cloud_with_it(  # type: ignore[no-untyped-def]
        env) -> None:
    svc, vmm = env[0], env[1]
    svc.create(name="fast", spec=VMSpec())
    boot = vmm.launched[-1].boot
    assert boot.kernel.name == "vmlinux-microvm" and boot.initrd is None
    slow = svc.create(name="slow", spec=VMSpec(kernel=KernelKind.CLOUD))
    boot = vmm.launched[-1].boot
    assert boot.kernel.name == "vmlinux" and boot.initrd is not None
    assert boot.initrd.name == "initrd.img"
    assert boot.cmdline == "init=/sbin/banger-init"
    assert slow.spec.kernel is KernelKind.CLOUD


def test_stage_names_are_banger_names(env) -> None:  # type: ignore[no-untyped-def]
    svc = env[0]
    assert stage_names(svc) == ["preflight", "cleanup_runtime", "socket_dir", "system_overlay",
                                "work_disk", "port_forward", "qemu_launch", "wait_agent",
                                "post_start_features"]


def test_create_start_stop_start_delete(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, disks, _, layout, _ = env
    events: list[Progress] = []
    vm = svc.create(name="box", spec=VMSpec(vcpus=2, memory_mib=1024), sink=events.append)
    assert vm.state is VMState.RUNNING and vm.boot_id
    oks = [e.stage for e in events if e.kind == "ok"]
    assert oks[-2:] == ["wait_agent", "post_start_features"]
    assert guest.ready_waits == [], "a start never waits for sshd"
    paths = layout.vm(vm.id)
    files = disks.work_files[paths.work_disk]
    assert files[".banger/hostname"][0] == b"box\n"
    assert files[".ssh/authorized_keys"][1] == 0o600
    assert files[".banger/ssh_host_ed25519_key"][1] == 0o600
    assert guest.trusted[paths.names.ssh_alias] == files[
        ".banger/ssh_host_ed25519_key.pub"][0].decode().strip()
    assert vmm.launched[0].vcpus == 2 and vmm.launched[0].memory_mib == 1024
    net = vmm.launched[0].net
    assert isinstance(net, UserNet) and net.outbound is False
    stopped = svc.stop("box")
    assert stopped.state is VMState.STOPPED
    assert_no_runtime_leak(svc, vmm, vm.id)
    assert paths.root_disk.exists() and paths.work_disk.exists(), "disks survive stop"
    again = svc.start("box")
    assert again.state is VMState.RUNNING and again.boot_id != vm.boot_id
    svc.delete("box")
    assert_no_runtime_leak(svc, vmm, vm.id)
    assert not paths.dir.exists()
    assert guest.forgotten == [paths.names.ssh_alias]
    assert guest.trusted == {}, "the pinned host key goes with the VM"
    with pytest.raises(NotFoundError):
        svc.resolve("box")


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-vm", "restart"])
def test_failure_at_every_stage_leaks_nothing(env, fresh: bool) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    for stage in stage_names(svc):
        name = f"fp-{stage.replace('_', '-')}"
        vm = svc.create(name=name, spec=VMSpec(), start=not fresh)
        if not fresh:
            svc.stop(name)
        paths = svc.layout.vm(vm.id)
        had_disks = paths.root_disk.exists()
        svc.ctx.failpoint = stage
        with pytest.raises(OperationFailed) as info:
            svc.start(name)
        svc.ctx.failpoint = None
        err = info.value
        assert err.stage == stage and err.op_id
        assert f"stage {stage!r}" in str(err) and "failpoint" in str(err)
        rec = svc.resolve(name)
        assert rec.state is VMState.ERROR
        assert rec.last_error_stage == stage and "failpoint" in (rec.last_error or "")
        assert_no_runtime_leak(svc, vmm, vm.id)
        # Disks found already there survive the rollback; disks this start made are gone.
        assert paths.root_disk.exists() == had_disks
        assert paths.work_disk.exists() == had_disks
        assert (paths.names.ssh_alias in guest.trusted) == had_disks
        # The op log names the failing stage too.
        op = svc.ops._oplog.get(err.op_id)  # type: ignore[attr-defined]
        assert op["stage"] == stage and op["status"] == "failed"
        # And the VM starts cleanly afterwards.
        assert svc.start(name).state is VMState.RUNNING
        svc.delete(name)
        assert_no_runtime_leak(svc, vmm, vm.id)


def test_vmm_dies_right_after_launch(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, *_ = env
    vmm.die_on_launch = True
    with pytest.raises(OperationFailed, match="wait_agent") as info:
        svc.create(name="dies", spec=VMSpec())
    assert "exited" in str(info.value)
    vm = svc.resolve("dies")
    assert vm.state is VMState.ERROR and vm.last_error_stage == "wait_agent"
    assert_no_runtime_leak(svc, vmm, vm.id)


def test_readiness_is_the_agents_hello_and_its_boot_id_is_the_guests(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    events: list[Progress] = []
    vm = svc.create(name="hi", spec=VMSpec(), sink=events.append)
    (pid,) = vmm.procs
    paths = svc.layout.vm(vm.id)
    agent = svc.host.agent
    assert agent.waits == [paths.agent_socket]  # type: ignore[attr-defined]
    # The boot id banger records is the one the guest's kernel gave itself.
    assert vm.boot_id == f"guest-boot-{pid}"
    h = svc.ctx.handles.get(vm.id)
    assert h is not None and h.boot_id == vm.boot_id and h.agent == str(paths.agent_socket)
    kinds = [(e.kind, e.stage) for e in events]
    assert kinds.index(("ok", "wait_agent")) < kinds.index(("run", "post_start_features"))
    (said,) = [e.message for e in events if e.kind == "detail" and e.stage == "wait_agent"]
    assert said is not None and "said hello after" in said and vm.boot_id in said


def test_vmm_dies_while_waiting_for_the_agent(env) -> None:  # type: ignore[no-untyped-def]
    # The guest booted part way, then its VMM died: the wait ends at once (not at the
    # ready timeout), the start fails at wait_agent and everything is rolled back.
    import time

    svc, vmm, guest, *_ = env
    agent = svc.host.agent
    agent.hello_delay = 30.0  # type: ignore[attr-defined]
    polls = []

    def die_on_third_poll() -> None:
        polls.append(1)
        if len(polls) == 3:
            vmm.procs.clear()

    agent.on_poll = die_on_third_poll  # type: ignore[attr-defined]
    started = time.monotonic()
    with pytest.raises(OperationFailed, match="exited") as info:
        svc.create(name="dies-booting", spec=VMSpec())
    assert time.monotonic() - started < 10
    assert info.value.stage == "wait_agent"
    vm = svc.resolve("dies-booting")
    assert vm.state is VMState.ERROR and vm.last_error_stage == "wait_agent"
    assert_no_runtime_leak(svc, vmm, vm.id)
    assert not svc.layout.vm(vm.id).agent_socket.exists()


def test_wedged_vmm_fails_readiness_at_once(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, *_ = env
    vmm.stuck_status = "internal-error"
    with pytest.raises(OperationFailed, match="internal-error") as info:
        svc.create(name="wedged", spec=VMSpec())
    assert info.value.stage == "wait_agent"
    assert_no_runtime_leak(svc, vmm, svc.resolve("wedged").id)


def test_root_cause_kept_when_undo_fails(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, disks, *_ = env
    vmm.launch_error = RuntimeError("qemu: could not open kernel")
    svc.create(name="x", spec=VMSpec(), start=False)
    paths = svc.layout.vm(svc.resolve("x").id)
    paths.dir.chmod(0o500)  # undo of work_disk/system_overlay cannot unlink
    try:
        with pytest.raises(OperationFailed) as info:
            svc.start("x")
    finally:
        paths.dir.chmod(0o700)
    import os
    if os.geteuid() == 0:
        # root ignores the mode bits: the undo succeeds and only the cause is reported.
        assert "could not open kernel" in str(info.value)
    else:
        assert "could not open kernel" in str(info.value) and "cleanup also failed" in str(
            info.value)
    assert info.value.stage == "qemu_launch"


def test_bad_input_creates_nothing(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, _, _, _, layout, _ = env
    cases = [
        ({"name": "Bad_Name", "spec": VMSpec()}, "DNS label"),
        ({"name": "ok", "spec": VMSpec(memory_mib=-1)}, "--memory"),
        ({"name": "ok", "spec": VMSpec(vcpus=0)}, "--vcpu"),
        ({"name": "ok", "spec": VMSpec(memory_mib=10**8)}, "--memory"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(InvalidRequest, match=needle):
            svc.create(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="unknown image 'nope'"):
        svc.create(name="ok", spec=VMSpec(image="nope"))
    assert svc.list_vms() == []
    assert vmm.launched == []
    assert not (layout.state_dir / "vms").exists() or not any((layout.state_dir / "vms").iterdir())
    svc.create(name="dup", spec=VMSpec(), start=False)
    with pytest.raises(ConflictError, match="already exists"):
        svc.create(name="dup", spec=VMSpec(), start=False)
    assert len(svc.list_vms()) == 1


def test_stop_escalates_poweroff_then_quit_then_kill(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    svc.create(name="a", spec=VMSpec())
    agent_of(svc).poweroff_works = False
    svc.stop("a")
    assert vmm.quits == 1 and vmm.procs == {}
    svc.start("a")
    vmm.ignore_quit = True
    svc.stop("a")
    assert vmm.procs == {}  # killed at the last deadline
    assert svc.resolve("a").state is VMState.STOPPED


def test_kill_ends_stopped_with_signal(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, *_ = env
    vm = svc.create(name="k", spec=VMSpec())
    pid = next(iter(vmm.procs))
    proc = vmm.procs[pid]
    out = svc.kill("k", signal=signal.SIGTERM)
    assert out.state is VMState.STOPPED and proc.signals == [signal.SIGTERM]
    assert_no_runtime_leak(svc, vmm, vm.id)


def test_set_only_when_stopped(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, *_ = env
    svc.create(name="s", spec=VMSpec())
    with pytest.raises(ConflictError, match="stop it first"):
        svc.set("s", vcpus=2)
    svc.stop("s")
    assert svc.set("s", vcpus=2, memory_mib=1024).spec.vcpus == 2
    with pytest.raises(InvalidRequest, match="--memory"):
        svc.set("s", memory_mib=-5)
    svc.start("s")
    assert vmm.launched[-1].vcpus == 2 and vmm.launched[-1].memory_mib == 1024


def test_observed_state_demotes_dead_vmm(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, *_ = env
    vm = svc.create(name="o", spec=VMSpec())
    vmm.procs.clear()  # the VMM died behind our back
    view = svc.show("o")
    assert view.vm.state is VMState.STOPPED and view.vm.last_error == "the VMM process exited"
    assert_no_runtime_leak(svc, vmm, vm.id)


def test_reconcile_keeps_live_vm_with_corrupt_handles(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, disks, images, layout, db = env
    vm = svc.create(name="live", spec=VMSpec())
    dead = svc.create(name="dead", spec=VMSpec())
    pid = svc.ctx.handles.get(vm.id).pid  # type: ignore[union-attr]
    layout.vm(vm.id).handles.write_text("{not json")
    # The dead VM's VMM vanished while the daemon was down.
    dead_pid = svc.ctx.handles.get(dead.id).pid  # type: ignore[union-attr]
    del vmm.procs[dead_pid]
    # A new daemon: fresh service over the same DB and OS.
    svc2 = VMService(repo=VMRepository(db), ops=Operations(OperationLog(db)), host=svc.host,
                     layout=layout)
    states = {v.name: v.state for v in svc2.reconcile()}
    assert states == {"live": VMState.RUNNING, "dead": VMState.STOPPED}
    h = svc2.ctx.handles.get(vm.id)
    assert h is not None and h.pid == pid
    assert h.agent == str(layout.vm(vm.id).agent_socket), "the agent's channel is found too"
    assert svc2.show("live").handles is not None
    assert not layout.vm(dead.id).sock_dir.exists()


def test_reconcile_finishes_half_started(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, disks, images, layout, db = env
    vm = svc.create(name="half", spec=VMSpec())
    # The record a daemon killed mid-start leaves, its VMM still running (forged: no use
    # case moves a running VM back to starting).
    svc.ctx.repo.update(replace(vm, state=VMState.STARTING, updated_at=5.0))
    states = {v.name: v.state for v in svc.reconcile()}
    assert states["half"] is VMState.ERROR
    assert_no_runtime_leak(svc, vmm, vm.id)


def test_batch_resolves_once_dedupes_and_reports_each(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, *_ = env
    a = svc.create(name="a", spec=VMSpec())
    svc.create(name="b", spec=VMSpec())
    results = svc.batch("stop", ["a", "nope", a.id, "b"])
    assert [r.ref for r in results] == ["a", "nope", "b"]
    assert results[1].error is not None and isinstance(results[1].error, NotFoundError)
    assert all(r.vm and r.vm.state is VMState.STOPPED for r in (results[0], results[2]))
    assert vmm.procs == {}


def test_prune_keeps_running(env) -> None:  # type: ignore[no-untyped-def]
    svc, *_ = env
    svc.create(name="run", spec=VMSpec())
    svc.create(name="idle", spec=VMSpec(), start=False)
    svc.create(name="stopped", spec=VMSpec())
    svc.stop("stopped")
    removed = sorted(r.vm.name for r in svc.prune() if r.vm)
    assert removed == ["idle", "stopped"]
    assert [v.vm.name for v in svc.list_vms()] == ["run"]


def test_image_built_on_first_use_with_progress(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, disks, images, *_ = env
    images.built = False
    seen: list[Progress] = []
    svc.create(name="img", spec=VMSpec(), sink=seen.append)
    assert images.builds == 1
    assert any(p.kind == "detail" and p.stage == "preflight" for p in seen)
    svc.create(name="img2", spec=VMSpec())
    assert images.builds == 1


def test_resolve_by_id_prefix_and_ambiguity(env) -> None:  # type: ignore[no-untyped-def]
    svc, *_ = env
    vm = svc.create(name="p", spec=VMSpec(), start=False)
    assert svc.resolve(vm.id[:6]).id == vm.id
    with pytest.raises(NotFoundError, match="vm list"):
        svc.resolve("zzzz")


def test_in_flight_operations_listed(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    seen: list[list[str]] = []

    def sink(p: Progress) -> None:
        if p.stage == "wait_agent" and p.kind == "run":
            seen.append([o.kind for o in svc.ops.in_flight()])

    svc.create(name="f", spec=VMSpec(), sink=sink)
    assert seen == [["start"]]
    assert svc.ops.in_flight() == []


def test_workspace_copied_onto_the_work_disk(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.ports import WorkspaceRequest
    svc, vmm, guest, disks, *_ = env
    repo = tmp_path / "proj"
    (repo / ".git").mkdir(parents=True)
    (repo / "README").write_text("hi")
    events: list[Progress] = []
    vm = svc.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(repo),
                    sink=events.append)
    assert vm.workspace_path == str(repo) and vm.workspace_guest_path == "/root/repo"
    paths = svc.layout.vm(vm.id)
    assert disks.work_trees[paths.work_disk] == ("repo", [".git", "README"])
    assert any(e.kind == "detail" and "copying" in (e.message or "") for e in events)
    assert svc.host.workspace.staged_dirs and not any(  # type: ignore[attr-defined]
        d.exists() for d in svc.host.workspace.staged_dirs)  # type: ignore[attr-defined]
    assert svc.resolve("ws").workspace_guest_path == "/root/repo"


def test_bad_workspace_refused_before_anything_exists(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.ports import WorkspaceRequest
    svc, vmm, *_ = env
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(InvalidRequest, match="not inside a git work tree"):
        svc.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(plain))
    assert svc.list_vms() == [] and vmm.launched == []


def test_workspace_survives_a_failed_first_start(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.ports import WorkspaceRequest
    svc, vmm, guest, disks, *_ = env
    repo = tmp_path / "proj"
    (repo / ".git").mkdir(parents=True)
    svc.ctx.failpoint = "wait_agent"
    with pytest.raises(OperationFailed):
        svc.create(name="ws", spec=VMSpec(), workspace=WorkspaceRequest(repo))
    svc.ctx.failpoint = None
    vm = svc.start("ws")
    assert disks.work_trees[svc.layout.vm(vm.id).work_disk][0] == "repo"


def test_prepare_workspace_on_running_vm(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.ports import WorkspaceRequest
    svc, vmm, guest, *_ = env
    repo = tmp_path / "proj"
    (repo / ".git").mkdir(parents=True)
    (repo / "a.txt").write_text("a")
    svc.create(name="p", spec=VMSpec())
    vm = svc.prepare_workspace("p", WorkspaceRequest(repo))
    assert vm.workspace_guest_path == "/root/repo"
    assert agent_of(svc).pushed == [(svc.layout.vm(vm.id).agent_socket, "/root/repo",
                                     [".git", "a.txt"])]
    op = svc.ops._oplog.get(vm.last_op_id)  # type: ignore[attr-defined]
    assert op["kind"] == "workspace_prepare" and op["status"] == "ok"
    assert agent_of(svc).bootstraps == []  # no tool files


def test_prepare_workspace_on_stopped_vm_lands_at_next_start(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.ports import WorkspaceRequest
    svc, vmm, guest, *_ = env
    repo = tmp_path / "proj"
    (repo / ".git").mkdir(parents=True)
    (repo / "a.txt").write_text("as prepared")
    vm = svc.create(name="p", spec=VMSpec())
    svc.stop("p")
    seen: list[Progress] = []
    svc.prepare_workspace("p", WorkspaceRequest(repo), sink=seen.append)
    assert agent_of(svc).pushed == []
    assert any("next starts" in (e.message or "") for e in seen)
    pending = svc.layout.vm(vm.id).pending_workspace
    # What the host had at prepare time is what lands, not what it has at start time.
    (repo / "a.txt").write_text("changed later")
    assert (pending / "repo" / "a.txt").read_text() == "as prepared"
    stages: list[str] = []
    svc.start("p", sink=lambda e: stages.append(e.stage) if e.kind == "ok" else None)
    assert "workspace_sync" in stages
    assert stages.index("workspace_sync") > stages.index("wait_agent")
    assert agent_of(svc).pushed == [(svc.layout.vm(vm.id).agent_socket, "/root/repo",
                                     [".git", "a.txt"])]
    assert not pending.exists()
    svc.restart("p")  # pushed once, not at every start
    assert len(agent_of(svc).pushed) == 1


def test_prepare_workspace_failed_sync_is_kept_for_the_next_start(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.ports import WorkspaceRequest
    svc, vmm, guest, *_ = env
    repo = tmp_path / "proj"
    (repo / ".git").mkdir(parents=True)
    vm = svc.create(name="p", spec=VMSpec())
    svc.stop("p")
    svc.prepare_workspace("p", WorkspaceRequest(repo))
    svc.ctx.failpoint = "wait_agent"
    with pytest.raises(OperationFailed, match="wait_agent"):
        svc.start("p")
    svc.ctx.failpoint = None
    assert svc.layout.vm(vm.id).pending_workspace.exists()
    assert not vmm.procs  # rolled back
    svc.start("p")
    assert not svc.layout.vm(vm.id).pending_workspace.exists()


def test_prepare_workspace_on_never_started_vm_goes_on_the_work_disk(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.ports import WorkspaceRequest
    svc, vmm, guest, disks, *_ = env
    repo = tmp_path / "proj"
    (repo / ".git").mkdir(parents=True)
    vm = svc.create(name="p", spec=VMSpec(), start=False)
    svc.prepare_workspace("p", WorkspaceRequest(repo))
    svc.start("p")
    assert disks.work_trees[svc.layout.vm(vm.id).work_disk][0] == "repo"
    assert agent_of(svc).pushed == []


def _tool_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "tools"
    (repo / ".git").mkdir(parents=True)
    (repo / ".tool-versions").write_text("python 3.12.1\n")
    return repo


def test_bootstrap_without_network_refused_before_anything_exists(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.ports import WorkspaceRequest
    svc, vmm, guest, *_ = env
    repo = _tool_repo(tmp_path)
    with pytest.raises(InvalidRequest, match=r"\.tool-versions.*--nat.*--no-bootstrap"):
        svc.create(name="t", spec=VMSpec(), workspace=WorkspaceRequest(repo))
    assert svc.list_vms() == [] and vmm.launched == []
    svc.create(name="t", spec=VMSpec(), workspace=WorkspaceRequest(repo, bootstrap=False))
    assert agent_of(svc).bootstraps == []


def test_bootstrap_started_after_the_workspace_lands(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.model.config import Config
    from banger.ports import WorkspaceRequest
    svc, vmm, guest, *_ = env
    svc.ctx.load_config = lambda: Config(installer_url="http://10.0.2.2:9/i.sh")
    repo = _tool_repo(tmp_path)
    stages: list[str] = []
    vm = svc.create(name="t", spec=VMSpec(nat=True), workspace=WorkspaceRequest(repo),
                    sink=lambda e: stages.append(e.stage) if e.kind == "ok" else None)
    channel = svc.layout.vm(vm.id).agent_socket
    assert stages[-1] == "tool_bootstrap"
    assert agent_of(svc).bootstraps == [(channel, "/root/repo", "http://10.0.2.2:9/i.sh")]
    svc.restart("t")  # installs once, not at every start
    assert len(agent_of(svc).bootstraps) == 1
    svc.prepare_workspace("t", WorkspaceRequest(repo))  # running: push, then install
    assert len(agent_of(svc).bootstraps) == 2
    svc.stop("t")
    svc.prepare_workspace("t", WorkspaceRequest(repo))  # stopped: at the next start
    assert len(agent_of(svc).bootstraps) == 2
    svc.start("t")
    assert len(agent_of(svc).bootstraps) == 3
    assert not svc.layout.vm(vm.id).pending_workspace.exists()
    # A VM without network refuses a prepare that would need one.
    svc.create(name="offline", spec=VMSpec())
    with pytest.raises(InvalidRequest, match="--nat"):
        svc.prepare_workspace("offline", WorkspaceRequest(repo))


def test_file_sync_at_every_start_and_bad_config_aborts(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from banger.model.config import Config, ConfigError, FileSync
    svc, vmm, guest, *_ = env
    entries = (FileSync(tmp_path / "there", "/root/.there"),
               FileSync(tmp_path / "missing", "/root/.missing"))
    (tmp_path / "there").write_text("x")
    svc.ctx.load_config = lambda: Config(file_sync=entries)
    seen: list[Progress] = []
    svc.create(name="fs", spec=VMSpec(), sink=seen.append)
    svc.restart("fs")
    assert [len(e) for _, e in agent_of(svc).synced] == [2, 2]  # at every start
    assert any(p.kind == "detail" and "does not exist" in (p.message or "") for p in seen)

    def broken() -> Config:
        raise ConfigError("config.toml: file_sync entry 1: needs string keys host and guest")

    svc.ctx.load_config = broken
    svc.stop("fs")
    with pytest.raises(OperationFailed, match="needs string keys") as info:
        svc.start("fs")
    assert info.value.stage == "preflight"
    assert_no_runtime_leak(svc, vmm, svc.resolve("fs").id)


def test_git_identity_on_the_work_disk_and_resent_only_when_changed(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, disks, *_ = env
    guest.identity = {"user.name": "Ada", "user.email": "ada@x"}
    vm = svc.create(name="id", spec=VMSpec())
    files = disks.work_files[svc.layout.vm(vm.id).work_disk]
    assert files[".gitconfig"][0] == b'[user]\n\temail = "ada@x"\n\tname = "Ada"\n'
    assert guest.identity_asked == 1, "a fresh work disk's identity is not asked again"
    svc.restart("id")
    assert guest.identity_asked == 2, "a restart asks: the host's may have changed"
    assert agent_of(svc).synced == [], "nothing changed: nothing sent at start"
    guest.identity = {"user.name": "Ada L", "user.email": "ada@x"}
    svc.restart("id")
    assert agent_of(svc).identity_sent == [{"user.name": "Ada L", "user.email": "ada@x"}]
    svc.restart("id")
    assert len(agent_of(svc).identity_sent) == 1


def test_ports_of_a_running_vm(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    svc.create(name="web", spec=VMSpec())
    agent_of(svc).sockets = [ListeningSocket("tcp", "0.0.0.0", 22, "sshd"),
                             ListeningSocket("tcp", "*", 8080, "busybox"),
                             ListeningSocket("tcp", "127.0.0.1", 5432, "postgres")]
    vm, views = svc.ports("web")
    assert vm.name == "web"
    port = vmm.launched[-1].net.ssh_port  # type: ignore[union-attr]
    assert agent_of(svc).listening_asked == [svc.layout.vm(vm.id).agent_socket]
    got = {v.socket.port: v for v in views}
    assert got[22].endpoint == f"127.0.0.1:{port}"
    assert got[8080].endpoint is None and "user networking" in (got[8080].note or "")
    assert got[5432].endpoint is None and got[5432].note == "guest loopback only"


def test_ports_refuses_a_vm_that_is_not_running(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    svc.create(name="idle", spec=VMSpec(), start=False)
    with pytest.raises(ConflictError, match=r"'idle' is created, not running.*"
                                            r"`banger vm start idle`"):
        svc.ports("idle")
    svc.start("idle")
    svc.stop("idle")
    with pytest.raises(ConflictError, match="stopped, not running"):
        svc.ports("idle")
    # A VMM that died behind banger's back is observed, not asked through its agent.
    svc.start("idle")
    vmm.procs.clear()
    with pytest.raises(ConflictError, match="`banger vm start idle`"):
        svc.ports("idle")
    assert agent_of(svc).listening_asked == []
    with pytest.raises(NotFoundError):
        svc.ports("nope")


def test_prune_keeps_a_vm_that_started_while_prune_waited_for_it(env) -> None:  # type: ignore[no-untyped-def]
    # `vm prune` (say, a nightly cron job) while a VM restarts: listed as starting, the
    # VM is running by the time prune has its lock; it must not be deleted then.
    import threading
    import time

    svc, vmm, guest, *_ = env
    svc.create(name="dev", spec=VMSpec(), start=False)
    agent_of(svc).hello_delay = 0.5
    booting = threading.Thread(target=svc.start, args=("dev",))
    booting.start()
    deadline = time.monotonic() + 10
    while svc.show("dev").vm.state is not VMState.STARTING:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    results = svc.prune()
    booting.join(10)
    assert [v.vm.name for v in svc.list_vms()] == ["dev"], "a running VM was pruned"
    assert svc.show("dev").vm.state is VMState.RUNNING and vmm.procs
    assert results[0].error is not None and "kept" in str(results[0].error)


def test_delete_survives_a_serial_log_copy_landing_during_it(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The serial-log cap (a thread of its own) writes serial.log.1 into the VM's directory
    # when the guest's log passed its cap; its copy may land after rmtree listed the
    # directory, which then cannot be removed.
    import shutil

    import banger.core.lifecycle as service_module

    svc, *_ = env
    vm = svc.create(name="noisy", spec=VMSpec())
    paths = svc.layout.vm(vm.id)
    real = shutil.rmtree
    calls = []

    def rmtree_while_the_cap_copies(path, ignore_errors=False):  # type: ignore[no-untyped-def]
        real(path, ignore_errors=ignore_errors)
        if path == paths.dir and not calls:  # the cap's os.replace(tmp, serial.log.1), late
            calls.append(path)
            paths.dir.mkdir(parents=True, exist_ok=True)
            paths.serial_log_rotated.write_text("older console output")

    monkeypatch.setattr(service_module.shutil, "rmtree", rmtree_while_the_cap_copies)
    svc.delete("noisy")
    assert not paths.dir.exists() and svc.list_vms() == []


def test_ssh_target_waits_for_sshd_once_per_boot(env) -> None:  # type: ignore[no-untyped-def]
    # A start ends at the agent's HELLO; a person's ssh waits for sshd the first time
    # after each boot, and not again.
    svc, vmm, guest, *_ = env
    vm = svc.create(name="s", spec=VMSpec())
    assert guest.ready_waits == []
    shown = svc.ssh_view("s")
    assert shown.handles is not None and guest.ready_waits == [shown.handles.endpoint]
    svc.ssh_view("s")
    assert len(guest.ready_waits) == 1, "seen ready on this boot: no second wait"
    svc.restart("s")
    svc.ssh_view("s")
    assert len(guest.ready_waits) == 2, "a new boot waits again"
    guest.ready_error = RuntimeError("SSH on 127.0.0.1:1 not ready after 30 s\nlast lines")
    svc.restart("s")
    with pytest.raises(OperationFailed, match=r"sshd in VM 's' did not take banger's key "
                                              r"within 30 s(.|\n)*vm exec s(.|\n)*last lines"):
        svc.ssh_view("s")
    svc.stop("s")
    with pytest.raises(ConflictError, match="'s' is stopped, not running"):
        svc.ssh_view("s")
    assert vm.name == "s"


def test_ssh_config_answer_waits_for_each_running_vms_sshd_once(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    svc.create(name="a", spec=VMSpec())
    svc.create(name="b", spec=VMSpec())
    svc.create(name="idle", spec=VMSpec(), start=False)
    svc.await_sshd()
    assert len(guest.ready_waits) == 2, "each running VM's sshd, not the stopped one's"
    svc.await_sshd()
    assert len(guest.ready_waits) == 2
    guest.ready_error = RuntimeError("no sshd in this image")
    svc.restart("a")
    svc.await_sshd()  # no error: the config is still answered
    svc.await_sshd()
    assert len(guest.ready_waits) == 3, "a VM without sshd is passed over once a boot"


def test_a_guest_that_never_answers_poweroff_costs_one_deadline(env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A guest that takes POWEROFF and never answers: the step's deadline covers the ask
    and the wait for the VMM's exit together (not one each), then the VMM is quit."""
    import dataclasses
    import time

    svc, vmm, *_ = env
    svc.create(name="p", spec=VMSpec())
    svc.ctx.timeouts = dataclasses.replace(svc.ctx.timeouts, guest_poweroff=0.2)
    waits: list[float] = []

    def silent(*, channel: Path, timeout: float) -> None:
        time.sleep(timeout)
        raise OperationFailed("POWEROFF: no answer")

    real_wait = vmm.wait_exit

    def wait_exit(pid: int, timeout: float) -> bool:
        waits.append(timeout)
        return real_wait(pid, timeout)

    monkeypatch.setattr(agent_of(svc), "poweroff", silent)
    monkeypatch.setattr(vmm, "wait_exit", wait_exit)
    svc.stop("p")
    assert vmm.quits == 1 and vmm.procs == {}
    assert waits[0] < 0.2  # what was left of the poweroff step's deadline


def test_what_was_seen_of_a_boots_sshd_goes_with_the_boot(env) -> None:  # type: ignore[no-untyped-def]
    # The daemon lives for weeks: a stopped or deleted VM's boots leave nothing behind.
    svc, _vmm, guest, *_ = env
    svc.create(name="s", spec=VMSpec())
    other = svc.create(name="o", spec=VMSpec())
    svc.ssh_view("s")
    svc.ssh_view("o")
    assert len(svc.ctx.sshd_ready) == 2
    svc.stop("s")
    assert [k[0] for k in svc.ctx.sshd_ready] == [other.id], "only the running VM's boot"
    svc.start("s")
    svc.ssh_view("s")
    svc.restart("s")
    assert [k[0] for k in svc.ctx.sshd_ready] == [other.id]
    svc.delete("o")
    svc.ssh_view("s")
    guest.ready_error = RuntimeError("no sshd")  # a boot seen without sshd is kept too
    svc.restart("s")
    svc.await_sshd()
    assert list(svc.ctx.sshd_ready.values()) == [False]
    svc.delete("s")
    assert svc.ctx.sshd_ready == {}


def test_a_guest_agents_errors_name_the_vm(env) -> None:  # type: ignore[no-untyped-def]
    # The agent port knows only its channel; a user with several VMs is told which one
    # broke the protocol, stalled or refused.
    svc, *_ = env
    vm = svc.create(name="box", spec=VMSpec())
    agent = agent_of(svc)
    with pytest.raises(OperationFailed, match=r"^VM 'box': the guest agent could not start "
                                              r"nosuch"):
        svc.exec("box", ExecRequest(("nosuch",), {}))
    ran = svc.exec("box", ExecRequest(("sleep",), {}))
    (ex,) = agent.execs[svc.layout.vm(vm.id).agent_socket]
    ex.failure = "the guest agent broke the protocol: STDOUT on chan 9"
    with pytest.raises(OperationFailed, match=r"^VM 'box': the guest agent broke the "
                                              r"protocol: STDOUT on chan 9$"):
        ran.next(5)
    agent.stats_error = OperationFailed("could not read stats from the guest agent on "
                                        "/run/x: no answer within 10 s")
    with pytest.raises(OperationFailed, match=r"^VM 'box': could not read stats"):
        svc.stats("box", interval=0.0)
    with pytest.raises(InvalidRequest, match=r"^VM 'box': the guest agent refused FILE_PUT"):
        svc.put_files("box", "/root", [b"not a tar" * 100])
    with pytest.raises(InvalidRequest, match=r"^VM 'box': the guest agent refused FILE_GET"):
        b"".join(svc.get_files("box", "/nope"))
