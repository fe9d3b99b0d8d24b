"""Other local users (issue 8): the runtime directory, both ends of the socket, one daemon
per state directory, and the environment the daemon gets. Real banger and bangerd
processes; another uid (65534) plays the attacker where the test runs as root."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from banger.client.client import DaemonUnavailable, connect
from banger.daemon import lock
from banger.model.layout import EXIT_ALREADY_RUNNING
from tests.integration.processes import NOBODY, Home, as_nobody, home, needs_root, wait_gone

__all__ = ["home"]  # the fixture, imported for the tests below

# --- the runtime directory -------------------------------------------------------------


def _assert_refused_everywhere(home: Home, needle: str) -> None:
    r = home.cli("vm", "list")
    err = " ".join(r.stderr.split())  # rich wraps lines
    assert r.returncode == 1, r
    assert f"refusing runtime directory {home.run_dir}" in err and needle in err, err
    assert "XDG_RUNTIME_DIR" in err  # the fix is named
    d = home.daemon()
    _, err = d.communicate(timeout=60)
    assert d.returncode == 1 and f"refusing runtime directory {home.run_dir}" in err, err
    assert needle in err
    assert not (home.run_dir / "bangerd.sock").exists()
    assert home.daemons() == []


@needs_root
def test_runtime_dir_of_another_uid_is_refused_by_cli_and_daemon(home: Home) -> None:
    home.run_dir.mkdir()
    home.run_dir.chmod(0o777)
    os.chown(home.run_dir, NOBODY, NOBODY)
    _assert_refused_everywhere(home, f"owned by uid {NOBODY} (nobody)")
    st = home.run_dir.stat()  # left alone: not ours to chmod
    assert st.st_uid == NOBODY and st.st_mode & 0o777 == 0o777


def test_runtime_dir_as_a_symlink_is_refused_by_cli_and_daemon(home: Home) -> None:
    target = home.root / "elsewhere"
    target.mkdir(mode=0o700)
    home.run_dir.symlink_to(target)
    _assert_refused_everywhere(home, f"it is a symlink (to {target})")
    assert list(target.iterdir()) == []


def test_runtime_dir_is_made_private_and_loose_modes_fixed(home: Home) -> None:
    home.run_dir.mkdir(mode=0o755)
    os.chmod(home.run_dir, 0o755)
    assert home.cli("vm", "list").returncode == 0
    assert home.run_dir.stat().st_mode & 0o777 == 0o700
    assert (home.run_dir / "vms").stat().st_mode & 0o777 == 0o700


# --- the CLI checks who serves the socket --------------------------------------------

FAKE_DAEMON = textwrap.dedent("""
    import json, os, socket, sys
    path, marker = sys.argv[1], sys.argv[2]
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    os.chmod(path, 0o666)
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    s.listen(8)  # the kernel records the listener's credentials here: uid 65534
    ssh = {"host": "h", "port": 22, "user": "root", "key": "k", "known_hosts": "kh",
           "alias": "x", "vm": "x", "argv": ["/bin/bash", "-c", "touch " + marker]}
    routes = {"/v1/health": {"version": "0", "api": "v1", "pid": os.getpid()},
              "/v1/vms/x/ssh": ssh}
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        req = b""
        while b"\\r\\n\\r\\n" not in req:
            chunk = c.recv(4096)
            if not chunk:
                break
            req += chunk
        target = req.split(b" ")[1].decode() if req.count(b" ") >= 2 else ""
        body = json.dumps(routes.get(target, {"detail": "no"})).encode()
        c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n"
                  b"Content-Length: %d\\r\\nConnection: close\\r\\n\\r\\n" % len(body) + body)
        c.close()
""")


@needs_root
def test_fake_daemon_of_another_uid_is_refused_and_nothing_runs(home: Home) -> None:
    home.run_dir.mkdir(mode=0o700)  # ours, as banger would make it: the check is the peer
    marker = home.root / "pwned"
    fake = subprocess.Popen([sys.executable, "-c", FAKE_DAEMON, str(home.socket), str(marker)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
        r = home.cli("vm", "ssh", "x")
        err = " ".join(r.stderr.split())
        assert r.returncode == 1, r
        assert not marker.exists(), "the CLI ran the argv a daemon of another uid sent"
        assert f"served by uid {NOBODY} (nobody), pid {fake.pid}" in err, err
        assert "nothing was sent" in err
        assert home.daemons() == []  # and it did not autostart one beside the fake
    finally:
        fake.kill()
        fake.wait()


# --- the daemon checks who connects --------------------------------------------------

PROBE = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(sys.argv[1])
    try:
        s.sendall(b"GET /v1/health HTTP/1.1\\r\\nHost: bangerd\\r\\n\\r\\n")
        print(repr(s.recv(4096)))
    except OSError as exc:
        print("error", exc.errno)
""")


