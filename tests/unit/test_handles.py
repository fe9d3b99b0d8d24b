"""A VM's handles.json: written by this daemon, and as older daemons wrote it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from banger.core.operations import Operations
from banger.core.runtime import Handles, HandleStore
from banger.core.service import VMService
from banger.model.layout import Layout
from banger.model.vm import VMSpec, VMState
from banger.ports import Rediscovered
from banger.store.vms import OperationLog, VMRepository
from tests.fakes import fake_service

# A running VM's handles.json as daemons before the driver-neutral VMM port wrote it.
OLD_FORMAT = {"pid": 4242, "ssh_port": 40123, "qmp_socket": "/run/banger/vms/x/qmp.sock",
              "accel": "tcg", "boot_id": "0011", "started_at": 12.5, "vmm": "qemu",
              "accel_reason": "probe", "ssh_host": "127.0.0.1", "tap": None}


def test_an_older_daemons_handles_file_is_read(tmp_path: Path) -> None:
    paths = Layout(tmp_path / "s", tmp_path / "c", tmp_path / "f", tmp_path / "r").vm("x")
    paths.dir.mkdir(parents=True)
    paths.handles.write_text(json.dumps(OLD_FORMAT))
    h = HandleStore().load(paths)
    assert h == Handles(pid=4242, ssh_port=40123, control_socket="/run/banger/vms/x/qmp.sock",
                        accel="tcg", boot_id="0011", started_at=12.5, vmm="qemu",
                        accel_reason="probe", ssh_host="127.0.0.1", tap=None, agent=None)


def test_handles_round_trip_with_the_new_names(tmp_path: Path) -> None:
    paths = Layout(tmp_path / "s", tmp_path / "c", tmp_path / "f", tmp_path / "r").vm("x")
    paths.dir.mkdir(parents=True)
    h = Handles(pid=7, ssh_port=22, control_socket=str(paths.control_socket), accel="kvm",
                boot_id="b", started_at=1.0, ssh_host="10.0.0.2", tap="btx", agent="/a.sock")
    HandleStore().put(paths, h)
    assert "qmp_socket" not in json.loads(paths.handles.read_text())
    assert HandleStore().load(paths) == h


def test_the_control_socket_keeps_its_file_name(tmp_path: Path) -> None:
    # VMs started by an older daemon are found again from the id-derived path alone.
    paths = Layout(tmp_path / "s", tmp_path / "c", tmp_path / "f", tmp_path / "r").vm("x")
    assert paths.control_socket == tmp_path / "r" / "vms" / "x" / "qmp.sock"


def test_a_vm_started_by_an_older_daemon_survives_the_upgrade(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    layout = Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})
    svc, images, disks, vmm, guest, db = fake_service(tmp_path, layout)
    vm = svc.create(name="old", spec=VMSpec())
    paths = layout.vm(vm.id)
    h = svc.ctx.handles.get(vm.id)
    assert h is not None
    old = dict(OLD_FORMAT, pid=h.pid, ssh_port=h.ssh_port, qmp_socket=h.control_socket)
    paths.handles.write_text(json.dumps(old))

    def no_rediscovery(control_socket: Path) -> Rediscovered | None:
        raise AssertionError("the handles file was readable: nothing to rediscover")

    monkeypatch.setattr(vmm, "rediscover", no_rediscovery)
    upgraded = VMService(repo=VMRepository(db), ops=Operations(OperationLog(db)),
                         host=svc.host, layout=layout)
    assert {v.name: v.state for v in upgraded.reconcile()} == {"old": VMState.RUNNING}
    kept = upgraded.ctx.handles.get(vm.id)
    assert kept is not None and (kept.pid, kept.ssh_port) == (h.pid, h.ssh_port)
    assert kept.control_socket == str(paths.control_socket)
