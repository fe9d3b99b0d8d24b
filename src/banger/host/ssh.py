"""Reaching a guest over SSH with the system ``ssh`` binary.

Owns banger's SSH key, the ssh option set (own known_hosts, trust on first use, a host
key alias per VM because forwarded ports are reused by different VMs), readiness (the
SSH banner and a real key login, never just a TCP connect: QEMU's user-mode forward
accepts TCP before the guest listens) and known_hosts cleanup.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from banger.host import knownhosts
from banger.host.runner import CommandError, run
from banger.local.logtail import tail_lines
from banger.local.sshconfig import LOCKDOWN

CONNECT_TIMEOUT = 10
# How long one banner wait may take: a starved guest under TCG can take seconds to
# fork sshd's child, and reconnecting sooner only forks more children and slows it
# further. The first waits are short, because before the guest's network is up QEMU
# holds the connection while its SYN to the guest is dropped and retried with backoff:
# a fresh connection gets a fresh SYN. Each wait that ends without a banner doubles the
# next one, so a slow sshd is soon given the full wait.
FIRST_BANNER_WAIT = 1.0
BANNER_WAIT = 10.0
# After the guest refused the connection (QEMU hangs up at once): nothing was forked in
# the guest, so retrying soon is cheap.
QUICK_RETRY = 0.25
# After a failed login.
RETRY_PAUSE = 1.0
TAIL_LINES = 15
# banger-init prints this just before it execs sshd. Seeing it means a connection still
# waiting for a banner is probably stuck behind a SYN QEMU sent before the guest network
# was up (retried only after seconds): reconnecting then is free and much faster.
SSHD_MARKER = b"banger: "
SSHD_MARKER_TEXT = b"sshd started"
# Output cap for the readiness probe, whose output banger only reads for an error
# message: the guest chooses what comes back, and the runner kills an ssh that brings
# more.
CHATTER_CAP = 64 << 10
# RFC 4253: the identification line is at most 255 bytes, and the lines a server may
# send before it are short too. More than this without a line end is not an SSH server,
# and reading on would let the guest fill our memory for the whole banner wait.
MAX_BANNER_BYTES = 8192


class SshError(Exception):
    """SSH to the guest failed for a reason other than a timeout."""


class SshTimeout(SshError):
    """The guest did not become reachable over SSH in time."""


class VmmDied(SshError):
    """The VMM process went away while waiting for the guest."""


def ensure_key(path: Path) -> str:
    """Create an ed25519 key at ``path`` unless one exists; returns the public key line."""
    pub = path.with_name(path.name + ".pub")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Made aside and linked into place: concurrent first starts (threads or processes)
        # must not race ssh-keygen on one path; the first link wins, the others use it.
        with tempfile.TemporaryDirectory(prefix=".keygen-", dir=path.parent) as tmp:
            new = Path(tmp) / "key"
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "banger",
                 "-f", str(new)])
            try:
                os.link(new, path)
            except FileExistsError:
                pass
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(new.with_name("key.pub"), pub)
    path.chmod(0o600)
    if not pub.exists():
        # Derive the public half again from the private key.
        res = run(["ssh-keygen", "-y", "-f", str(path)])
        pub.write_text(res.stdout.strip() + "\n")
    return pub.read_text().strip()


def host_keypair(tmp_dir: Path) -> tuple[bytes, str]:
    """A fresh ed25519 host key for a guest: (private key file bytes, public key line).

    Handed to the guest on its work disk as ``.banger/ssh_host_ed25519_key`` (0600) and
    ``.banger/ssh_host_ed25519_key.pub``, with :func:`trust_host_key` on the host, the
    very first connection is verified instead of trusted on first use. The key pair is
    made in ``tmp_dir`` (the daemon's scratch directory, swept at its start).
    """
    with tempfile.TemporaryDirectory(prefix="hostkey-", dir=tmp_dir) as tmp:
        key = Path(tmp) / "key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "banger-guest",
             "-f", str(key)])
        return key.read_bytes(), key.with_name("key.pub").read_text().strip()


def trust_host_key(known_hosts: Path, alias: str, public_key: str) -> None:
    """Record ``public_key`` as the only key of ``alias`` in ``known_hosts``."""
    remove_known_host(known_hosts, alias)
    keytype, blob = public_key.split()[:2]
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    with known_hosts.open("a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # a last line without its newline: the pin starts a line of its own
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(f"{alias} {keytype} {blob}\n".encode())


def ssh_base_argv(*, port: int, key: Path, known_hosts: Path, alias: str,
                  user: str = "root", batch: bool = True, host: str = "127.0.0.1",
                  user_config: bool = False) -> list[str]:
    """``ssh`` and its options, ending with the destination: append a command (or
    ``-t`` and nothing for an interactive shell). ``batch=False`` for a person.

    :data:`~banger.local.sshconfig.LOCKDOWN` comes first: ssh keeps the first value it
    finds, so no ``~/.ssh/config`` (nor anything appended) can forward to the guest.
    banger's own calls read no ssh config at all (``-F none``): a ``SendEnv`` there adds
    to the list rather than being overridden, and would hand the daemon's environment to
    a guest that accepts it. ``user_config=True`` for the argv a person's session runs
    (``vm ssh``, ``vm run``): their config applies, under LOCKDOWN."""
    argv = ["ssh"] if user_config else ["ssh", "-F", "none"]
    for option, value in LOCKDOWN:
        argv += ["-o", f"{option}={value}"]
    argv += [
        "-p", str(port), "-i", str(key),
        "-o", "IdentitiesOnly=yes",
        "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"HostKeyAlias={alias}",
        "-o", "LogLevel=ERROR",
        "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
        "-o", "ServerAliveInterval=15",
        "-o", "ServerAliveCountMax=4",
    ]
    if batch:
        argv += ["-o", "BatchMode=yes"]
    return [*argv, f"{user}@{host}"]


def read_banner(port: int, timeout: float, host: str = "127.0.0.1") -> str | None:
    """The SSH identification line if one arrives on ``port`` within ``timeout`` s."""
    return _try_banner(host, port, timeout)[0]


class _SerialWatch:
    """Notices, cheaply and incrementally, when the guest says sshd was started."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.tail = b""
        self.seen = False

    def poll(self) -> bool:
        """True once the marker has appeared (and stays true)."""
        if self.seen:
            return True
        try:
            with self.path.open("rb") as f:
                if os.fstat(f.fileno()).st_size < self.offset:
                    self.offset, self.tail = 0, b""  # rotated (host/seriallog.py)
                f.seek(self.offset)
                data = f.read(1 << 20)
        except OSError:
            return False
        self.offset += len(data)
        buf = self.tail + data
        for line in buf.splitlines():
            if line.startswith(SSHD_MARKER) and SSHD_MARKER_TEXT in line:
                self.seen = True
        self.tail = buf[-256:]
        return self.seen


def _try_banner(host: str, port: int, timeout: float,
                interrupt: Callable[[], bool] | None = None) -> tuple[str | None, bool]:
    """(banner or None, whether the other end hung up or refused before ``timeout``).

    ``interrupt`` is polled while nothing has arrived; when it says so, the attempt ends
    early as if the other end had hung up.
    """
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while b"\n" not in data:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, False
                if interrupt is not None and not data and interrupt():
                    return None, True
                s.settimeout(min(left, 0.2) if interrupt is not None else left)
                try:
                    chunk = s.recv(256)
                except TimeoutError:
                    continue
                if not chunk:
                    # The forward accepted, but nothing listens inside (yet).
                    return None, True
                data += chunk
                if len(data) > MAX_BANNER_BYTES:
                    return None, True
            line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
            return (line if line.startswith("SSH-") else None), True
    except TimeoutError:
        return None, False
    except OSError:
        return None, True


def wait_ready(*, port: int, key: Path, known_hosts: Path, alias: str, timeout: float,
               serial_log: Path, alive: Callable[[], bool], host: str = "127.0.0.1") -> float:
    """Wait until ``ssh ... true`` succeeds; returns the seconds waited.

    Raises :class:`VmmDied` as soon as ``alive()`` is false and :class:`SshTimeout`
    after ``timeout`` s; both messages carry the serial log's path and last lines.
    """
    started = time.monotonic()
    deadline = started + timeout
    last_error = "no SSH banner yet"
    banner_wait = FIRST_BANNER_WAIT
    # Until the guest has shown that its network is up (it refused a connection) or that
    # sshd runs (the serial marker), a connection without a banner costs the guest
    # nothing and the wait stays short; after that a silent connection may be a slow
    # sshd, and waits double.
    guest_listening = False
    watch = _SerialWatch(serial_log)
    probe = [*ssh_base_argv(port=port, key=key, known_hosts=known_hosts, alias=alias,
                            host=host), "true"]
    while True:
        if not alive():
            raise VmmDied(_with_tail(f"the VM process exited while waiting for SSH on "
                                     f"{host}:{port} ({last_error})", serial_log))
        left = deadline - time.monotonic()
        if left <= 0:
            raise SshTimeout(_with_tail(f"SSH on {host}:{port} not ready after "
                                        f"{timeout:.0f} s ({last_error})", serial_log))
        this_wait = min(banner_wait, left)
        marker_before = watch.poll()
        guest_listening = guest_listening or marker_before
        interrupt = None if marker_before else watch.poll
        banner, hung_up = _try_banner(host, port, this_wait, interrupt)
        if banner is not None:
            try:
                run(probe, timeout=max(5.0, min(30.0, left)), max_output=CHATTER_CAP)
                return time.monotonic() - started
            except CommandError as exc:
                last_error = f"ssh login failed: {_last_line(exc)}"
                pause = RETRY_PAUSE
        elif hung_up:
            # Refused by the guest (its network is up), or the marker just appeared.
            guest_listening = True
            pause = 0.0 if watch.seen and not marker_before else QUICK_RETRY
        else:
            last_error = f"connected, but no SSH banner within {this_wait:.1f} s"
            if guest_listening:
                banner_wait = min(banner_wait * 2, BANNER_WAIT)
            pause = 0.0
        if pause > 0:
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))


def _last_line(exc: CommandError) -> str:
    lines = (exc.stderr or "").strip().splitlines()
    return lines[-1] if lines else (exc.reason or f"exit {exc.returncode}")


def _with_tail(message: str, serial_log: Path) -> str:
    try:
        lines = tail_lines(serial_log, TAIL_LINES)
    except OSError as exc:
        return f"{message}\nserial log {serial_log}: {exc.strerror}"
    body = "\n".join(f"  {line}" for line in lines) or "  (empty)"
    return f"{message}\nlast lines of the serial log {serial_log}:\n{body}"


def remove_known_host(known_hosts: Path, alias: str) -> None:
    """Forget ``alias``'s host key; a missing file or entry is fine."""
    knownhosts.remove(known_hosts, alias)
