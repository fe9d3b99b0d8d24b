"""Tap networking in the core, against stateful fakes: stages, addresses, NAT, teardown
after every kind of ending, and the reconcile sweep."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from banger.core.operations import Progress
from banger.core.service import VMService
from banger.model.config import Config, NetworkConfig
from banger.model.errors import InvalidRequest, OperationFailed
from banger.model.layout import Layout
from banger.model.vm import NetworkMode, VMSpec, VMState
from banger.ports import TapNet
from tests.fakes import FakeNet, FakeVmm, fake_service
from tests.unit.test_core_vms import stage_names

TAP = VMSpec(network=NetworkMode.TAP)
TAP_NAT = VMSpec(network=NetworkMode.TAP, nat=True)
SUBNET = IPv4Network("10.77.0.0/24")


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    layout = Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})
    svc, _, _, vmm, _, _ = fake_service(
        tmp_path, layout,
        load_config=lambda: Config(network=NetworkConfig(bridge="bgt0", subnet=SUBNET)))
    net = svc.host.net
    assert isinstance(net, FakeNet)
    return svc, vmm, net


def assert_clean(svc: VMService, vmm: FakeVmm, net: FakeNet) -> None:
    assert vmm.procs == {}, "a VMM process is left"
    assert net.taps_up == {}, f"taps left: {net.taps_up}"
    assert net.rules == {}, f"NAT rules left: {net.rules}"


def test_tap_stages_follow_bangers_order(env) -> None:  # type: ignore[no-untyped-def]
    svc, *_ = env
    assert stage_names(svc, TAP) == ["preflight", "cleanup_runtime", "bridge", "socket_dir",
                               "system_overlay", "work_disk", "tap", "qemu_launch",
                               "wait_agent", "post_start_features"]
    assert stage_names(svc, TAP_NAT) == ["preflight", "cleanup_runtime", "bridge", "socket_dir",
                                   "system_overlay", "work_disk", "prepare_host_features",
                                   "tap", "qemu_launch", "wait_agent", "post_start_features"]


def test_tap_vm_gets_its_address_tap_and_nat(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, net = env
    seen: list[Progress] = []
    vm = svc.create(name="box", spec=TAP_NAT, sink=seen.append)
    assert vm.guest_ip is not None and IPv4Address(vm.guest_ip) in SUBNET
    assert vm.guest_ip not in ("10.77.0.0", "10.77.0.1", "10.77.0.255")
    paths = svc.layout.vm(vm.id)
    assert net.bridges == {"bgt0": IPv4Interface("10.77.0.1/24")}
    assert net.taps_up == {paths.names.tap: "bgt0"}
    assert net.rules == {vm.id: (IPv4Address(vm.guest_ip), "bgt0")}
    attached = vmm.launched[-1].net
    assert isinstance(attached, TapNet)
    assert attached.tap == paths.names.tap and attached.mac.startswith("52:54:00:")
    assert attached.address == IPv4Interface(f"{vm.guest_ip}/24")
    assert attached.gateway == attached.resolver == IPv4Address("10.77.0.1")
    assert attached.outbound is True
    h = svc.ctx.handles.get(vm.id)
    assert h is not None and h.endpoint is not None
    assert (h.endpoint.host, h.endpoint.port) == (vm.guest_ip, 22)
    assert any(e.kind == "detail" and "created bridge bgt0" in (e.message or "") for e in seen)
    # Stop, kill and delete all take the tap and the rules away; the address stays.
    svc.stop("box")
    assert_clean(svc, vmm, net)
    assert svc.start("box").guest_ip == vm.guest_ip
    svc.kill("box")
    assert_clean(svc, vmm, net)
    svc.start("box")
    svc.delete("box")
    assert_clean(svc, vmm, net)
    assert "bgt0" in net.bridges  # shared: never torn down with a VM


def test_without_nat_no_rules(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, net = env
    svc.create(name="quiet", spec=TAP)
    assert net.rules == {} and len(net.taps_up) == 1
    assert vmm.launched[-1].net.outbound is False


def test_many_vms_never_share_an_address(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, net = env
    ips = {svc.create(name=f"v{i}", spec=TAP, start=False).guest_ip for i in range(40)}
    assert len(ips) == 40 and None not in ips


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-vm", "restart"])
def test_failure_at_every_tap_stage_leaks_nothing(env, fresh: bool) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, net = env
    for stage in stage_names(svc, TAP_NAT):
        name = f"fp-{stage.replace('_', '-')}"
        vm = svc.create(name=name, spec=TAP_NAT, start=not fresh)
        if not fresh:
            svc.stop(name)
        svc.ctx.failpoint = stage
        with pytest.raises(OperationFailed) as info:
            svc.start(name)
        svc.ctx.failpoint = None
        assert info.value.stage == stage
        assert svc.resolve(name).state is VMState.ERROR
        assert_clean(svc, vmm, net)
        assert svc.start(name).state is VMState.RUNNING
        svc.delete(name)
        assert_clean(svc, vmm, net)
        assert vm.id not in net.rules


@pytest.mark.parametrize("what", ["ensure_bridge", "add_nat", "create_tap"])
def test_host_network_errors_roll_back(env, what: str) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, net = env
    net.fail.add(what)
    with pytest.raises(OperationFailed, match=f"injected failure in {what}"):
        svc.create(name="nf", spec=TAP_NAT)
    net.fail.clear()
    assert_clean(svc, vmm, net)


def test_foreign_bridge_refused_naming_the_config_key(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, net = env
    net.foreign_bridges.add("bgt0")
    with pytest.raises(OperationFailed, match=r"\[network\] bridge") as info:
        svc.create(name="fb", spec=TAP)
    assert info.value.stage == "bridge"
    assert_clean(svc, vmm, net)


def test_no_root_refused_before_anything_exists(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, net = env
    net.why_not = "tap networking needs root (bangerd runs as uid 1000)"
    with pytest.raises(InvalidRequest, match="needs root"):
        svc.create(name="nr", spec=TAP)
    assert svc.list_vms() == [] and vmm.launched == []


def test_reconcile_sweeps_rules_and_taps_of_dead_vms(env) -> None:  # type: ignore[no-untyped-def]
    svc, vmm, net = env
    live = svc.create(name="live", spec=TAP_NAT)
    dead = svc.create(name="dead", spec=TAP_NAT)
    # The daemon died; then dead's QEMU died too (its handles gone with the daemon).
    for pid, proc in list(vmm.procs.items()):
        if proc.spec.vm_id == dead.id:
            del vmm.procs[pid]
    # And a tap and rules of a VM this daemon never heard of.
    net.taps_up["btdeadbeef0000"] = "bgt0"
    net.rules["deadbeef0000"] = (IPv4Address("10.77.0.99"), "bgt0")
    del net.rules[live.id]  # a firewall reload took the live VM's rules away
    svc.ctx.handles = type(svc.ctx.handles)()
    svc.reconcile()
    assert svc.resolve("dead").state is VMState.STOPPED
    assert set(net.taps_up) == {svc.layout.vm(live.id).names.tap}
    assert set(net.rules) == {live.id}
    h = svc.ctx.handles.get(live.id)
    assert h is not None and h.endpoint is not None and h.endpoint.host == live.guest_ip


def test_default_network_comes_from_config(env) -> None:  # type: ignore[no-untyped-def]
    svc, *_ = env
    assert svc.default_network() is NetworkMode.USER
    svc.ctx.load_config = lambda: Config(network=NetworkConfig(mode="tap"))
    assert svc.default_network() is NetworkMode.TAP
