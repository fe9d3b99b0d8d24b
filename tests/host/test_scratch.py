"""The daemon's scratch directories: temporary copies stay out of /tmp and /dev/shm, and
what a killed daemon left there is swept at the next daemon start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from banger.host.guest_ssh import SshGuest
from banger.host.scratch import Scratch
from banger.host.workspace_port import LocalWorkspace
from banger.model.layout import Layout
from banger.ports import WorkspaceRequest

pytestmark = pytest.mark.host


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    repo.mkdir()
    (repo / "README").write_text("hello\n")
    for args in (["init", "-q"], ["add", "README"],
                 ["-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True)
    return repo


def _layout(home: Path) -> Layout:
    return Layout.for_user({"BANGER_HOME": str(home), "HOME": str(home)})


def test_leftovers_are_swept_at_daemon_start(tmp_path: Path) -> None:
    home = Path(tempfile.mkdtemp(prefix="bs-", dir="/tmp"))  # short: socket path limit
    layout = _layout(home)
    s = Scratch(layout.state_dir)
    ram = s.ram()
    assert ram is not None and ram.parent == Path("/dev/shm")
    try:
        vm_dir = layout.vms_dir / "vm-x"
        planted = [s.disk() / "filesync-x" / "id_rsa", s.disk() / "hostkey-y" / "key",
                   ram / ".workspace-z" / "repo" / "README",
                   # In a VM's directory, by a build killed half way: a repo too big for
                   # RAM, the work disk's staging and image, a serial-log copy.
                   vm_dir / ".workspace-big" / "repo" / "README",
                   vm_dir / ".work.ext4.staging-q" / "repo" / "README",
                   vm_dir / ".work.ext4.tmp", vm_dir / ".workspace-pending-p" / "x",
                   vm_dir / "serial.log.1.tmp"]
        kept = [vm_dir / "work.ext4", vm_dir / "root.qcow2", vm_dir / "serial.log",
                vm_dir / "workspace-pending" / "repo" / "README", vm_dir / "handles.json"]
        for p in planted + kept:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("left by a SIGKILLed daemon")
        (layout.config_dir).mkdir(parents=True)
        layout.config_file.write_text("[network]\ndns_port = 0\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
        env["BANGER_HOME"] = str(home)
        daemon = subprocess.Popen([sys.executable, "-m", "banger.daemon.main"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 30
            while not _answers(layout.daemon_socket):
                assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
                assert time.monotonic() < deadline, "bangerd did not start"
                time.sleep(0.05)
            assert [p for p in planted if p.exists()] == []
            assert [p for p in kept if not p.exists()] == []
            assert sorted(p.name for p in vm_dir.iterdir()) == [
                "handles.json", "root.qcow2", "serial.log", "work.ext4", "workspace-pending"]
            assert list(s.disk_dir.iterdir()) == [] and list(ram.iterdir()) == []
            assert s.disk_dir.stat().st_mode & 0o777 == 0o700
            assert ram.stat().st_mode & 0o777 == 0o700
        finally:
            daemon.terminate()
            daemon.wait(10)
    finally:
        subprocess.run(["rm", "-rf", str(home), str(ram)], check=True)


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def test_temp_copies_stay_out_of_tmp_and_dev_shm(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    layout = _layout(tmp_path / "home")
    trap = tmp_path / "trap"
    trap.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(trap))  # what /tmp would have been
    private, public = SshGuest(layout).new_host_key()
    assert private and public.startswith("ssh-ed25519 ")
    assert list(trap.iterdir()) == []
    assert Scratch(layout.state_dir).disk_dir.is_dir()  # where the key pair was made
    # A repo staged in RAM goes into the daemon's own directory there.
    repo = make_repo(tmp_path)
    ws = LocalWorkspace(Scratch(layout.state_dir))
    sel = ws.select(WorkspaceRequest(path=repo))
    vm_dir = tmp_path / "vm"
    vm_dir.mkdir()
    ram = Scratch(layout.state_dir).ram_dir
    before = set(Path("/dev/shm").iterdir())
    try:
        with ws.staged(sel, vm_dir) as tree:
            assert (tree / "README").read_text() == "hello\n"
            assert tree.parent.parent == ram
            assert set(Path("/dev/shm").iterdir()) - before == {ram}
        assert not ram.exists()  # nothing idle left in RAM
    finally:
        subprocess.run(["rm", "-rf", str(ram)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_scratch_dir_squatted_by_another_user_is_left_alone(tmp_path: Path) -> None:
    # Squatted in /dev/shm (world-writable) by another user: no RAM staging, no sweep there.
    squat = Scratch(tmp_path / "state", shm=tmp_path)
    squat.ram_dir.mkdir()
    (squat.ram_dir / "theirs").write_text("x")
    os.chown(squat.ram_dir, 65534, 65534)
    assert squat.ram() is None
    squat.sweep()
    assert (squat.ram_dir / "theirs").exists()
    # A symlink planted in its place is not followed either.
    squat.ram_dir.rename(tmp_path / "elsewhere")
    squat.ram_dir.symlink_to(tmp_path / "elsewhere")
    assert squat.ram() is None
    squat.sweep()
    assert (tmp_path / "elsewhere" / "theirs").exists()
