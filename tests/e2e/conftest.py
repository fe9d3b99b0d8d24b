"""e2e tier: the real CLI and the real bangerd, booting real VMs with QEMU (KVM or TCG).

Every test gets its own BANGER_HOME; built images are shared through BANGER_IMAGES_DIR so
the image is built once per machine. Every teardown ends with a leak check that looks at the
OS (processes, sockets, files, ports), never at the database.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from banger.host import disks, imagebuild, kernelbuild, kvm, qemu_cmdline, ssh, vmmproc
from banger.host.agent_client import AgentConnection
from banger.host.guest_agent import LocalAgent
from banger.ports import AgentHello, LaunchSpec
from tests.vmspec import ssh_port, user_spec

IMAGES_DIR = Path(os.environ.get("BANGER_TEST_IMAGES_DIR",
                                 Path.home() / ".cache" / "banger-test" / "images"))

pytestmark = pytest.mark.e2e


@pytest.hookimpl(trylast=True)  # after `-m` has deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Build the microVM kernel once per machine before the first e2e test (~9 min on 2
    cores, more on a loaded machine), outside any test's timeout; the image fixtures then
    find it cached in IMAGES_DIR's parent, like the agent."""
    if not any(item.get_closest_marker("e2e") for item in items):
        return
    try:
        key = kernelbuild.current_key()
    except kernelbuild.KernelBuildError:
        return  # cached_image's build names the missing package
    cache = IMAGES_DIR.parent
    if kernelbuild.cached(cache, key) is None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        kernelbuild.ensure_kernel(cache, lambda line: reporter.write_line(f"kernel: {line}")
                                  if reporter is not None else print(f"kernel: {line}"))


def qemu_pids(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (a test's BANGER_HOME)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (d / "stat").read_text()
        except OSError:
            continue
        # QEMU's option values carry paths with commas doubled (its escape).
        named = marker in cmd or marker.replace(",", ",,") in cmd
        if "qemu-system" in cmd and named and stat.split(") ")[1][0] != "Z":
            out.append(int(d.name))
    return out


def listening_ports() -> set[int]:
    ports = set()
    for f in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(f).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A":  # LISTEN
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


@dataclass
class Banger:
    home: Path
    env: dict[str, str]
    user: str | None = None
    python: str = sys.executable
    ports_seen: set[int] = field(default_factory=set)
    netns: str | None = None  # run the CLI (and so the daemon it starts) in this netns

    def argv(self, *args: str) -> list[str]:
        base = [self.python, "-m", "banger.cli.main", *args]
        if self.netns:
            base = ["ip", "netns", "exec", self.netns, *base]
        if self.user:
            envs = [f"{k}={v}" for k, v in self.env.items()]
            return ["runuser", "-u", self.user, "--", "env", "-i", *envs, *base]
        return base

    def run(self, *args: str, check: bool = True, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), env=None if self.user else self.env,
                              capture_output=True, text=True, timeout=timeout, input=input,
                              cwd="/")
        if check and proc.returncode != 0:
            raise AssertionError(f"banger {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--json").stdout)

    def show(self, ref: str) -> dict[str, object]:
        out = self.json("vm", "show", ref)
        assert isinstance(out, dict)
        if isinstance(out.get("runtime"), dict):
            port = out["runtime"].get("ssh_port")  # type: ignore[union-attr]
            if isinstance(port, int):
                self.ports_seen.add(port)
        return out

    @property
    def socket(self) -> Path:
        return self.home / "run" / "bangerd.sock"

    def daemon_pid(self) -> int | None:
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if b"banger.daemon.main" in cmd and f"BANGER_HOME={self.home}".encode() in env:
                return int(d.name)
        return None

    def stop_daemon(self, sig: int = signal.SIGTERM) -> None:
        pid = self.daemon_pid()
        if pid is None:
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            try:
                if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.05)


def make_banger(user: str | None = None, images_dir: Path = IMAGES_DIR,
                extra_env: dict[str, str] | None = None, prefix: str = "bg-") -> Banger:
    # Short paths: Unix socket paths are limited to 108 bytes.
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
    env.update({"BANGER_HOME": str(home), "BANGER_IMAGES_DIR": str(images_dir),
                "BANGER_READY_TIMEOUT": "240", "PYTHONUNBUFFERED": "1"})
    if user:
        shutil.chown(home, user)
        env["HOME"] = str(home)
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    env.update(extra_env or {})
    return Banger(home=home, env=env, user=user)


