"""The QEMU process without a guest OS: the KVM probe stub idles as the "kernel".

Fast checks of launch, detachment, QMP, pid observation and early-death reporting; the
real boot is in tests/e2e.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.vmspec import ssh_port, user_spec

from banger.host import kvm, qemu, qemu_cmdline, vmmproc, vmmuser
from banger.host.qemu import HostPortBusy, VmmError
from banger.host.vmm_qemu import QemuVmm
from banger.ports import LaunchSpec

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(shutil.which(qemu_cmdline.QEMU) is None, reason="QEMU not installed"),
]


@pytest.fixture
def vmdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Short path: the QMP socket must fit in sun_path.
    d = Path(tempfile_short())
    try:
        yield d
    finally:
        pid = vmmproc.find_qemu_pid(d / "qmp.sock")
        if pid is not None:
            vmmproc.kill_and_wait(pid, signal.SIGKILL, 5)
        shutil.rmtree(d, ignore_errors=True)


def tempfile_short() -> str:
    import tempfile
    return tempfile.mkdtemp(prefix="bq-", dir="/tmp")


def stub_config(d: Path, **over: object) -> LaunchSpec:
    """Without isa-debug-exit the probe's exit write goes nowhere: it halts forever."""
    kernel = d / "stub.elf"
    kernel.write_bytes(kvm.probe_elf())
    (d / "initrd").write_bytes(b"\0" * 4096)
    for disk in ("root.qcow2", "work.ext4"):
        subprocess.run(["qemu-img", "create", "-q", "-f",
                        "qcow2" if disk.endswith("qcow2") else "raw", str(d / disk), "16M"],
                       check=True)
    base: dict[str, object] = dict(
        kernel=kernel, initrd=d / "initrd", memory_mib=64, ssh_port=vmmproc.free_port(),
        hostname="stub")
    base.update(over)
    return user_spec(d, **base)  # type: ignore[arg-type]


def test_launch_observe_and_quit(vmdir: Path) -> None:
    cfg = stub_config(vmdir)
    pid = qemu.launch(cfg, "tcg")
    assert vmmproc.pid_alive(pid)
    assert os.getsid(pid) == pid  # its own session: no signal from our terminal reaches it
    assert vmmproc.pid_is_qemu_for(pid, cfg.control_socket)
    assert not vmmproc.pid_is_qemu_for(pid, vmdir / "other.sock")
    assert not vmmproc.pid_is_qemu_for(os.getpid(), cfg.control_socket)
    assert vmmproc.find_qemu_pid(cfg.control_socket) == pid
    assert vmmproc.qmp_status(cfg.control_socket) == "running"
    assert not vmmproc.port_is_free(ssh_port(cfg))
    # The guest agent's channel: QEMU serves the socket the launch bound, and a daemon
    # that lost its handles finds it again next to the control socket.
    agent = qemu_cmdline.agent_socket(cfg)
    assert agent == vmdir / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.connect(str(agent))
    found = QemuVmm().rediscover(cfg.control_socket)
    assert found is not None and (found.pid, found.agent) == (pid, agent)
    with pytest.raises(VmmError, match="already running"):
        qemu.launch(cfg, "tcg")
    assert vmmproc.qmp_quit(cfg.control_socket)
    deadline = time.monotonic() + 5
    while vmmproc.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not vmmproc.pid_alive(pid)
    assert vmmproc.find_qemu_pid(cfg.control_socket) is None
    assert vmmproc.port_is_free(ssh_port(cfg))
    assert vmmproc.qmp_status(cfg.control_socket) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, \
            pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        probe.connect(str(agent))  # nobody serves it once QEMU is gone (QEMU removes it)


def test_kill_and_wait(vmdir: Path) -> None:
    cfg = stub_config(vmdir)
    pid = qemu.launch(cfg, "tcg")
    assert vmmproc.kill_and_wait(pid, signal.SIGKILL, 5)
    assert not vmmproc.pid_alive(pid)
    assert vmmproc.kill_and_wait(pid, signal.SIGKILL, 1)  # already gone is success


def test_vm_survives_its_launcher_being_killed(vmdir: Path) -> None:
    cfg = stub_config(vmdir)
    code = ("import pickle, time; from banger.host import qemu; "
            f"cfg = pickle.loads(bytes.fromhex({pickle.dumps(cfg).hex()!r})); "
            "print(qemu.launch(cfg, 'tcg'), flush=True); "
            "time.sleep(60)")
    launcher = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                text=True)
    assert launcher.stdout is not None
    pid = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    time.sleep(0.3)
    assert vmmproc.pid_alive(pid)
    assert vmmproc.find_qemu_pid(cfg.control_socket) == pid  # rediscovered from /proc alone
    assert vmmproc.qmp_status(cfg.control_socket) == "running"


def test_immediate_death_is_reported_with_the_log(vmdir: Path) -> None:
    (vmdir / "bad-kernel").write_bytes(b"not a kernel\n" * 64)
    cfg = stub_config(vmdir, kernel=vmdir / "bad-kernel")
    started = time.monotonic()
    with pytest.raises(VmmError) as err:
        qemu.launch(cfg, "tcg")
    assert time.monotonic() - started < 3
    assert "exited with status" in str(err.value)
    assert "kernel" in str(err.value)  # QEMU's own complaint, from the log tail
    assert vmmproc.find_qemu_pid(cfg.control_socket) is None
    assert not cfg.control_socket.exists()
    assert not qemu_cmdline.agent_socket(cfg).exists()


