"""The real banger-agent binary, built with ensure_agent and driven over a socketpair
(``--fd``) with frames from banger.host.agent_proto: every request kind of protocol v1, the
exec paths (pipes, pty, signals, concurrency, large output) and hostile input."""

from __future__ import annotations

import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from banger.host.agent_proto import (
    MAX_BODY,
    Decoder,
    Frame,
    Kind,
    as_int,
    fields,
    frame,
    parse_fields,
)
from banger.host.agentbin import ensure_agent

pytestmark = pytest.mark.host

WAIT = 30.0


@pytest.fixture(scope="session")
def agent_bin() -> Path:
    # Cached across runs (and CI jobs) like the test images: the build is keyed by source.
    return ensure_agent(Path.home() / ".cache" / "banger-test")


@dataclass
class Ended:
    out: bytes = b""
    err: bytes = b""
    frames: list[Frame] = field(default_factory=list)

    @property
    def last(self) -> Frame:
        return self.frames[-1]

    @property
    def end(self) -> dict[int, int]:
        assert self.last.kind == Kind.EXIT, self.last
        return {tag: as_int(v) for tag, v in parse_fields(self.last.body)}

    @property
    def message(self) -> str:
        return dict(parse_fields(self.last.body))[1].decode()


class Agent:
    """A running agent on one end of a socketpair."""

    def __init__(self, binary: Path, *extra: str, prefix: Sequence[str] = ()) -> None:
        self.sock, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [*prefix, str(binary), "--fd", str(theirs.fileno()), *extra],
            pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE)
        theirs.close()
        self.sock.settimeout(WAIT)
        self.decoder = Decoder()
        self.queue: list[Frame] = []
        self.hello = self.recv()

    def send(self, kind: int, chan: int, body: bytes = b"") -> None:
        self.sock.sendall(frame(kind, chan, body))

    def recv(self, chan: int | None = None) -> Frame:
        """The next frame (for ``chan`` if given; others stay queued)."""
        deadline = time.monotonic() + WAIT
        while True:
            for i, f in enumerate(self.queue):
                if chan is None or f.chan == chan:
                    return self.queue.pop(i)
            assert time.monotonic() < deadline, "agent did not answer"
            data = self.sock.recv(1 << 20)
            assert data, f"agent closed the channel: {self.stderr()}"
            self.queue += self.decoder.feed(data)

    def exec(self, chan: int, argv: Sequence[str], env: Sequence[str] = (),
             cwd: str | None = None, pty: tuple[int, int] | None = None) -> int:
        """Start an exec; its pid (or -1 if it failed to start: the frame stays queued)."""
        items: list[tuple[int, bytes | str | int]] = [(1, a) for a in argv]
        items += [(2, e) for e in env]
        if cwd is not None:
            items.append((3, cwd))
        if pty is not None:
            items += [(4, pty[0]), (5, pty[1])]
        self.send(Kind.EXEC, chan, fields(items))
        first = self.recv(chan)
        if first.kind != Kind.STARTED:
            self.queue.insert(0, first)
            return -1
        return as_int(dict(parse_fields(first.body))[1])

    def wait(self, chan: int) -> Ended:
        """Output and the ending frame (EXIT, EXEC_ERROR or ERROR) of ``chan``."""
        res = Ended()
        while True:
            f = self.recv(chan)
            res.frames.append(f)
            assert len(f.body) <= MAX_BODY
            if f.kind == Kind.STDOUT:
                res.out += f.body
            elif f.kind == Kind.STDERR:
                res.err += f.body
            else:
                return res

    def run(self, chan: int, argv: Sequence[str], **kw: object) -> Ended:
        self.exec(chan, argv, **kw)  # type: ignore[arg-type]
        return self.wait(chan)

    def request(self, kind: int, chan: int = 7, body: bytes = b"") -> Frame:
        self.send(kind, chan, body)
        return self.recv(chan)

    def zombies(self) -> list[str]:
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [k for k in kids.split()
                if Path(f"/proc/{k}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"]

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        return "(running)" if self.proc.poll() is None else self.proc.stderr.read().decode()

    def close(self) -> int:
        self.sock.close()
        try:
            return self.proc.wait(10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stderr is not None
            self.proc.stderr.close()


@pytest.fixture
def agent(agent_bin: Path) -> Iterator[Agent]:
    a = Agent(agent_bin)
    yield a
    assert a.close() == 0, "the agent exits 0 when the host closes the channel"


def error_text(f: Frame) -> str:
    assert f.kind == Kind.ERROR, f
    return dict(parse_fields(f.body))[1].decode()


def test_hello_carries_protocol_version_and_the_boot_id(agent: Agent) -> None:
    assert (agent.hello.kind, agent.hello.chan) == (Kind.HELLO, 0)
    got = dict(parse_fields(agent.hello.body))
    assert as_int(got[1]) == 1
    assert re.fullmatch(rb"\d+\.\d+\.\d+", got[2])
    assert got[3].decode() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert agent.request(Kind.PING, 3) == Frame(Kind.PONG, 3, b"")


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes_are_exact(agent: Agent, code: int) -> None:
    assert agent.run(1, ["sh", "-c", f"exit {code}"], env=["PATH=/usr/bin:/bin"]).end == {1: code}


def test_argv_is_not_split_by_a_shell_and_stderr_is_separate(agent: Agent) -> None:
    res = agent.run(5, ["/bin/sh", "-c", 'printf "%s|" "$@"; echo oops >&2', "sh", "a b", "$c"])
    assert (res.out, res.err, res.end) == (b"a b|$c|", b"oops\n", {1: 0})


def test_a_signal_ends_the_exec(agent: Agent) -> None:
    agent.exec(2, ["/bin/sleep", "100"])
    agent.send(Kind.SIGNAL, 2, fields([(1, 15)]))
    assert agent.wait(2).end == {2: 15}
    assert agent.run(3, ["/bin/sh", "-c", "kill -9 $$"]).end == {2: 9}
    assert agent.zombies() == []


def test_stdin_is_piped_through(agent: Agent) -> None:
    data = os.urandom(3 << 20)
    agent.exec(4, ["/bin/cat"])

    def feed() -> None:
        for i in range(0, len(data), 50_000):
            agent.send(Kind.STDIN, 4, data[i:i + 50_000])
        agent.send(Kind.STDIN_EOF, 4)

    t = threading.Thread(target=feed)
    t.start()
    res = agent.wait(4)
    t.join()
    assert (len(res.out), res.out == data, res.end) == (len(data), True, {1: 0})



def test_stdin_for_a_command_that_stopped_reading_is_dropped(agent: Agent) -> None:
    agent.exec(4, ["/usr/bin/head", "-c", "1"])
    for _ in range(60):  # 3 MB, more than the agent queues before it stops reading
        agent.send(Kind.STDIN, 4, b"x" * 50_000)
    res = agent.wait(4)
    assert (res.out, res.end) == (b"x", {1: 0})
    assert agent.request(Kind.PING, 5) == Frame(Kind.PONG, 5, b"")


def test_a_background_process_holding_the_output_does_not_hold_back_exit(
        agent: Agent) -> None:
    started = time.monotonic()
    res = agent.run(1, ["/bin/sh", "-c", "sleep 5 & echo hi; exit 3"])
    assert (res.out, res.end) == (b"hi\n", {1: 3})
    assert time.monotonic() - started < 2

def test_env_is_exactly_the_given_one_and_cwd_applies(agent: Agent, tmp_path: Path) -> None:
    res = agent.run(1, ["/usr/bin/env"], env=["A=1", "B=two words"])
    assert res.out == b"A=1\nB=two words\n"
    assert agent.run(2, ["/bin/pwd"], cwd=str(tmp_path)).out.decode() == f"{tmp_path}\n"
    assert agent.run(3, ["/bin/pwd"]).out == b"/\n"


def test_children_get_default_signals_an_empty_mask_and_no_agent_fds(agent: Agent) -> None:
    agent.exec(9, ["/bin/sleep", "100"])  # its pipes are open in the agent meanwhile
    res = agent.run(1, ["/bin/grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"])
    assert res.out == b"SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"
    fds = agent.run(2, ["/bin/ls", "/proc/self/fd"]).out.split()
    assert sorted(fds) == [b"0", b"1", b"2", b"3"]  # 3: the directory ls reads
    agent.send(Kind.SIGNAL, 9, fields([(1, 9)]))
    assert agent.wait(9).end == {2: 9}



def test_an_agent_started_with_sigchld_blocked_and_ignored_still_reaps(agent_bin: Path) -> None:
    # An init may start the agent with any mask and dispositions; both are inherited.
    start = ("import os, signal, sys; signal.signal(signal.SIGCHLD, signal.SIG_IGN); "
             "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD}); "
             "os.execv(sys.argv[1], sys.argv[1:])")
    a = Agent(agent_bin, prefix=[sys.executable, "-c", start])
    assert a.run(1, ["/bin/sh", "-c", "exit 7"]).end == {1: 7}
    assert a.zombies() == []
    assert a.close() == 0

def test_exec_errors_name_the_cause(agent: Agent) -> None:
    res = agent.run(1, ["no-such-program-banger"])
    assert res.last.kind == Kind.EXEC_ERROR
    assert res.message == "execvp no-such-program-banger: No such file or directory"
    res = agent.run(2, ["/bin/true"], cwd="/no/such/dir")
    assert res.last.kind == Kind.EXEC_ERROR
    assert res.message == "chdir /no/such/dir: No such file or directory"
    assert agent.zombies() == []
    assert agent.run(1, ["/bin/true"]).end == {1: 0}, "a failed chan can be used again"


def test_concurrent_execs_interleave_and_all_complete(agent: Agent) -> None:
    script = 'for i in 1 2 3 4 5; do echo "$0-$i"; sleep 0.05; done; exit ${#0}'
    names = {11: "a", 12: "bb", 13: "ccc"}
    for chan, name in names.items():
        agent.exec(chan, ["/bin/sh", "-c", script, name])
    order = []
    ended = {}
    while len(ended) < 3:
        f = agent.recv()
        order.append(f.chan)
        if f.kind == Kind.EXIT:
            ended[f.chan] = as_int(dict(parse_fields(f.body))[1])
    assert ended == {11: 1, 12: 2, 13: 3}
    firsts = [order.index(c) for c in names]
    lasts = [len(order) - 1 - order[::-1].index(c) for c in names]
    assert max(firsts) < min(lasts), f"the execs ran one after the other: {order}"
    assert agent.zombies() == []


def test_a_pty_exec_has_a_terminal_with_its_size_and_resize(agent: Agent) -> None:
    res = agent.run(1, ["/usr/bin/tty"], pty=(24, 80))
    assert re.fullmatch(rb"/dev/pts/\d+\r\n", res.out), res.out
    agent.exec(2, ["/bin/sh", "-c", "stty size; read x; stty size; echo err >&2"],
               pty=(33, 101))
    out = b""
    while b"33 101" not in out:
        f = agent.recv(2)
        out += f.body
    agent.send(Kind.RESIZE, 2, fields([(1, 50), (2, 132)]))
    agent.send(Kind.STDIN, 2, b"go\n")
    res = agent.wait(2)
    assert b"50 132\r\n" in res.out and b"err\r\n" in res.out and res.err == b""
    assert res.end == {1: 0}


def test_pty_stdin_eof_and_sigint_reach_the_command(agent: Agent) -> None:
    agent.exec(1, ["/bin/cat"], pty=(24, 80))
    agent.send(Kind.STDIN, 1, b"hi\n")
    agent.send(Kind.STDIN_EOF, 1)
    res = agent.wait(1)
    assert res.end == {1: 0} and b"hi" in res.out
    agent.exec(2, ["/bin/sleep", "100"], pty=(24, 80))
    agent.send(Kind.SIGNAL, 2, fields([(1, 2)]))
    assert agent.wait(2).end == {2: 2}


def test_large_output_arrives_whole_and_in_order(agent: Agent) -> None:
    res = agent.run(1, ["/usr/bin/seq", "1", "2700000"])
    assert len(res.out) > 20_000_000
    assert res.out == b"".join(b"%d\n" % i for i in range(1, 2_700_001))
    assert res.end == {1: 0}
    assert len(agent.run(2, ["/usr/bin/head", "-c", "20000000", "/dev/zero"]).out) == 20_000_000


def test_stats_are_plausible(agent: Agent) -> None:
    f = agent.request(Kind.STATS_REQ, 4)
    assert f.kind == Kind.STATS
    items = parse_fields(f.body)
    got = {tag: as_int(v) for tag, v in items if tag != 20}
    host_up = float(Path("/proc/uptime").read_text().split()[0]) * 1000
    assert abs(got[1] - host_up) < 5000
    assert all(0 <= got[t] < 100_000 for t in (2, 3, 4))
    meminfo = Path("/proc/meminfo").read_text()
    total = int(re.search(r"MemTotal:\s+(\d+)", meminfo).group(1))  # type: ignore[union-attr]
    assert got[5] == total and 0 < got[6] <= total
    assert all(got[t] >= 0 for t in (7, 8, 9)) and got[7] + got[8] + got[9] > 0
    assert got[10] == os.sysconf("SC_NPROCESSORS_ONLN")
    fss = {}
    for tag, v in items:
        if tag == 20:
            mnt, size, used, avail = v.decode().split("\t")
            fss[mnt] = (int(size), int(used), int(avail))
    assert "/" in fss, fss  # this machine's root is ext4
    size, used, avail = fss["/"]
    assert size > 0 and 0 <= used <= size and 0 <= avail <= size
    assert "/dev/shm" not in fss, "tmpfs is not a real filesystem"


def test_sync_and_time_set(agent: Agent, agent_bin: Path) -> None:
    assert agent.request(Kind.SYNC, 2) == Frame(Kind.DONE, 2, b"")
    # Permitted here (root): set the clock to what it already is, never change it.
    answer = agent.request(Kind.TIME_SET, 3, fields([(1, time.time_ns())]))
    assert answer == Frame(Kind.DONE, 3, b"") or "not permitted" in error_text(answer)
    assert "UNIX_NS" in error_text(agent.request(Kind.TIME_SET, 4, fields([(1, -1)])))
    # Without CAP_SYS_TIME (a user namespace's root has none over the real clock): ERROR.
    weak = Agent(agent_bin, prefix=["unshare", "-r"])
    msg = error_text(weak.request(Kind.TIME_SET, 5, fields([(1, time.time_ns())])))
    assert msg == "clock_settime: Operation not permitted"
    assert weak.close() == 0


def test_poweroff_in_test_mode_answers_done_then_exits(agent_bin: Path) -> None:
    a = Agent(agent_bin, "--test-exit-on-poweroff")
    assert a.request(Kind.POWEROFF, 1) == Frame(Kind.DONE, 1, b"")
    assert a.proc.wait(10) == 0
    assert a.sock.recv(10) == b""
    a.close()


@pytest.mark.parametrize(("kind", "chan", "body", "words"), [
    (0x7F, 1, b"", "unknown kind 0x7f"),
    (Kind.HELLO, 1, b"", "unknown kind 0x01"),
    (Kind.EXEC, 1, fields([(1, "/bin/true")])[:-2], "malformed fields"),
    (Kind.EXEC, 1, b"\x01\x00\x00", "malformed fields"),
    (Kind.EXEC, 1, fields([(2, "A=1")]), "without an ARG"),
    (Kind.EXEC, 1, fields([(1, "/bin/tr\x00ue")]), "NUL"),
    (Kind.EXEC, 1, fields([(1, "/bin/true"), (4, b"\x00\x18"), (5, 80)]), "PTY_ROWS"),
    (Kind.EXEC, 0, fields([(1, "/bin/true")]), "chan other than 0"),
    (Kind.STDIN, 77, b"data", "no exec on chan 77"),
    (Kind.SIGNAL, 77, fields([(1, 15)]), "no exec on chan 77"),
    (Kind.RESIZE, 0, fields([(1, 1), (2, 1)]), "no exec on chan 0"),
    (Kind.TIME_SET, 1, fields([(1, b"1234")]), "UNIX_NS"),
])
def test_malformed_requests_get_an_error_and_the_agent_keeps_serving(
        agent: Agent, kind: int, chan: int, body: bytes, words: str) -> None:
    assert words in error_text(agent.request(kind, chan, body))
    assert agent.request(Kind.PING, 9) == Frame(Kind.PONG, 9, b"")


def test_per_exec_requests_are_checked(agent: Agent) -> None:
    agent.exec(1, ["/bin/sleep", "100"])
    assert "already in use" in error_text(agent.request(Kind.EXEC, 1, fields([(1, "true")])))
    assert "no pty" in error_text(agent.request(Kind.RESIZE, 1, fields([(1, 1), (2, 1)])))
    assert "SIGNO" in error_text(agent.request(Kind.SIGNAL, 1, fields([(1, 0)])))
    assert "SIGNO" in error_text(agent.request(Kind.SIGNAL, 1, fields([(1, 1000)])))
    agent.send(Kind.SIGNAL, 1, fields([(1, 9)]))
    assert agent.wait(1).end == {2: 9}


@pytest.mark.parametrize("length", [5 + MAX_BODY + 1, 0xFFFFFFFF, 4, 0])
def test_a_frame_over_the_cap_or_under_the_header_drops_the_connection(
        agent_bin: Path, length: int) -> None:
    a = Agent(agent_bin)
    a.sock.sendall(length.to_bytes(4, "big") + b"\x02\x00\x00\x00\x01" + b"x" * 100)
    assert a.proc.wait(10) == 2
    assert b"cap 65541" in a.proc.stderr.read()  # type: ignore[union-attr]
    a.close()


def test_a_truncated_frame_then_eof_ends_cleanly(agent_bin: Path) -> None:
    a = Agent(agent_bin)
    a.sock.sendall(frame(Kind.EXEC, 1, fields([(1, "/bin/true")]))[:-3])
    assert a.close() == 0


class PortHost:
    """The host end of ``--port PATH``: a raw pty whose slave the agent opens through a
    symlink the test can point at a fresh pty (a new host connection)."""

    def __init__(self, link: Path) -> None:
        self.master, slave = os.openpty()
        tty.setraw(slave)  # bytes pass untouched, like a virtio-serial port
        self.slave = slave
        link.unlink(missing_ok=True)
        link.symlink_to(os.ttyname(slave))
        self.decoder = Decoder()
        self.pending: list[Frame] = []  # decoded, not yet received (one read may hold several)

    def send(self, kind: int, chan: int, body: bytes = b"") -> None:
        os.write(self.master, frame(kind, chan, body))

    def recv(self) -> Frame:
        deadline = time.monotonic() + WAIT
        while not self.pending:
            assert time.monotonic() < deadline, "agent did not answer on the port"
            if select.select([self.master], [], [], 0.5)[0]:
                self.pending += self.decoder.feed(os.read(self.master, 1 << 16))
        return self.pending.pop(0)

    def close(self) -> None:
        os.close(self.slave)
        os.close(self.master)


def child_pids(pid: int) -> list[int]:
    """The agent's children still there (running or not yet reaped)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids]


def cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def test_port_mode_says_hello_again_after_the_host_comes_back(
        agent_bin: Path, tmp_path: Path) -> None:
    link = tmp_path / "port"
    host = PortHost(link)
    proc = subprocess.Popen([str(agent_bin), "--port", str(link)])
    try:
        assert host.recv().kind == Kind.HELLO
        host.send(Kind.EXEC, 1, fields([(1, "/bin/sleep"), (1, "100")]))
        assert host.recv().kind == Kind.STARTED
        host.close()  # the host goes away: the agent retries, every 100 ms, not in a spin
        time.sleep(0.3)
        before = cpu_seconds(proc.pid)
        time.sleep(1.0)
        assert proc.poll() is None
        assert cpu_seconds(proc.pid) - before < 0.2
        sleeper = child_pids(proc.pid)
        assert sleeper == [], "the gone host's exec got SIGHUP and was reaped"
        host = PortHost(link)
        hello = host.recv()
        assert hello.kind == Kind.HELLO
        # A new session: the old chan 1 is void (nothing arrives for it) and free again.
        host.send(Kind.SIGNAL, 1, fields([(1, 9)]))
        refused = host.recv()
        assert (refused.kind, refused.chan) == (Kind.ERROR, 1)
        host.send(Kind.EXEC, 1, fields([(1, "/bin/echo"), (1, "again")]))
        assert [f.kind for f in (host.recv(), host.recv(), host.recv())] == [
            Kind.STARTED, Kind.STDOUT, Kind.EXIT]
    finally:
        proc.kill()
        proc.wait()
        host.close()


def test_hello_req_answers_hello_with_its_token_and_detaches_the_old_execs(
        agent: Agent) -> None:
    # A host that reconnected at once (the agent saw no hang-up) asks for a new session.
    pid = agent.exec(1, ["/bin/sleep", "100"])
    agent.send(Kind.HELLO_REQ, 0, fields([(1, 77)]))
    hello = agent.recv()
    assert (hello.kind, hello.chan) == (Kind.HELLO, 0)
    got = dict(parse_fields(hello.body))
    assert as_int(got[4]) == 77 and as_int(got[1]) == 1
    deadline = time.monotonic() + WAIT
    while pid in child_pids(agent.proc.pid):  # SIGHUP, then reaped in silence
        assert time.monotonic() < deadline, "the old session's exec is still there"
        time.sleep(0.05)
    # chan 1 is void: nothing came for it (no EXIT), and it is free for the new session.
    assert error_text(agent.request(Kind.SIGNAL, 1, fields([(1, 9)]))).startswith("no exec")
    assert agent.run(1, ["/bin/echo", "new"]).out == b"new\n"
    agent.send(Kind.HELLO_REQ, 0)  # no TOKEN: a HELLO without one
    assert 4 not in dict(parse_fields(agent.recv().body))


@pytest.mark.parametrize(("chan", "body", "message"), [
    (3, b"", "HELLO_REQ goes on chan 0"),
    (0, fields([(1, -1)]), "TOKEN must be a non-negative i64"),
    (0, fields([(1, "x")]), "TOKEN must be a non-negative i64"),
])
def test_a_bad_hello_req_is_refused(agent: Agent, chan: int, body: bytes, message: str) -> None:
    assert message in error_text(agent.request(Kind.HELLO_REQ, chan, body))


def test_random_frames_never_crash_it(agent: Agent) -> None:
    rng = random.Random(1234)
    agent.exec(1, ["/bin/cat"])
    agent.exec(2, ["/bin/cat"], pty=(24, 80))
    # Not EXEC (random programs), TIME_SET (the clock), POWEROFF or SYNC (slow).
    # Nor HELLO_REQ: it would end the session of the two execs (its own test above).
    kinds = [k for k in range(256) if k not in (Kind.EXEC, Kind.TIME_SET, Kind.POWEROFF,
                                                  Kind.SYNC, Kind.HELLO_REQ,
                                                  Kind.FILE_PUT, Kind.FILE_GET)]
    def send_all() -> None:  # in a thread: the answers must be read meanwhile
        for _ in range(20000):
            body = bytearray()
            for _ in range(rng.randrange(4)):
                size = rng.choice([0, 1, 4, 8, 8, 9, 300])
                body += bytes([rng.randrange(1, 8)]) + size.to_bytes(4, "big")
                body += rng.randbytes(size)
            if rng.random() < 0.3:
                body = body[:rng.randrange(len(body) + 1)]
            agent.send(rng.choice(kinds), rng.choice([0, 1, 2, 3]), bytes(body))
        agent.send(Kind.PING, 99)

    t = threading.Thread(target=send_all)
    t.start()
    while (f := agent.recv()).chan != 99:
        assert f.kind in (Kind.ERROR, Kind.STDOUT, Kind.STDERR, Kind.EXIT, Kind.STATS,
                          Kind.PONG, Kind.LISTENING), f
    t.join()
    assert f == Frame(Kind.PONG, 99, b"")
    assert agent.proc.poll() is None