def assert_nothing_left(b: Banger) -> None:
    assert qemu_pids(str(b.home)) == [], "a QEMU process is left"
    # Empty directories are layout, not leaks: count files and sockets.
    leftover = [p for p in (b.home / "run").rglob("*")
                if p.name != "bangerd.sock" and not p.is_dir()] if (b.home / "run").exists() else []
    assert leftover == [], f"runtime files left: {leftover}"
    vms = b.home / "state" / "vms"
    assert not vms.exists() or list(vms.iterdir()) == [], f"VM dirs left: {list(vms.iterdir())}"
    kh = b.home / "state" / "ssh" / "known_hosts"
    assert not kh.exists() or kh.read_text().strip() == "", "known_hosts entries left"
    still = b.ports_seen & listening_ports()
    assert not still, f"forwarded ports still listening: {still}"


@pytest.fixture(scope="session")
def image_dir(image: imagebuild.ImageArtifacts) -> Path:
    """The shared images directory, with the default image built (once per machine)."""
    return IMAGES_DIR


@pytest.fixture
def banger(image_dir: Path) -> Iterator[Banger]:
    b = make_banger(images_dir=image_dir)
    yield b
    finish(b)


def finish(b: Banger, extra_check: Callable[[], None] | None = None) -> None:
    """Delete every VM, check the OS for leftovers, stop the daemon, remove the home."""
    try:
        if b.daemon_pid() is not None:
            b.run("vm", "prune", "-f", check=False)
            for vm in json.loads(b.run("vm", "list", "--json").stdout):
                b.run("vm", "delete", vm["name"], check=False)
        assert_nothing_left(b)
        if extra_check is not None:
            extra_check()
    finally:
        b.stop_daemon()
        for pid in qemu_pids(str(b.home)):  # never leave a VM behind, even on failure
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(b.home, ignore_errors=True)


# --- host-level boot fixtures (no daemon): the driver, disks and ssh on their own ---

AGENT_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "LC_ALL": "C"}


def wait_agent_hello(channel: Path, pid: int, serial_log: Path,
                     timeout: float = 180.0) -> AgentHello:
    """The guest agent's HELLO, as the daemon's start waits for it; the connection that got
    it is closed again (the adapter keeps it for later calls, and the VMM's socket serves
    one client at a time: a test's next connection would wait behind it)."""
    agent = LocalAgent()
    try:
        return agent.wait_hello(channel=channel, timeout=timeout, serial_log=serial_log,
                                alive=lambda: vmmproc.pid_alive(pid))
    finally:
        agent.release(channel=channel)


