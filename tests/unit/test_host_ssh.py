"""ssh helpers: key, option set, known_hosts, and readiness against fake servers."""

from __future__ import annotations

import contextlib
import shutil
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.host import ssh
from tests.hostile_ssh import HOSTILE_USER_CONFIG, assert_forwards_nothing


def test_ensure_key(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "id_ed25519"
    pub = ssh.ensure_key(key)
    assert pub.startswith("ssh-ed25519 ")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert ssh.ensure_key(key) == pub  # idempotent
    key.with_name("id_ed25519.pub").unlink()
    assert ssh.ensure_key(key).split()[:2] == pub.split()[:2]  # derived again


def test_base_argv(tmp_path: Path) -> None:
    argv = ssh.ssh_base_argv(port=2201, key=tmp_path / "k", known_hosts=tmp_path / "kh",
                             alias="banger-vm1")
    assert argv[0] == "ssh" and argv[-1] == "root@127.0.0.1"
    assert argv[argv.index("-p") + 1] == "2201"
    opts = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    for o in ("IdentitiesOnly=yes", f"UserKnownHostsFile={tmp_path / 'kh'}",
              "StrictHostKeyChecking=accept-new", "HostKeyAlias=banger-vm1",
              "BatchMode=yes", "LogLevel=ERROR"):
        assert o in opts
    interactive = ssh.ssh_base_argv(port=1, key=Path("k"), known_hosts=Path("kh"),
                                    alias="a", batch=False)
    assert "BatchMode=yes" not in interactive


def test_remove_known_host(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    ssh.remove_known_host(kh, "vm1")  # no file: fine
    pub = ssh.ensure_key(tmp_path / "k").split()
    kh.write_text(f"vm1 {pub[0]} {pub[1]}\nvm2 {pub[0]} {pub[1]}\n")
    ssh.remove_known_host(kh, "vm1")
    ssh.remove_known_host(kh, "vm1")  # idempotent
    assert kh.read_text().split()[0] == "vm2"
    assert not kh.with_name("known_hosts.old").exists()


@pytest.fixture
def serial(tmp_path: Path) -> Path:
    log = tmp_path / "serial.log"
    log.write_text("".join(f"boot line {i}\n" for i in range(40)))
    return log


class FakeForward:
    """Like QEMU's user-mode forward before the guest listens: accept, then hang up.
    With ``banner``, an SSH server that greets and then hangs up."""

    def __init__(self, banner: bytes = b"") -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.banner = banner
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            with conn:
                if self.banner:
                    conn.sendall(self.banner)
                    time.sleep(0.05)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def forward() -> Iterator[FakeForward]:
    f = FakeForward()
    yield f
    f.close()


def wait(port: int, tmp_path: Path, serial: Path, timeout: float,
         alive: bool = True) -> float:
    return ssh.wait_ready(port=port, key=tmp_path / "k", known_hosts=tmp_path / "kh",
                          alias="vm1", timeout=timeout, serial_log=serial,
                          alive=lambda: alive)


def test_dead_vmm_stops_the_wait_at_once(tmp_path: Path, serial: Path,
                                        forward: FakeForward) -> None:
    started = time.monotonic()
    with pytest.raises(ssh.VmmDied) as err:
        wait(forward.port, tmp_path, serial, 30, alive=False)
    assert time.monotonic() - started < 1
    assert str(serial) in str(err.value) and "boot line 39" in str(err.value)


def test_timeout_names_the_serial_log_and_paces_reconnects(
        tmp_path: Path, serial: Path, forward: FakeForward) -> None:
    started = time.monotonic()
    with pytest.raises(ssh.SshTimeout) as err:
        wait(forward.port, tmp_path, serial, 3)
    took = time.monotonic() - started
    assert 2.9 < took < 5
    msg = str(err.value)
    assert str(serial) in msg
    assert "boot line 39" in msg and "boot line 25" in msg and "boot line 24" not in msg
    # Refused connections are retried soon, but not in a tight loop.
    assert forward.connections <= 3 / ssh.QUICK_RETRY + 2


def count_and_drain(holder: socket.socket) -> int:
    holder.settimeout(0)
    count = 0
    while True:
        try:
            holder.accept()[0].close()
            count += 1
        except BlockingIOError:
            return count


@pytest.fixture
def holder() -> Iterator[socket.socket]:
    """Accepted by the kernel, never answered: like a connection QEMU holds while its
    SYN to a guest without network is retried, or like a starved sshd."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    yield s
    s.close()


def test_silent_connections_before_sshd_runs_stay_short(
        tmp_path: Path, serial: Path, holder: socket.socket) -> None:
    with pytest.raises(ssh.SshTimeout, match="no SSH banner within"):
        wait(holder.getsockname()[1], tmp_path, serial, 3.5)
    assert count_and_drain(holder) == 4  # 1 s each: reconnecting costs the guest nothing


def test_silent_connections_once_sshd_runs_get_doubling_waits(
        tmp_path: Path, serial: Path, holder: socket.socket) -> None:
    with serial.open("a") as f:
        f.write("banger: [3.10s] sshd started\n")
    with pytest.raises(ssh.SshTimeout, match="no SSH banner within"):
        wait(holder.getsockname()[1], tmp_path, serial, 3.5)
    assert count_and_drain(holder) == 3  # 1 s, 2 s, then the 0.5 s that is left


def test_marker_cuts_a_stuck_attempt_short(tmp_path: Path, serial: Path,
                                           holder: socket.socket) -> None:
    def later() -> None:
        time.sleep(0.5)
        with serial.open("a") as f:
            f.write("banger: [3.10s] sshd started\n")

    threading.Thread(target=later).start()
    with pytest.raises(ssh.SshTimeout):
        wait(holder.getsockname()[1], tmp_path, serial, 1.5)
    # 0.5 s into the first 1 s wait the marker appears: reconnect at once, then 1 s.
    assert count_and_drain(holder) == 2


def test_missing_serial_log_is_said(tmp_path: Path, forward: FakeForward) -> None:
    with pytest.raises(ssh.SshTimeout, match="No such file"):
        wait(forward.port, tmp_path, tmp_path / "nope.log", 1)


def test_host_key_handed_in_is_trusted(tmp_path: Path) -> None:
    private, public = ssh.host_keypair(tmp_path)
    assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.startswith("ssh-ed25519 ")
    kh = tmp_path / "known_hosts"
    kh.write_text("vm1 ssh-ed25519 AAAAold\nvm2 ssh-ed25519 AAAAother\n")
    ssh.trust_host_key(kh, "vm1", public)
    lines = sorted(kh.read_text().splitlines())
    assert lines == sorted(["vm2 ssh-ed25519 AAAAother",
                            f"vm1 {public.split()[0]} {public.split()[1]}"])


def test_ensure_key_concurrent_first_use_yields_one_key(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor
    key = tmp_path / "ssh" / "id_ed25519"
    with ThreadPoolExecutor(8) as pool:
        pubs = list(pool.map(lambda _: ssh.ensure_key(key), range(8)))
    assert len(set(pubs)) == 1 and pubs[0].startswith("ssh-ed25519 ")
    assert sorted(p.name for p in key.parent.iterdir()) == ["id_ed25519", "id_ed25519.pub"]


def test_a_banner_without_end_is_not_read_forever() -> None:
    # A guest that answers on port 22 with bytes and never a line end: the banner wait
    # stops reading at once instead of buffering all of it until the timeout.
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def flood() -> None:
        conn, _ = srv.accept()
        with conn, contextlib.suppress(OSError):
            while True:
                conn.sendall(b"x" * 65536)

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    started = time.monotonic()
    assert ssh.read_banner(srv.getsockname()[1], timeout=5) is None
    assert time.monotonic() - started < 2
    srv.close()
    t.join(5)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client (openssh-client)")
def test_base_argv_forwards_nothing_whatever_the_user_config(tmp_path: Path) -> None:
    user = tmp_path / "config"
    user.write_text(HOSTILE_USER_CONFIG)
    for batch in (True, False):
        argv = ssh.ssh_base_argv(port=2201, key=tmp_path / "k", known_hosts=tmp_path / "kh",
                                 alias="banger-vm1", batch=batch, user_config=True)
        # -G prints what ssh would use, without connecting; -F stands for ~/.ssh/config.
        out = subprocess.run(["ssh", "-G", "-F", str(user), *argv[1:]], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        assert_forwards_nothing(out)
    # banger's options come before anything a caller appends or the CLI inserts.
    assert argv[1:3] == ["-o", "ForwardAgent=no"]


def test_bangers_own_ssh_reads_no_user_config(tmp_path: Path) -> None:
    # SendEnv adds up (a -o cannot clear it): banger's own calls must not read the user's
    # ssh config at all, or the daemon's environment could go to the guest. ssh finds
    # ~/.ssh/config through the passwd entry, so the test names it with -F, put first:
    # a later -F (banger's "none") wins.
    user = tmp_path / "config"
    user.write_text("Host *\n  SendEnv BANGER_SECRET_*\n  ForwardAgent yes\n"
                    "  User someone\n")
    own = ssh.ssh_base_argv(port=2201, key=tmp_path / "k", known_hosts=tmp_path / "kh",
                            alias="banger-vm1")
    out = subprocess.run(["ssh", "-G", "-F", str(user), *own[1:]], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    assert "sendenv banger_secret_*" not in out.lower() and "user root" in out
    assert_forwards_nothing(out)
    person = ssh.ssh_base_argv(port=2201, key=tmp_path / "k", known_hosts=tmp_path / "kh",
                               alias="banger-vm1", user_config=True)
    out = subprocess.run(["ssh", "-G", "-F", str(user), *person[1:]], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    assert "sendenv banger_secret_*" in out.lower()  # a person's own config still applies
    assert_forwards_nothing(out)