@needs_root
def test_daemon_refuses_a_peer_of_another_uid(home: Home) -> None:
    assert home.cli("vm", "list").returncode == 0  # autostarts the real bangerd
    # Open the file modes wide so that only the peer check stands in the way.
    for d in (home.root, home.run_dir):
        os.chmod(d, 0o711)
    os.chmod(home.socket, 0o666)
    r = as_nobody(PROBE, str(home.socket))
    assert r.returncode == 0, r.stderr
    # Closed before a byte was read: EOF, or a reset / broken pipe when the close won.
    assert r.stdout.strip() in ("b''", f"error {errno.ECONNRESET}", f"error {errno.EPIPE}"), \
        r.stdout
    assert "HTTP" not in r.stdout
    [pid] = home.daemons()
    deadline = time.monotonic() + 5
    while f"refused a connection from uid {NOBODY} (nobody)" not in home.log_text():
        assert time.monotonic() < deadline, home.log_text()
        time.sleep(0.1)
    assert home.cli("vm", "list").returncode == 0  # its owner still gets in
    assert home.daemons() == [pid]


# --- one daemon per state directory --------------------------------------------------


def test_eight_clis_autostarting_at_once_leave_one_daemon(home: Home) -> None:
    procs = [subprocess.Popen(home.cli_argv("vm", "list", "--json"), env=home.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd="/") for _ in range(8)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for code, out, err in results:
        assert code == 0 and json.loads(out) == [], (code, out, err)
    time.sleep(1)  # a loser that lost late would still be exiting
    pids = home.daemons()
    assert len(pids) == 1, (pids, home.log_text())
    assert home.log_text().count("already serves this state directory") <= 7


def test_second_daemon_exits_naming_the_holder_and_leaves_the_socket(home: Home) -> None:
    assert home.cli("vm", "list").returncode == 0
    [live] = home.daemons()
    before = home.socket.stat().st_ino
    second = home.daemon()
    _, err = second.communicate(timeout=30)
    assert second.returncode == EXIT_ALREADY_RUNNING, err
    assert f"another bangerd (pid {live}) already serves this state directory" in err
    assert home.socket.stat().st_ino == before
    assert home.cli("vm", "list").returncode == 0 and home.daemons() == [live]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_daemon_removes_its_socket_at_exit_only_while_it_is_its_own(home: Home,
                                                                    sig: int) -> None:
    assert home.cli("vm", "list").returncode == 0
    [first] = home.daemons()
    os.kill(first, sig)
    wait_gone(first)
    assert not home.socket.exists(), "a stopped daemon left its socket"

    assert home.cli("vm", "list").returncode == 0
    [second] = home.daemons()
    # Someone else's live socket now sits at the path (as after a stale-socket cleanup by a
    # racing daemon): stopping this daemon must not delete it.
    home.socket.unlink()
    other = socket.socket(socket.AF_UNIX)
    other.bind(str(home.socket))
    other.listen(1)
    try:
        ident = home.socket.stat().st_ino
        os.kill(second, sig)
        wait_gone(second)
        assert home.socket.exists() and home.socket.stat().st_ino == ident
    finally:
        other.close()


# --- what the daemon inherits --------------------------------------------------------


def test_autostarted_daemon_gets_no_agent_or_display(home: Home) -> None:
    env = dict(home.env, SSH_AUTH_SOCK="/tmp/agent.sock", SSH_AGENT_PID="1",
               DISPLAY=":0", XAUTHORITY="/tmp/xa")
    assert home.cli("vm", "list", env=env).returncode == 0
    [pid] = home.daemons()
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    names = {e.split(b"=", 1)[0] for e in environ}
    assert names.isdisjoint({b"SSH_AUTH_SOCK", b"SSH_AGENT_PID", b"DISPLAY", b"XAUTHORITY"})
    assert f"BANGER_HOME={home.root}".encode() in environ


def test_daemon_started_by_hand_drops_agent_and_display(home: Home) -> None:
    # The lock is held here, so bangerd stops right after its first steps; what is left of
    # its environment by then is what everything it would start inherits.
    (home.root / "state").mkdir()
    held = lock.acquire(home.root / "state" / "bangerd.lock")
    code = textwrap.dedent("""
        import os
        from banger.daemon.main import main
        try:
            main([])
        except SystemExit as exc:
            print("exit", exc.code)
        print(sorted(k for k in os.environ
                     if k in ("SSH_AUTH_SOCK", "SSH_AGENT_PID", "DISPLAY", "XAUTHORITY")))
    """)
    env = dict(home.env, SSH_AUTH_SOCK="/tmp/agent.sock", SSH_AGENT_PID="1",
               DISPLAY=":0", XAUTHORITY="/tmp/xa")
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=60, cwd="/")
    finally:
        held.release()
    assert r.stdout.split("\n")[:2] == [f"exit {EXIT_ALREADY_RUNNING}", "[]"], r