def agent_uname(channel: Path) -> tuple[str, str]:
    """Straight to a running guest's agent over its channel (the VMM's socket): its
    HELLO's boot id, and ``uname -r`` run through it.

    No pause before connecting: a host that reconnects at once may hide the previous
    host's hang-up from the agent (virtio-serial), and the client's HELLO_REQ still gets a
    HELLO (and a new session)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(channel))
    with AgentConnection(sock, name="e2e") as conn:
        hello = conn.wait_hello(30)
        status, out, err = conn.exec(["uname", "-r"], env=AGENT_ENV).collect(30)
    assert status.returncode == 0, err
    return hello.boot_id, out.decode().strip()


DEFAULT_IMAGE_DIR = IMAGES_DIR / "debian-bookworm"


def cached_image(name: str) -> imagebuild.ImageArtifacts:
    """Image ``name`` from the shared test cache, built there first if missing or stale."""
    for tool in (qemu_cmdline.QEMU, "qemu-img", "mmdebstrap", "ssh"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    d = IMAGES_DIR / name
    if imagebuild.is_current(d):
        return imagebuild.load_image(d)
    return imagebuild.build_default_image(d, variant=imagebuild.IMAGE_VARIANTS[name],
                                          on_progress=lambda s: print(f"image: {s}"),
                                          agent_cache=IMAGES_DIR.parent)


@pytest.fixture(scope="session")
def image() -> imagebuild.ImageArtifacts:
    return cached_image(DEFAULT_IMAGE_DIR.name)


@pytest.fixture(scope="session")
def accel() -> str:
    choice = kvm.probe_accel()
    print(f"accel: {choice.accel} ({choice.reason})")
    return choice.accel


@dataclass
class Vm:
    dir: Path
    cfg: LaunchSpec
    accel: str
    key: Path
    known_hosts: Path
    alias: str
    pid: int | None = None

    @property
    def ssh_port(self) -> int:
        return ssh_port(self.cfg)

    def ssh_argv(self, command: str) -> list[str]:
        return [*ssh.ssh_base_argv(port=self.ssh_port, key=self.key,
                                   known_hosts=self.known_hosts, alias=self.alias),
                command]

    def ssh(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.ssh_argv(command), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def assert_powers_off(self, pid: int, command: str, within: float) -> None:
        """``command`` in the guest ends the VMM within ``within`` s, leaving nothing."""
        started = time.monotonic()
        # The connection drops as the guest powers off: ssh's own status is meaningless.
        self.ssh(command)
        while vmmproc.pid_alive(pid) and time.monotonic() - started < within:
            time.sleep(0.1)
        assert not vmmproc.pid_alive(pid), f"QEMU still running {within:.0f} s after {command}"
        print(f"{command} to VMM exit: {time.monotonic() - started:.1f} s")
        assert vmmproc.find_qemu_pid(self.cfg.control_socket) is None
        assert vmmproc.port_is_free(self.ssh_port)


@pytest.fixture
def vm(image: imagebuild.ImageArtifacts, accel: str) -> Iterator[Vm]:
    """Disks and config of a fresh VM (not launched); afterwards, nothing may be left."""
    yield from _fresh_vm(image, accel)


def _fresh_vm(image: imagebuild.ImageArtifacts, accel: str,
              kernel: str = "microvm") -> Iterator[Vm]:
    """``kernel``: "microvm" boots banger's kernel with no initramfs (what the daemon does
    by default); "cloud" the image's Debian cloud kernel and its initramfs (the fallback)."""
    d = Path(tempfile.mkdtemp(prefix="bvm-", dir="/tmp"))  # short: QMP socket path limit
    key = d / "id_ed25519"
    pub = ssh.ensure_key(key)
    disks.create_overlay(image.rootfs, d / "root.qcow2")
    disks.build_work_disk(d / "work.ext4", 1 << 30, {
        ".ssh/authorized_keys": (f"{pub}\n".encode(), 0o600),
        ".banger/hostname": (b"e2e-box\n", 0o644),
    })
    if kernel == "cloud":
        boot_kernel, initrd = image.kernel, image.initrd
    else:
        assert image.microvm_kernel is not None, "the image has no microVM kernel"
        boot_kernel, initrd = image.microvm_kernel, None
    cfg = user_spec(d, kernel=boot_kernel, initrd=initrd, memory_mib=512,
                    ssh_port=vmmproc.free_port(), hostname="e2e-box", cmdline=image.cmdline,
                    backing=image.rootfs)
    machine = Vm(dir=d, cfg=cfg, accel=accel, key=key, known_hosts=d / "known_hosts",
                 alias="e2e-box")
    try:
        yield machine
    finally:
        leftover = vmmproc.find_qemu_pid(cfg.control_socket)
        if leftover is not None:
            vmmproc.kill_and_wait(leftover, signal.SIGKILL, 5)
        shutil.rmtree(d, ignore_errors=True)
        assert leftover is None, f"a QEMU (pid {leftover}) was left running"


@pytest.fixture
def cloud_vm(image: imagebuild.ImageArtifacts, accel: str) -> Iterator[Vm]:
    """Like ``vm``, booting the Debian cloud kernel and its initramfs (the fallback)."""
    yield from _fresh_vm(image, accel, kernel="cloud")


SYSTEMD_IMAGE_DIR = IMAGES_DIR / "debian-bookworm-systemd"


@pytest.fixture(scope="session")
def systemd_image() -> imagebuild.ImageArtifacts:
    """The systemd variant, built once per machine like the default image."""
    return cached_image(SYSTEMD_IMAGE_DIR.name)


@pytest.fixture
def systemd_vm(systemd_image: imagebuild.ImageArtifacts, accel: str) -> Iterator[Vm]:
    """Like ``vm``, from the systemd image."""
    yield from _fresh_vm(systemd_image, accel)
