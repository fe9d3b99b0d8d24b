"""`vm stats` in the core: two samples of the guest's agent and of the VMM process give
CPU shares; a VM that is not running (or has no agent channel) is a clear conflict."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from banger.core.stats import guest_cpu_percent
from banger.model.errors import ConflictError, NotFoundError, OperationFailed
from banger.model.layout import Layout
from banger.model.vm import VMSpec
from banger.ports import GuestFilesystem, GuestStats
from tests.fakes import FakeAgent, fake_service


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    layout = Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})
    svc, _images, _disks, vmm, _guest, _db = fake_service(tmp_path, layout)
    agent = svc.ctx.host.agent
    assert isinstance(agent, FakeAgent)
    return svc, vmm, agent


def test_stats_of_a_running_vm(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, agent = env
    svc.create(name="box", spec=VMSpec())
    agent.mounts = (GuestFilesystem("/data", 10, 4, 6),)
    s = svc.stats("box", interval=0.0)
    (proc,) = vmm.procs.values()
    assert (s.vm.name, s.vmm_pid, proc.stats_samples, proc.cpu_looks) == ("box", proc.pid, 2, 2)
    assert s.guest_cpu_percent == 25.0  # 25 busy ticks of 100 between the samples
    assert s.guest.mem_total_kib == 1 << 20 and s.guest.ncpu == 2
    assert [f.mountpoint for f in s.guest.filesystems] == ["/", "/data"]
    assert s.vmm is not None and s.vmm.rss_bytes == 64 << 20 and s.vmm.cpu_seconds == 0.2
    assert s.vmm_cpu_percent is not None and s.vmm_cpu_percent > 0
    assert s.interval >= 0


def test_stats_refuse_a_vm_that_is_not_running(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, agent = env
    svc.create(name="idle", spec=VMSpec(), start=False)
    with pytest.raises(ConflictError, match=r"'idle' is created, not running.*"
                                            r"`banger vm start idle`"):
        svc.stats("idle", interval=0.0)
    svc.start("idle")
    vmm.procs.clear()  # died behind banger's back: observed, the agent is not asked
    with pytest.raises(ConflictError, match=r"not running.*`banger vm start idle`"):
        svc.stats("idle", interval=0.0)
    with pytest.raises(NotFoundError):
        svc.stats("nope", interval=0.0)


def test_stats_of_a_vm_without_an_agent_channel(env) -> None:  # type: ignore[no-untyped-def]
    svc, _vmm, _agent = env
    vm = svc.create(name="old", spec=VMSpec())
    paths = svc.ctx.layout.vm(vm.id)
    svc.ctx.handles.put(paths, replace(svc.ctx.handles.get(vm.id), agent=None))
    with pytest.raises(ConflictError, match=r"without a guest agent.*`banger vm restart old`"):
        svc.stats("old", interval=0.0)


def test_an_agent_error_reaches_the_caller(env) -> None:  # type: ignore[no-untyped-def]
    svc, _vmm, agent = env
    svc.create(name="box", spec=VMSpec())
    agent.stats_error = OperationFailed("could not read stats from the guest agent")
    with pytest.raises(OperationFailed, match="could not read stats"):
        svc.stats("box", interval=0.0)


def _sample(user: int, system: int, idle: int) -> GuestStats:
    return GuestStats(uptime_ms=1, load1=0, load5=0, load15=0, mem_total_kib=1,
                      mem_available_kib=1, cpu_user_ticks=user, cpu_system_ticks=system,
                      cpu_idle_ticks=idle, ncpu=1)


def test_guest_cpu_percent() -> None:
    assert guest_cpu_percent(_sample(10, 10, 80), _sample(40, 20, 140)) == 40.0
    assert guest_cpu_percent(_sample(10, 10, 80), _sample(10, 10, 80)) is None  # no tick
    assert guest_cpu_percent(_sample(90, 10, 80), _sample(1, 1, 1)) is None  # rebooted
