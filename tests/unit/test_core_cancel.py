"""Cancel and boot admission: a cancelled start rolls back like a failure; boots queue FIFO."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from banger.core.operations import BootSlots, OpControl, Progress
from banger.model.errors import Cancelled, NotFoundError
from banger.model.layout import Layout
from banger.model.vm import VMSpec, VMState
from tests.fakes import agent_of, fake_service
from tests.unit.test_core_vms import assert_no_runtime_leak, stage_names


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    layout = Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})
    svc, images, disks, vmm, guest, db = fake_service(tmp_path, layout)
    return svc, vmm, guest, disks, images, layout, db


def cancel_when(control: OpControl, kind: str, stage: str, log: list[Progress]):  # type: ignore[no-untyped-def]
    def sink(p: Progress) -> None:
        log.append(p)
        if p.kind == kind and p.stage == stage:
            control.cancel("cancelled by the test")
    return sink


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-vm", "restart"])
def test_cancel_between_steps_rolls_back_everything(env, fresh: bool) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, disks, *_ = env
    for stage in stage_names(svc)[:-1]:  # a cancel during the last step lets it finish
        name = f"c-{stage.replace('_', '-')}"
        vm = svc.create(name=name, spec=VMSpec(), start=not fresh)
        if not fresh:
            svc.stop(name)
        paths = svc.layout.vm(vm.id)
        had_disks = paths.root_disk.exists()
        control, log = OpControl(), []
        with pytest.raises(Cancelled) as info:
            svc.start(name, sink=cancel_when(control, "ok", stage, log), control=control)
        err = info.value
        assert err.code == "cancelled" and err.op_id and err.stage != stage
        assert "rolled back" in err.message
        ran = [p.stage for p in log if p.kind == "run"]
        assert ran[-1] == stage, "no step runs after the cancel"
        undone = [p.stage for p in log if p.kind == "undone"]
        assert undone == [s for s in reversed(ran)
                          if s in ("socket_dir", "system_overlay", "work_disk", "qemu_launch")]
        rec = svc.resolve(name)
        assert rec.state is VMState.STOPPED and "cancelled" in (rec.last_error or "")
        assert_no_runtime_leak(svc, vmm, vm.id)
        assert paths.root_disk.exists() == had_disks
        assert paths.work_disk.exists() == had_disks
        assert svc.ops.in_flight() == []
        assert svc.start(name).state is VMState.RUNNING, "it starts cleanly afterwards"
        svc.delete(name)
        assert_no_runtime_leak(svc, vmm, vm.id)


def test_cancel_while_waiting_for_the_agent_ends_it_at_once(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    agent_of(svc).hello_delay = 30.0
    control, log = OpControl(), []
    started = time.monotonic()
    with pytest.raises(Cancelled) as info:
        svc.create(name="slow-agent", spec=VMSpec(),
                   sink=cancel_when(control, "run", "wait_agent", log), control=control)
    assert time.monotonic() - started < 5, "the agent wait polls the cancel"
    assert info.value.stage == "wait_agent"
    assert [p.kind for p in log if p.stage == "qemu_launch"][-2:] == ["undo", "undone"]
    assert_no_runtime_leak(svc, vmm, svc.resolve("slow-agent").id)


def test_cancel_through_the_registry_by_op_id(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    agent_of(svc).hello_delay = 30.0
    log: list[Progress] = []

    def sink(p: Progress) -> None:
        log.append(p)
        if p.kind == "run" and p.stage == "wait_agent":
            svc.ops.cancel(p.op_id)

    with pytest.raises(Cancelled):
        svc.create(name="byid", spec=VMSpec(), sink=sink)
    assert vmm.procs == {}


def test_boots_beyond_the_limit_queue_in_order_and_a_queued_one_cancels(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, guest, *_ = env
    svc.ctx.boots = BootSlots(1)
    for name in ("a", "b", "c", "d"):
        svc.create(name=name, spec=VMSpec(), start=False)
    agent_of(svc).hello_delay = 1.0  # each boot holds the only slot while the others line up
    order: list[str] = []
    queued: dict[str, list[str]] = {"a": [], "b": [], "c": [], "d": []}
    results: dict[str, object] = {}
    controls = {n: OpControl() for n in queued}

    def sink(p: Progress) -> None:
        if p.kind == "queued":
            queued[p.vm].append(p.label or "")
        if p.kind == "run" and p.stage == "preflight":
            order.append(p.vm)

    def start(name: str) -> None:
        try:
            results[name] = svc.start(name, sink=sink, control=controls[name])
        except Cancelled as exc:
            results[name] = exc

    threads = []
    for name in ("a", "b", "c", "d"):  # one after the other: FIFO is then well defined
        t = threading.Thread(target=start, args=(name,))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while not (name in order if name == "a" else queued[name]):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.05)
    controls["c"].cancel("cancelled by the test")
    for t in threads:
        t.join(20)
    assert order == ["a", "b", "d"], "first come, first served; c left the line"
    assert queued["a"] == [] and "number 1 in line" in queued["b"][0]
    assert "number 2 in line" in queued["c"][0] and "number 3 in line" in queued["d"][0]
    assert isinstance(results["c"], Cancelled) and results["c"].stage == "queued"
    assert svc.resolve("c").state is VMState.STOPPED
    assert [v.name for v in (svc.resolve(n) for n in "abd")
            if v.state is VMState.RUNNING] == ["a", "b", "d"]
    assert len(vmm.launched) == 3


def test_a_cancel_during_the_stop_half_of_a_restart_stops_the_start_half(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, *_ = env
    vm = svc.create(name="r", spec=VMSpec())
    control, log = OpControl(), []
    with pytest.raises(Cancelled):
        svc.restart("r", sink=cancel_when(control, "run", "guest_poweroff", log),
                    control=control)
    assert "preflight" not in [p.stage for p in log if p.kind == "run"]
    assert svc.resolve("r").state is VMState.STOPPED
    assert_no_runtime_leak(svc, vmm, vm.id)


@pytest.mark.parametrize("action", ["delete", "stop", "start", "kill"])
def test_an_operation_that_waited_behind_a_delete_says_not_found(env, action: str) -> None:  # type: ignore[no-untyped-def]
    # (`vm run --rm`: the daemon deletes the VM of a client that went away while the CLI,
    # signalled, deletes it too.)
    svc = env[0]
    vm = svc.create(name="gone", spec=VMSpec(), start=False)
    errors: list[BaseException] = []

    def act() -> None:
        try:
            getattr(svc, action)("gone")
        except BaseException as exc:
            errors.append(exc)

    lock = svc.ctx.lock(vm.id)
    with lock:  # an operation holds the VM; the other resolves it, then waits
        t = threading.Thread(target=act)
        t.start()
        time.sleep(0.2)
        svc.ctx.repo.delete(vm.id)  # the first one deleted it meanwhile
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], NotFoundError), errors
    assert "no longer exists" in errors[0].message


@pytest.mark.parametrize("action", ["stop", "kill", "delete"])
def test_stop_kill_delete_of_a_booting_vm_cancel_its_start(env, action: str) -> None:  # type: ignore[no-untyped-def]
    # `banger vm stop box` while box boots (or waits in line for a boot slot) must not
    # wait behind the whole boot: the start is cancelled and rolls back.
    from banger.model.errors import BangerError

    svc, vmm, guest, *_ = env
    svc.create(name="box", spec=VMSpec(), start=False)
    agent_of(svc).hello_delay = 10.0
    outcome: list[object] = []

    def boot() -> None:
        try:
            outcome.append(svc.start("box"))
        except BangerError as exc:
            outcome.append(exc)

    booting = threading.Thread(target=boot)
    booting.start()
    deadline = time.monotonic() + 5
    while not any(o.stage == "wait_agent" for o in svc.ops.in_flight()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    getattr(svc, action)("box")
    took = time.monotonic() - t0
    booting.join(15)
    assert took < 3, f"{action} waited {took:.1f} s behind the boot"
    assert isinstance(outcome[0], Cancelled) and "being" in str(outcome[0])
    assert vmm.procs == {}


def test_a_kill_during_a_restarts_stop_half_cancels_its_start_half(env) -> None:  # type: ignore[no-untyped-def]
    from banger.model.errors import BangerError

    svc, vmm, guest, *_ = env
    svc.create(name="box", spec=VMSpec())
    real_poweroff = agent_of(svc).poweroff

    def slow_poweroff(**kw: object) -> None:
        time.sleep(0.5)
        real_poweroff(**kw)

    agent_of(svc).poweroff = slow_poweroff  # type: ignore[method-assign]
    agent_of(svc).hello_delay = 10.0
    outcome: list[object] = []

    def restart() -> None:  # as `banger vm restart a b` runs it: no control of its own
        try:
            outcome.append(svc.restart("box"))
        except BangerError as exc:
            outcome.append(exc)

    restarting = threading.Thread(target=restart)
    restarting.start()
    deadline = time.monotonic() + 5
    while not any(o.kind == "stop" for o in svc.ops.in_flight()):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    svc.kill("box")
    took = time.monotonic() - t0
    restarting.join(15)
    assert took < 3, f"the kill waited {took:.1f} s behind the restart's boot"
    assert isinstance(outcome[0], Cancelled)
    assert vmm.procs == {} and svc.show("box").vm.state is VMState.STOPPED
