"""Real VMs through the real CLI and daemon: exit codes, lifecycle, persistence, faults."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from banger.host import imagebuild, kernelbuild
from tests.e2e.conftest import (
    IMAGES_DIR,
    Banger,
    assert_nothing_left,
    make_banger,
    qemu_pids,
)

pytestmark = pytest.mark.e2e


def test_run_returns_guest_exit_code_and_keeps_vm(banger: Banger) -> None:
    proc = banger.run("vm", "run", "--name", "ec", "--", "sh", "-c", "exit 42", check=False)
    assert proc.returncode == 42, proc.stderr
    assert "started bangerd" in proc.stderr  # autostart is announced
    assert "ready in" in proc.stderr
    # Readiness is the agent's hello; a start never waits for sshd.
    assert "✓ wait_agent" in proc.stderr and "said hello after" in proc.stderr
    assert "wait_ssh" not in proc.stderr
    vm = banger.show("ec")
    # The agent runs commands for the host (vm exec): the recorded boot id is the guest's.
    boot_id = banger.run("vm", "exec", "ec", "--", "cat",
                         "/proc/sys/kernel/random/boot_id").stdout.strip()
    release = banger.run("vm", "exec", "ec", "--", "uname", "-r").stdout.strip()
    assert boot_id == vm["boot_id"], "the recorded boot id is the guest's own"
    assert release == banger.run("vm", "ssh", "ec", "--", "uname", "-r").stdout.strip()
    # The default kernel is banger's microVM kernel (kernelbuild's banner), no initramfs.
    assert vm["kernel"] == "microvm" and not release.endswith("-cloud-amd64")
    assert "banger@banger" in banger.run("vm", "ssh", "ec", "--", "cat",
                                         "/proc/version").stdout
    assert vm["state"] == "running", "a VM run with -- cmd and no --rm stays running"
    # argv arrives intact; a signal becomes 128+n.
    out = banger.run("vm", "ssh", "ec", "--", "printf", "%s|", "a b", "c'd", "$HOME")
    assert out.stdout == "a b|c'd|$HOME|"
    sig = banger.run("vm", "ssh", "ec", "--", "sh", "-c", "kill -TERM $$", check=False)
    assert sig.returncode == 128 + signal.SIGTERM


def test_cloud_kernel_is_a_choice_the_vm_remembers(banger: Banger) -> None:
    banger.run("vm", "create", "--name", "ck", "--kernel", "cloud")
    vm = banger.show("ck")
    assert vm["kernel"] == "cloud" and vm["state"] == "running"
    uname = banger.run("vm", "ssh", "ck", "--", "uname", "-r").stdout.strip()
    assert uname.endswith("-cloud-amd64")
    banger.run("vm", "stop", "ck")
    banger.run("vm", "start", "ck")  # the record keeps the choice across restarts
    assert banger.run("vm", "ssh", "ck", "--", "uname", "-r").stdout.strip() == uname


def test_ports_lists_guest_listeners(banger: Banger) -> None:
    banger.run("vm", "run", "-d", "--name", "pt")
    # busybox httpd daemonizes at once: the ssh call returns, the listeners stay.
    banger.run("vm", "ssh", "pt", "--", "sh", "-c",
               "busybox httpd -p 8080 -h /tmp && busybox httpd -p 127.0.0.1:8081 -h /tmp")
    rt = banger.show("pt")["runtime"]
    assert isinstance(rt, dict)
    ports = banger.json("vm", "ports", "pt")
    assert isinstance(ports, list)

    def find(port: int) -> list[dict[str, object]]:
        return [p for p in ports if p["proto"] == "tcp" and p["port"] == port]

    web, local, ssh = find(8080), find(8081), find(22)
    assert len(web) == 1 and web[0]["process"] == "busybox", ports
    assert web[0]["endpoint"] is None and "user networking" in str(web[0]["note"])
    assert local == [{"proto": "tcp", "address": "127.0.0.1", "port": 8081,
                      "process": "busybox", "endpoint": None,
                      "note": "guest loopback only"}], ports
    forwarded = [p for p in ssh if p["endpoint"] is not None]
    assert [p["endpoint"] for p in forwarded] == [f"127.0.0.1:{rt['ssh_port']}"], ports
    assert all(p["process"] == "sshd" for p in ssh), ports
    table = banger.run("vm", "ports", "pt").stdout
    assert table.split()[:5] == ["PROTO", "ADDRESS", "PORT", "PROCESS", "ENDPOINT"]
    assert f"127.0.0.1:{rt['ssh_port']}" in table
    banger.run("vm", "delete", "pt")
    proc = banger.run("vm", "ports", "pt", check=False)
    assert proc.returncode == 1 and "no VM named 'pt'" in proc.stderr


def test_interactive_run_keeps_vm_running(banger: Banger) -> None:
    # A real terminal for ssh -t: script(1) gives the session a pty.
    cli = " ".join(banger.argv("vm", "run", "--name", "tty"))
    proc = subprocess.run(["script", "-qec", cli, "/dev/null"], env=banger.env,
                          input="echo inside-$(hostname)\nexit\n", capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "inside-tty" in proc.stdout
    assert "tty is still running" in proc.stdout  # the reminder (stderr joins the pty)
    assert banger.show("tty")["state"] == "running"


def test_run_rm_deletes_vm(banger: Banger) -> None:
    proc = banger.run("vm", "run", "--rm", "--", "cat", "/etc/os-release")
    assert "bookworm" in proc.stdout
    assert json.loads(banger.run("vm", "list", "--json").stdout) == []
    assert_nothing_left(banger)


def test_lifecycle_persistence_and_set(banger: Banger) -> None:
    banger.run("vm", "create", "--name", "box")
    vm = banger.show("box")
    rt = vm["runtime"]
    assert isinstance(rt, dict) and rt["accel"] in ("kvm", "tcg")
    doctor = banger.json("doctor")
    assert isinstance(doctor, dict)
    accel = next(c for c in doctor["checks"] if c["name"] == "acceleration")
    assert accel["detail"].startswith(rt["accel"])
    # The work disk is /root, owned by root, and persists across stop/start.
    banger.run("vm", "ssh", "box", "--", "sh", "-c", "echo kept > /root/note && sync")
    assert banger.run("vm", "ssh", "box", "--", "hostname").stdout.strip() == "box"
    banger.run("vm", "stop", "box")
    assert banger.show("box")["state"] == "stopped"
    # Graceful first: the guest powered itself off; no QMP quit or kill was needed.
    log = (banger.home / "state" / "bangerd.log").read_text()
    assert re.search(r"stop ok vm=box stage=guest_poweroff", log), log[-2000:]
    assert "stage=vmm_quit" not in log
    assert qemu_pids(str(banger.home)) == []
    banger.run("vm", "set", "box", "--vcpu", "2", "--memory", "1024")
    banger.run("vm", "start", "box")
    assert banger.run("vm", "ssh", "box", "--", "cat", "/root/note").stdout == "kept\n"
    assert banger.run("vm", "ssh", "box", "--", "nproc").stdout.strip() == "2"
    meminfo = banger.run("vm", "ssh", "box", "--", "head", "-1", "/proc/meminfo").stdout
    mem_kib = int(re.findall(r"\d+", meminfo)[0])
    assert 800 * 1024 < mem_kib <= 1024 * 1024
    boot1 = banger.show("box")["boot_id"]
    banger.run("vm", "restart", "box")
    assert banger.show("box")["boot_id"] != boot1
    logs = banger.run("vm", "logs", "box").stdout
    assert "sshd started" in logs
    banger.run("vm", "kill", "box")
    assert banger.show("box")["state"] == "stopped"
    assert qemu_pids(str(banger.home)) == []
    banger.run("vm", "delete", "box")
    assert_nothing_left(banger)


@pytest.mark.parametrize("stage", ["preflight", "cleanup_runtime", "socket_dir",
                                   "system_overlay", "work_disk", "port_forward",
                                   "qemu_launch", "wait_agent", "post_start_features"])
def test_failpoint_at_every_stage_leaves_nothing(image_dir: Path, stage: str) -> None:
    b = make_banger(images_dir=image_dir, extra_env={"BANGER_FAILPOINT": stage})
    try:
        proc = b.run("vm", "create", "--name", "fp", check=False)
        assert proc.returncode == 1
        assert f"stage {stage}" in proc.stderr and "operation op-" in proc.stderr
        vm = b.show("fp")
        assert vm["state"] == "error" and vm["last_error_stage"] == stage
        assert "failpoint" in str(vm["last_error"])
        assert qemu_pids(str(b.home)) == []
        vm_dir = Path(str(vm["dir"]))
        assert sorted(p.name for p in vm_dir.iterdir() if p.suffix not in (".log",)) == []
        assert not any((b.home / "run" / "vms").glob("*/*")) if (
            b.home / "run" / "vms").exists() else True
        b.run("vm", "delete", "fp")
        assert_nothing_left(b)
    finally:
        b.stop_daemon()
        for pid in qemu_pids(str(b.home)):
            os.kill(pid, signal.SIGKILL)


def test_vmm_dying_right_after_launch_is_reported(banger: Banger) -> None:
    banger.run("doctor")  # start the daemon first; the watcher below must only see QEMU
    killed: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            for pid in qemu_pids(str(banger.home)):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    t = threading.Thread(target=watch)
    t.start()
    proc = banger.run("vm", "create", "--name", "dies", check=False)
    t.join()
    assert killed, "QEMU never appeared"
    assert proc.returncode == 1
    vm = banger.show("dies")
    assert vm["state"] == "error"
    assert vm["last_error_stage"] in ("qemu_launch", "wait_agent")
    assert "exit" in str(vm["last_error"]).lower()
    assert qemu_pids(str(banger.home)) == []
    banger.run("vm", "delete", "dies")
    assert_nothing_left(banger)


def test_daemon_sigkill_and_corrupt_handles_keep_vm(banger: Banger) -> None:
    banger.run("vm", "create", "--name", "box")
    before = banger.show("box")
    pid = before["runtime"]["pid"]  # type: ignore[index]
    banger.stop_daemon(signal.SIGKILL)
    assert Path(f"/proc/{pid}").exists(), "the VM must survive its daemon"
    Path(str(before["dir"]), "handles.json").write_text("{garbage")
    # The CLI restarts the daemon, which reconciles: same VM, same VMM pid, ssh works.
    banger.run("vm", "ssh", "box", "--", "true")
    after = banger.show("box")
    assert after["state"] == "running"
    assert after["runtime"]["pid"] == pid  # type: ignore[index]
    assert "qemu-system" in Path(f"/proc/{pid}/cmdline").read_text()
    banger.run("vm", "delete", "box")
    assert_nothing_left(banger)


def test_several_vms_concurrently(banger: Banger) -> None:
    banger.run("vm", "create", "--name", "one", "--no-start")
    banger.run("vm", "create", "--name", "two", "--no-start")
    proc = banger.run("vm", "start", "one", "two", "ghost", check=False)
    assert proc.returncode == 1 and "no VM named 'ghost'" in proc.stderr
    assert "one: running" in proc.stdout and "two: running" in proc.stdout
    banger.run("vm", "stop", "one", "two")
    out = banger.run("vm", "prune", "-f")
    assert "one: deleted" in out.stdout and "two: deleted" in out.stdout
    assert_nothing_left(banger)


def _nonroot_user() -> str | None:
    if os.geteuid() != 0:
        return None  # already unprivileged: the other tests cover it
    name = "bangertest"
    if subprocess.run(["id", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--create-home", name], check=True)
    return name


def _world_readable_install() -> str:
    """banger installed where an unprivileged user can run it (/root is 0700 here)."""
    venv = Path("/opt/banger-e2e-venv")
    repo = Path(__file__).resolve().parents[2]
    if not (venv / "bin" / "python").exists():
        subprocess.run(["uv", "venv", "-q", "--python", "/usr/bin/python3", str(venv)],
                       check=True)
    reqs = subprocess.run(["uv", "export", "--frozen", "--no-dev", "--no-emit-project",
                           "--no-hashes"], cwd=repo, check=True, capture_output=True,
                          text=True).stdout
    subprocess.run(["uv", "pip", "install", "-q", "--python", str(venv / "bin" / "python"),
                    "-r", "/dev/stdin"], input=reqs, text=True, check=True)
    subprocess.run(["uv", "pip", "install", "-q", "--reinstall", "--no-deps", "--python",
                    str(venv / "bin" / "python"), str(repo)], check=True)
    return str(venv / "bin" / "python")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create the unprivileged test user")
def test_non_root_user_builds_image_and_runs(tmp_path: Path) -> None:
    user = _nonroot_user()
    assert user
    python = _world_readable_install()
    images = Path("/tmp") / f"bg-img-{user}"
    images.mkdir(exist_ok=True)
    shutil.chown(images, user)
    b = make_banger(user=user, images_dir=images)
    b.python = python
    # The microVM kernel the e2e tier built once (conftest), in this daemon's cache: the
    # image build is what this test covers (compiling it again costs ~10 min).
    key = kernelbuild.current_key()
    seeded = b.home / "cache" / "kernel" / key
    shutil.copytree(IMAGES_DIR.parent / "kernel" / key, seeded)
    for p in (b.home / "cache", *(b.home / "cache").rglob("*")):
        shutil.chown(p, user)
    try:
        proc = b.run("vm", "run", "--rm", "--", "sh", "-c", "id -u; stat -c %u /root/.ssh "
                     "/root/.ssh/authorized_keys; exit 7", check=False, timeout=1200)
        assert proc.returncode == 7, proc.stderr
        assert proc.stdout.split() == ["0", "0", "0"]
        # Tap networking needs a root daemon: refused up front, with the way out named.
        tap = b.run("vm", "run", "--rm", "--network", "tap", "--", "true", check=False)
        assert tap.returncode == 1 and "needs root" in tap.stderr
        assert "--network user" in tap.stderr
        assert json.loads(b.run("vm", "list", "--json").stdout) == []
        assert_nothing_left(b)
        sock = b.home / "run" / "bangerd.sock"
        st = sock.stat()
        assert st.st_mode & 0o777 == 0o600 and st.st_uid != 0
    finally:
        b.stop_daemon()
        for pid in qemu_pids(str(b.home)):
            os.kill(pid, signal.SIGKILL)


def test_systemd_image_through_banger(banger: Banger,
                                      systemd_image: imagebuild.ImageArtifacts) -> None:
    proc = banger.run("vm", "run", "--rm", "--image", "debian-bookworm-systemd", "--",
                      "sh", "-c", "cat /proc/1/comm; systemctl is-system-running --wait; "
                      "hostname")
    lines = proc.stdout.split()
    assert lines[0] == "systemd" and lines[1] in ("running", "degraded")
    assert_nothing_left(banger)


def test_file_sync_and_host_git_identity(image_dir: Path, tmp_path: Path) -> None:
    gitcfg = tmp_path / "gitconfig"
    gitcfg.write_text("[user]\n\tname = Host Dev\n\temail = host@example.invalid\n")
    secret = tmp_path / "npmrc"
    secret.write_text("token=1\n")
    b = make_banger(images_dir=image_dir, extra_env={"GIT_CONFIG_GLOBAL": str(gitcfg)})
    (b.home / "config").mkdir()
    (b.home / "config" / "config.toml").write_text(
        f'[[file_sync]]\nhost = "{secret}"\nguest = "~/.npmrc"\nmode = "0600"\n'
        f'[[file_sync]]\nhost = "{tmp_path / "absent"}"\nguest = "~/.absent"\n')
    try:
        proc = b.run("vm", "run", "--rm", "--", "sh", "-c",
                     "cat ~/.npmrc; stat -c '%a %u' ~/.npmrc; git config --global user.email; "
                     "test -e ~/.absent || echo no-absent")
        assert proc.stdout.splitlines() == ["token=1", "600 0", "host@example.invalid",
                                            "no-absent"]
        assert "does not exist on the host: skipped" in proc.stderr
        (b.home / "config" / "config.toml").write_text('[[file_sync]]\nhost = "x"\n')
        # A broken config is refused before anything is made (the network default is
        # read from it at create); with the mode given, preflight reads and refuses it.
        bad = b.run("vm", "run", "--rm", "--", "true", check=False)
        assert bad.returncode == 1 and "host and guest" in bad.stderr
        assert json.loads(b.run("vm", "list", "--json").stdout) == []
        bad = b.run("vm", "run", "--rm", "--network", "user", "--", "true", check=False)
        assert bad.returncode == 1 and "stage preflight" in bad.stderr
        assert "host and guest" in bad.stderr
        for vm in json.loads(b.run("vm", "list", "--json").stdout):
            b.run("vm", "delete", vm["name"])
        assert_nothing_left(b)
    finally:
        b.stop_daemon()
        for pid in qemu_pids(str(b.home)):
            os.kill(pid, signal.SIGKILL)


def test_ssh_config_plain_ssh_reaches_vm(banger: Banger, tmp_path: Path) -> None:
    home = tmp_path / "home"
    user_config = home / ".ssh" / "config"
    user_config.parent.mkdir(parents=True, mode=0o700)
    original = "Host elsewhere.example\n    User nobody\n"
    user_config.write_text(original)
    user_config.chmod(0o600)
    # The CLI and the daemon it starts read ~ from $HOME. ssh does not (it asks passwd),
    # so it is pointed at the user's config with -F below.
    banger.env["HOME"] = str(home)
    banger.run("vm", "run", "-d", "--name", "sc")
    assert "added an Include" in banger.run("ssh-config", "--install").stdout
    assert "already installed" in banger.run("ssh-config", "--install").stdout
    doctor = banger.json("doctor")
    assert isinstance(doctor, dict)
    row = next(c for c in doctor["checks"] if c["name"] == "ssh-config")
    assert row["status"] == "pass", row

    def ssh(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ssh", "-F", str(user_config), "-o", "BatchMode=yes",
                               "sc.vm", *command], capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    proc = ssh("true")
    assert proc.returncode == 0, proc.stderr
    assert ssh("hostname").stdout.strip() == "sc"
    ssh_config = banger.home / "state" / "ssh" / "config"
    assert "Host sc.vm\n" in ssh_config.read_text()

    banger.run("vm", "delete", "sc")
    assert "Host sc.vm" not in ssh_config.read_text()
    assert "removed" in banger.run("ssh-config", "--uninstall").stdout
    assert user_config.read_text() == original
    assert user_config.stat().st_mode & 0o777 == 0o600