def test_missing_file_is_named_before_qemu_starts(vmdir: Path) -> None:
    cfg = stub_config(vmdir, kernel=vmdir / "no-such-kernel")
    with pytest.raises(VmmError, match=r"cannot open .*no-such-kernel for QEMU"):
        qemu.launch(cfg, "tcg")
    assert not cfg.control_socket.exists()


def test_busy_ssh_port_is_its_own_error(vmdir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        cfg = stub_config(vmdir, ssh_port=s.getsockname()[1])
        with pytest.raises(HostPortBusy):
            qemu.launch(cfg, "tcg")


def test_zombie_counts_as_dead() -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while vmmproc.pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert Path(f"/proc/{child.pid}").exists()  # not reaped yet: a zombie
    assert not vmmproc.pid_alive(child.pid)
    child.wait()


def test_qmp_helpers_on_missing_or_dead_socket(tmp_path: Path) -> None:
    assert vmmproc.qmp_status(tmp_path / "none.sock") is None
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()  # the file stays, nobody listens
    started = time.monotonic()
    assert vmmproc.qmp_status(dead, timeout=1) is None
    assert not vmmproc.qmp_quit(dead, timeout=1)
    assert time.monotonic() - started < 3


@pytest.mark.skipif(os.geteuid() != 0, reason="starting QEMU as another user needs root")
def test_under_root_it_runs_unprivileged_and_sandboxed(vmdir: Path) -> None:
    runas = vmmuser.resolve()
    assert runas is not None and runas.uid != 0
    cfg = stub_config(vmdir)
    assert vmdir.stat().st_mode & 0o777 == 0o700  # QEMU's user cannot even enter it
    pid = qemu.launch(cfg, "tcg", runas)
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines())
    assert status["Uid"].split() == [str(runas.uid)] * 4
    assert status["Gid"].split() == [str(runas.gid)] * 4
    assert status["Groups"].split() == [str(g) for g in runas.groups]
    assert status["Seccomp"].strip() == "2"
    assert vmmproc.find_qemu_pid(cfg.control_socket) == pid
    assert vmmproc.qmp_status(cfg.control_socket) == "running"
    assert vmmproc.qmp_quit(cfg.control_socket)
    assert vmmproc.kill_and_wait(pid, 0, 5)


@pytest.mark.skipif(os.geteuid() != 0, reason="starting QEMU as another user needs root")
def test_a_kernel_its_user_cannot_read_is_named(vmdir: Path) -> None:
    runas = vmmuser.resolve()
    assert runas is not None
    cfg = stub_config(vmdir)
    cfg.boot.kernel.chmod(0o600)
    with pytest.raises(VmmError, match="not readable by QEMU's user"):
        qemu.launch(cfg, "tcg", runas)
    assert not cfg.control_socket.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="starting QEMU as another user needs root")
def test_no_two_running_qemus_share_a_user() -> None:
    vmm = QemuVmm()
    dirs = [Path(tempfile_short()) for _ in range(3)]
    pids: list[int] = []
    try:
        for d in dirs:
            pids.append(vmm.launch(stub_config(d)).pid)
        uids = [Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
                for pid in pids]
        assert len(set(uids)) == 3 and "0" not in uids, uids  # no ptrace between VMs
        # A slot that frees up is used again: no new user per start.
        assert vmmproc.kill_and_wait(pids[1], signal.SIGKILL, 5)
        with vmm._users.free() as runas:
            assert runas is not None and str(runas.uid) == uids[1]
    finally:
        for pid in pids:
            vmmproc.kill_and_wait(pid, signal.SIGKILL, 5)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


QEMU_NAME = b"qemu-system-x86_64"


def _decoy(qmp: Path, user: int | None) -> subprocess.Popen[bytes]:
    """A process named like QEMU whose arguments name ``qmp`` as a banger QEMU's do
    (anyone can read them in /proc), run as ``user``."""
    argv = ["bash", "-c", 'exec -a qemu-system-x86_64 /usr/bin/python3 -c '
            '"import time; time.sleep(60)" -add-fd "$0"',
            f"fd=7,set={qemu_cmdline.FDSET_QMP},opaque={vmmproc.QMP_TAG}{qmp}"]
    proc = subprocess.Popen(argv, user=user, group=user, extra_groups=[] if user else None,
                            cwd="/")
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[0] != QEMU_NAME:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


@pytest.mark.skipif(os.geteuid() != 0, reason="running a process as another uid needs root")
def test_a_look_alike_of_another_uid_is_not_taken_for_the_vms_qemu(vmdir: Path) -> None:
    # Taken for the VM's QEMU, another user's decoy blocked the VM's next start ("already
    # running"), chose its ssh port at rediscovery, and was what a stop signalled.
    qmp = vmdir / "qmp.sock"
    nobody = _decoy(qmp, 65534)
    try:
        assert not vmmproc.pid_is_qemu_for(nobody.pid, qmp)
        assert vmmproc.find_qemu_pid(qmp) is None
    finally:
        nobody.kill()
        nobody.wait()
    ours = _decoy(qmp, None)  # the daemon's own uid: still recognised
    try:
        assert vmmproc.find_qemu_pid(qmp) == ours.pid
    finally:
        ours.kill()
        ours.wait()


@pytest.mark.skipif(os.geteuid() != 0, reason="QEMU users exist under a root daemon only")
def test_qemu_users_are_recognised() -> None:
    runas = vmmuser.resolve()
    assert runas is not None
    assert vmmuser.is_vmm_user(runas.uid)
    assert not vmmuser.is_vmm_user(0) and not vmmuser.is_vmm_user(65534)
