"""Stop, kill, restart and workspace prepare run as step lists: their stages, the progress
users see, details under the step that speaks, and a runtime release that keeps every
failure (against stateful fakes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger.core.operations import Progress
from banger.core.stages import LABELS, Stage
from banger.model.config import Config, FileSync, NetworkConfig
from banger.model.errors import OperationFailed
from banger.model.layout import Layout
from banger.model.vm import NetworkMode, VMSpec, VMState
from banger.ports import WorkspaceRequest
from tests.fakes import FakeNet, agent_of, fake_service
from tests.unit.test_core_vms import assert_no_runtime_leak


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    layout = Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})
    svc, images, disks, vmm, guest, db = fake_service(
        tmp_path, layout, load_config=lambda: Config(network=NetworkConfig(bridge="bgt0")))
    net = svc.host.net
    assert isinstance(net, FakeNet)
    return svc, vmm, guest, net, tmp_path


def steps_of(events: list[Progress]) -> list[tuple[str, str]]:
    return [(e.kind, e.stage) for e in events if e.kind != "detail"]


def test_stop_powers_off_and_releases(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    vm = svc.create(name="a", spec=VMSpec())
    seen: list[Progress] = []
    svc.stop("a", sink=seen.append)
    assert steps_of(seen) == [("run", "guest_poweroff"), ("ok", "guest_poweroff"),
                              ("run", "release_runtime"), ("ok", "release_runtime")]
    assert seen[0].label == LABELS[Stage.GUEST_POWEROFF]
    assert_no_runtime_leak(svc, vmm, vm.id)


def test_stop_escalation_is_reported_step_by_step(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    svc.create(name="a", spec=VMSpec())
    agent_of(svc).poweroff_works = False
    seen: list[Progress] = []
    svc.stop("a", sink=seen.append)
    assert steps_of(seen) == [("run", "guest_poweroff"), ("failed", "guest_poweroff"),
                              ("run", "vmm_quit"), ("ok", "vmm_quit"),
                              ("run", "release_runtime"), ("ok", "release_runtime")]
    failed = next(e for e in seen if e.kind == "failed")
    assert "did not power off" in (failed.message or "")
    assert "the channel closed" in (failed.message or ""), "the reason is said"
    svc.start("a")
    vmm.ignore_quit = True
    seen.clear()
    assert svc.stop("a", sink=seen.append).state is VMState.STOPPED
    assert [k for k, s in steps_of(seen) if s == "vmm_quit"] == ["run", "failed"]
    assert steps_of(seen)[-1] == ("ok", "release_runtime") and vmm.procs == {}


def test_kill_signals_then_releases(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, *_ = env
    vm = svc.create(name="a", spec=VMSpec())
    seen: list[Progress] = []
    svc.kill("a", sink=seen.append)
    assert steps_of(seen) == [("run", "vmm_signal"), ("ok", "vmm_signal"),
                              ("run", "release_runtime"), ("ok", "release_runtime")]
    assert_no_runtime_leak(svc, vmm, vm.id)
    seen.clear()
    svc.kill("a", sink=seen.append)  # nothing runs: nothing to signal
    assert steps_of(seen) == [("run", "release_runtime"), ("ok", "release_runtime")]


def test_restart_is_the_stop_steps_then_the_start_steps(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, *_ = env
    svc.create(name="r", spec=VMSpec())
    seen: list[Progress] = []
    svc.restart("r", sink=seen.append)
    ran = [s for k, s in steps_of(seen) if k == "run"]
    assert ran == ["guest_poweroff", "release_runtime", "preflight", "cleanup_runtime",
                   "socket_dir", "system_overlay", "work_disk", "port_forward",
                   "qemu_launch", "wait_agent", "post_start_features"]
    ops = {svc.ctx.ops._oplog.get(e.op_id)["kind"]  # type: ignore[attr-defined]
           for e in seen}
    assert ops == {"stop", "start"}
    assert svc.resolve("r").state is VMState.RUNNING


def test_every_detail_is_under_the_step_that_runs(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, net, tmp_path = env
    images = svc.host.images
    images.built = False  # type: ignore[attr-defined]
    svc.ctx.load_config = lambda: Config(
        network=NetworkConfig(bridge="bgt0"), installer_url="http://10.0.2.2:9/i.sh",
        file_sync=(FileSync(tmp_path / "missing", "/root/.missing"),))
    repo = tmp_path / "tools"
    (repo / ".git").mkdir(parents=True)
    (repo / ".tool-versions").write_text("python 3.12.1\n")
    seen: list[Progress] = []
    svc.create(name="d", spec=VMSpec(network=NetworkMode.TAP, nat=True),
               workspace=WorkspaceRequest(repo), sink=seen.append)
    svc.prepare_workspace("d", WorkspaceRequest(repo), sink=seen.append)
    running = None
    said: set[str] = set()
    for e in seen:
        if e.kind == "run":
            running = e.stage
        elif e.kind == "detail":
            assert e.stage == running, f"{e.message!r} said under {e.stage}, in {running}"
            said.add(e.stage)
    assert said >= {"preflight", "bridge", "prepare_host_features", "work_disk",
                    "post_start_features", "tool_bootstrap"}


def test_prepare_on_a_running_vm_is_stage_copy_bootstrap(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, net, tmp_path = env
    svc.ctx.load_config = lambda: Config(installer_url="http://10.0.2.2:9/i.sh")
    repo = tmp_path / "tools"
    (repo / ".git").mkdir(parents=True)
    (repo / ".tool-versions").write_text("python 3.12.1\n")
    svc.create(name="p", spec=VMSpec(nat=True))
    seen: list[Progress] = []
    svc.prepare_workspace("p", WorkspaceRequest(repo), sink=seen.append)
    assert steps_of(seen) == [("run", "workspace_stage"), ("ok", "workspace_stage"),
                              ("run", "workspace_copy"), ("ok", "workspace_copy"),
                              ("run", "tool_bootstrap"), ("ok", "tool_bootstrap")]
    staged = svc.host.workspace.staged_dirs  # type: ignore[attr-defined]
    assert staged and not any(d.exists() for d in staged)


def test_prepare_on_stopped_and_never_started_vms(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, net, tmp_path = env
    repo = tmp_path / "proj"
    (repo / ".git").mkdir(parents=True)
    svc.create(name="s", spec=VMSpec())
    svc.stop("s")
    svc.create(name="n", spec=VMSpec(), start=False)
    for name, says in (("s", "when it next starts"), ("n", "no work disk yet")):
        seen: list[Progress] = []
        svc.prepare_workspace(name, WorkspaceRequest(repo), sink=seen.append)
        assert steps_of(seen) == [("run", "workspace_stage"), ("ok", "workspace_stage")]
        detail = next(e for e in seen if e.kind == "detail")
        assert detail.stage == "workspace_stage" and says in (detail.message or "")


def test_a_failed_copy_names_its_stage_and_leaves_no_staged_copy(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, net, tmp_path = env
    repo = tmp_path / "proj"
    (repo / ".git").mkdir(parents=True)
    svc.create(name="p", spec=VMSpec())

    agent_of(svc).push_error = OperationFailed("the guest agent: connection reset")
    with pytest.raises(OperationFailed, match="connection reset") as info:
        svc.prepare_workspace("p", WorkspaceRequest(repo))
    assert info.value.stage == "workspace_copy" and info.value.op_id
    staged = svc.host.workspace.staged_dirs  # type: ignore[attr-defined]
    assert staged and not any(d.exists() for d in staged)
    assert svc.resolve("p").workspace_path is None
    assert svc.ctx.ops._oplog.get(info.value.op_id)["status"] == "failed"  # type: ignore[attr-defined]


# ---- release_runtime keeps every failure ----------------------------------------------


def test_a_vmm_that_will_not_die_still_lets_go_of_everything_else(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, net, _ = env
    vm = svc.create(name="stuck", spec=VMSpec(network=NetworkMode.TAP, nat=True))
    paths = svc.layout.vm(vm.id)
    vmm.unkillable = vmm.ignore_quit = True
    agent_of(svc).poweroff_works = False
    net.fail.add("remove_nat")
    with pytest.raises(OperationFailed) as info:
        svc.stop("stuck")
    err = info.value
    assert err.stage == "release_runtime"
    assert "did not exit" in str(err) and "injected failure in remove_nat" in str(err)
    # All the rest went: the tap, the sockets, the handles.
    assert net.taps_up == {}
    assert not paths.control_socket.exists() and not paths.sock_dir.exists()
    assert not paths.handles.exists() and svc.ctx.handles.get(vm.id) is None


def test_delete_reports_every_network_failure(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, net, _ = env
    vm = svc.create(name="n", spec=VMSpec(network=NetworkMode.TAP, nat=True))
    net.fail.update({"remove_nat", "delete_tap"})
    with pytest.raises(OperationFailed) as info:
        svc.delete("n")
    assert "remove_nat" in str(info.value) and "delete_tap" in str(info.value)
    assert vmm.procs == {} and not svc.layout.vm(vm.id).sock_dir.exists()
    net.fail.clear()
    svc.delete("n")
    assert net.taps_up == {} and net.rules == {}


def test_a_start_rollback_reports_every_release_failure(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, net, _ = env
    svc.create(name="x", spec=VMSpec(network=NetworkMode.TAP), start=False)
    vmm.unkillable = True
    svc.ctx.failpoint = "wait_agent"
    with pytest.raises(OperationFailed) as info:
        svc.start("x")
    message = str(info.value)
    assert "failpoint" in message and "cleanup also failed" in message
    assert "did not exit" in message
    assert net.taps_up == {}, "the tap's own undo still ran"


def test_release_runtime_attempts_every_part_and_keeps_every_error(env) -> None:  # type: ignore[no-untyped-def]
    from banger.core.runtime import ReleaseFailed, release_runtime

    svc, vmm, guest, net, _ = env
    vm = svc.create(name="all", spec=VMSpec(network=NetworkMode.TAP, nat=True))
    paths = svc.layout.vm(vm.id)
    vmm.unkillable = True
    net.fail.update({"remove_nat", "delete_tap"})
    with pytest.raises(ReleaseFailed) as info:
        release_runtime(paths, vmm, svc.ctx.handles, net=net)
    errors = info.value.errors
    assert [type(e).__name__ for e in errors] == ["RuntimeError", "OperationFailed",
                                                  "OperationFailed"]
    assert "did not exit" in str(errors[0]) and "remove_nat" in str(errors[1])
    assert "delete_tap" in str(errors[2])
    assert all(str(e) in info.value.message for e in errors)
    assert not paths.sock_dir.exists() and svc.ctx.handles.get(vm.id) is None
    # Idempotent once the host lets go: what is gone is skipped.
    vmm.unkillable = False
    net.fail.clear()
    release_runtime(paths, vmm, svc.ctx.handles, net=net)
    assert vmm.procs == {} and net.taps_up == {} and net.rules == {}


def test_reconcile_records_a_release_failure_and_goes_on(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, net, _ = env
    dead = svc.create(name="dead", spec=VMSpec(network=NetworkMode.TAP))
    live = svc.create(name="live", spec=VMSpec(network=NetworkMode.TAP))
    for pid, proc in list(vmm.procs.items()):
        if proc.spec.vm_id == dead.id:
            del vmm.procs[pid]  # died while no daemon ran
    net.fail.add("delete_tap")
    states = {v.name: v for v in svc.reconcile()}
    assert states["live"].state is VMState.RUNNING
    failed = states["dead"]
    assert failed.state is VMState.ERROR and failed.last_error_stage == "release_runtime"
    assert "delete_tap" in (failed.last_error or "")
    net.fail.clear()
    svc.delete("dead")  # retries what was left
    assert set(net.taps_up) == {svc.layout.vm(live.id).names.tap}


def test_a_restart_whose_stop_half_fails_does_not_start(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, net, _ = env
    svc.create(name="r", spec=VMSpec())
    vmm.unkillable = vmm.ignore_quit = True
    agent_of(svc).poweroff_works = False
    launched = len(vmm.launched)
    seen: list[Progress] = []
    with pytest.raises(OperationFailed) as info:
        svc.restart("r", sink=seen.append)
    assert info.value.stage == "release_runtime"
    assert "preflight" not in {e.stage for e in seen} and len(vmm.launched) == launched


def test_the_launch_stage_is_the_drivers(env) -> None:  # type: ignore[no-untyped-def]
    # Core names no VMM: a driver's start reports its own launch stage and label.
    svc, vmm, *_ = env
    vmm.name = "firecracker"
    seen: list[Progress] = []
    svc.create(name="f", spec=VMSpec(), sink=seen.append)
    launch = [e for e in seen if e.kind == "run" and e.stage.endswith("_launch")]
    assert [(e.stage, e.label) for e in launch] == [
        ("firecracker_launch", LABELS[Stage.FIRECRACKER_LAUNCH])]
    from banger.core.stages import launch_stage
    assert launch_stage("qemu") is Stage.QEMU_LAUNCH
    with pytest.raises(ValueError, match="no launch stage for VMM driver 'cloud-hypervisor'"):
        launch_stage("cloud-hypervisor")