def test_autostart_whose_daemon_lost_the_lock_waits_for_the_holder(
        home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("BANGER_") or k == "XDG_RUNTIME_DIR":
            monkeypatch.delenv(k)
    monkeypatch.setenv("BANGER_HOME", str(home.root))
    (home.root / "state").mkdir()
    held = lock.acquire(home.root / "state" / "bangerd.lock")  # a holder that never answers
    try:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=r"another bangerd holds \S*bangerd\.lock"):
            connect(timeout=3, notify=lambda _: None)
        assert time.monotonic() - t0 >= 3  # it waited for the holder, not failed at the exit
    finally:
        held.release()
    assert home.daemons() == []


def test_autostart_from_a_hostile_repo_imports_nothing_of_it(home: Home,
                                                            tmp_path: Path) -> None:
    # `cd repo && banger vm run .` autostarts bangerd in the repo's directory; `python -m`
    # put that directory first on the daemon's sys.path, so a repo's uvicorn.py (or
    # banger/, fastapi/ ...) ran in the daemon, as root under a root daemon.
    repo = tmp_path / "repo"
    repo.mkdir()
    marker = tmp_path / "imported"
    for module in ("uvicorn", "fastapi", "dnslib", "httpx"):
        (repo / f"{module}.py").write_text(
            f"open({str(marker)!r}, 'a').write({module!r} + '\\n')\n")
    # The installed `banger` script (its sys.path starts at its own directory), not
    # `python -m banger.cli.main`, which would import the repo's modules into the CLI.
    banger = Path(sys.executable).parent / "banger"
    r = subprocess.run([str(banger), "vm", "list"], env=home.env, capture_output=True,
                       text=True, timeout=90, cwd=repo)
    assert not marker.exists(), f"the daemon imported {marker.read_text()!r} from the repo"
    assert r.returncode == 0, (r.stderr, home.log_text())
    assert len(home.daemons()) == 1
    # It runs in /, not in the repo: nothing it starts is looked up there.
    assert Path(f"/proc/{home.daemons()[0]}/cwd").resolve() == Path("/")


LISTENER = textwrap.dedent("""
    import os, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1])
    os.chmod(sys.argv[1], 0o666)
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    s.listen(8)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        c.settimeout(1.0)
        got = 0
        try:
            while chunk := c.recv(4096):
                got += len(chunk)
        except TimeoutError:
            pass
        c.close()
        print(got, flush=True)
""")


@needs_root
def test_every_kind_of_connection_is_refused_before_a_byte_is_sent(
        home: Home, monkeypatch: pytest.MonkeyPatch) -> None:
    # Plain requests, progress streams and a Tab's completion each open their own
    # connection: each must check the peer first (the stdlib client of issue 9).
    from banger.cli import complete
    from banger.client.client import Client
    from banger.client.peer import UntrustedDaemon

    home.run_dir.mkdir(mode=0o700)
    fake = subprocess.Popen([sys.executable, "-c", LISTENER, str(home.socket)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
        client = Client(home.socket)
        calls = [client.list_vms, lambda: client.stop("x"),
                 lambda: client.start("x", lambda _: None),
                 lambda: client.create({"name": "x"}, lambda _: None)]
        for call in calls:
            with pytest.raises(UntrustedDaemon):
                call()
            assert fake.stdout.readline().strip() == "0"  # the fake received nothing
        monkeypatch.setenv("BANGER_HOME", home.env["BANGER_HOME"])
        assert complete.vm_names() == []
        assert fake.stdout.readline().strip() == "0"
    finally:
        fake.kill()
        fake.wait()
