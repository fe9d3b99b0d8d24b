"""AgentConnection against a fake agent (tests/fake_agent.py) and against hostile guests.

Every test ends with the leak check: no reader thread of a connection outlives it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banger.host.agent_client import AgentConnection
from banger.host.agent_exec import Exec
from banger.host.agent_proto import MAX_BODY, Kind, as_int, fields, parse_fields
from banger.host.agent_records import (
    AgentDisconnected,
    AgentProtocolError,
    AgentRequestError,
    AgentTimeout,
    ExecEnded,
    ExitStatus,
    Filesystem,
    OutputTooLarge,
    Stream,
)
from tests.fake_agent import BOOT_ID, FakeAgent, RawGuest, hello_body

pytestmark = pytest.mark.timeout(30)


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("banger-agent-reader")]


@pytest.fixture(autouse=True)
def no_thread_leak() -> Iterator[None]:
    before = set(_readers())
    yield
    deadline = time.monotonic() + 5
    while set(_readers()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(_readers()) - before, "an agent reader thread outlived its test"


@pytest.fixture
def agent() -> Iterator[tuple[AgentConnection, FakeAgent]]:
    host, guest = socket.socketpair()
    fake = FakeAgent(guest)
    conn = AgentConnection(host, name="test")
    yield conn, fake
    conn.close()
    fake.join()


@pytest.fixture
def raw() -> Iterator[tuple[AgentConnection, RawGuest]]:
    host, guest = socket.socketpair()
    conn = AgentConnection(host, name="raw", ask_hello=False)
    yield conn, RawGuest(guest)
    conn.close()
    guest.close()


def _ended_with(conn: AgentConnection, kind: type[Exception]) -> Exception:
    """The connection ended by itself with ``kind``, and its reader is gone."""
    deadline = time.monotonic() + 5
    while conn.failure is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(conn.failure, kind), conn.failure
    conn._reader.join(5)
    assert not conn._reader.is_alive()
    return conn.failure


def _text(ex: Exec) -> tuple[ExitStatus, str, str]:
    status, out, err = ex.collect(5)
    return status, out.decode(), err.decode()


# -- the honest agent --------------------------------------------------------------------


def test_hello_ping_and_simple_requests(agent: tuple[AgentConnection, FakeAgent]) -> None:
    conn, fake = agent
    hello = conn.wait_hello(5)
    assert (hello.protocol, hello.version, hello.boot_id) == (1, "0.1.0-fake", BOOT_ID)
    assert 0 <= conn.ping(5) < 5
    conn.sync(5)
    conn.time_set(1_700_000_000_123_456_789, 5)
    conn.poweroff(5)
    sent = [(f.kind, f.chan) for f in fake.received]
    # HELLO_REQ on connecting, and again if wait_hello saw the agent's own greeting first
    # (it may follow a reopen that dropped the first).
    asks = sent.count((Kind.HELLO_REQ, 0))
    assert asks in (1, 2) and sent[:asks] == [(Kind.HELLO_REQ, 0)] * asks
    assert sent[asks:] == [(Kind.PING, 1), (Kind.SYNC, 2), (Kind.TIME_SET, 3),
                           (Kind.POWEROFF, 4)]
    assert as_int(parse_fields(fake.received[asks + 2].body)[0][1]) == 1_700_000_000_123_456_789


def test_stats_are_parsed_and_unknown_tags_ignored(
        agent: tuple[AgentConnection, FakeAgent]) -> None:
    conn, _ = agent
    s = conn.stats(5)
    assert (s.uptime_ms, s.load1_x100, s.mem_total_kib, s.ncpu) == (100, 200, 500, 1000)
    assert s.filesystems == (Filesystem("/", 1000, 400, 600),
                             Filesystem("/root", 2000, 100, 1900))


def test_exec_exit_codes_and_output(agent: tuple[AgentConnection, FakeAgent]) -> None:
    conn, _ = agent
    assert _text(conn.exec(["echo", "hello", "world"])) == (
        ExitStatus(code=0), "hello world\n", "")
    status = conn.exec(["exit", "3"]).wait(5)
    assert status == ExitStatus(code=3) and status.returncode == 3


def test_exec_error_names_the_problem(agent: tuple[AgentConnection, FakeAgent]) -> None:
    conn, _ = agent
    with pytest.raises(AgentRequestError,
                       match="could not start nope x: execvp nope: No such file"):
        conn.exec(["nope", "x"])
    assert conn.ping(5) >= 0  # the connection goes on


def test_concurrent_execs_with_interleaved_output(
        agent: tuple[AgentConnection, FakeAgent]) -> None:
    conn, _ = agent
    cats = [conn.exec(["cat"]) for _ in range(3)]
    both = conn.exec(["both", "40"])
    for i in range(5):
        for n, cat in enumerate(cats):
            cat.write_stdin(f"{n}:{i}\n".encode())
    for cat in cats:
        cat.close_stdin()
    for n, cat in enumerate(cats):
        assert _text(cat) == (ExitStatus(code=0), "".join(f"{n}:{i}\n" for i in range(5)), "")
    status, out, err = _text(both)
    assert out == "".join(f"line {i}\n" for i in range(0, 40, 2))
    assert err == "".join(f"line {i}\n" for i in range(1, 40, 2))
    assert [c.chan for c in [*cats, both]] == [1, 2, 3, 4]


def test_stdin_larger_than_a_frame_round_trips(agent: tuple[AgentConnection, FakeAgent]
                                               ) -> None:
    conn, fake = agent
    got: list[bytes] = []
    cat = conn.exec(["cat"], on_output=lambda stream, data: got.append(data))
    data = bytes(range(256)) * 1000  # 256,000 bytes: four frames
    cat.write_stdin(data)
    cat.close_stdin()
    assert cat.wait(5) == ExitStatus(code=0)
    assert b"".join(got) == data
    stdin = [f for f in fake.received if f.kind == Kind.STDIN]
    assert [len(f.body) for f in stdin] == [MAX_BODY] * 3 + [len(data) - 3 * MAX_BODY]


def test_signal_ends_with_128_plus_n(agent: tuple[AgentConnection, FakeAgent]) -> None:
    conn, _ = agent
    sleep = conn.exec(["sleep"])
    with pytest.raises(AgentTimeout, match=r"exec 1 \(sleep\) did not end within 0.2 s"):
        sleep.wait(0.2)
    sleep.signal(signal.SIGINT)
    status = sleep.wait(5)
    assert status == ExitStatus(signal=signal.SIGINT) and status.returncode == 130
    with pytest.raises(ExecEnded, match="has already ended"):
        sleep.write_stdin(b"x")


def test_env_cwd_and_pty_fields_are_passed(agent: tuple[AgentConnection, FakeAgent]) -> None:
    conn, _ = agent
    show = conn.exec(["show", "a b", "ü"], env={"PATH": "/bin", "X": "1=2"}, cwd="/root",
                     pty=(24, 80))
    show.resize(50, 132)
    show.write_stdin(b"typed")
    show.close_stdin()
    status, out, _ = _text(show)
    assert status.returncode == 0
    assert json.loads(out) == {"argv": ["show", "a b", "ü"], "env": ["PATH=/bin", "X=1=2"],
                               "cwd": "/root", "pty": [24, 80], "resizes": [[50, 132]],
                               "stdin": "typed"}
    plain = conn.exec(["show"])
    plain.close_stdin()
    assert json.loads(_text(plain)[1])["pty"] is None


def test_exec_refuses_what_the_agent_would(agent: tuple[AgentConnection, FakeAgent]) -> None:
    conn, _ = agent
    with pytest.raises(ValueError, match="argv is empty"):
        conn.exec([])
    with pytest.raises(ValueError, match="NUL"):
        conn.exec(["echo", "a\0b"])
    with pytest.raises(ValueError, match="the agent protocol's cap is 65536"):
        conn.exec(["echo", "x" * MAX_BODY])


def test_output_over_the_cap_kills_the_exec() -> None:
    host, guest = socket.socketpair()
    fake = FakeAgent(guest)
    with AgentConnection(host, name="test", max_output=1 << 20) as conn:
        flood = conn.exec(["flood"])
        with pytest.raises(OutputTooLarge, match=r"exec 1 \(flood\): its output exceeded "
                                                  r"1 MiB; the command was killed"):
            for _ in flood.output(5):
                pass
        with pytest.raises(OutputTooLarge):
            flood.wait(5)
        assert conn.ping(5) >= 0  # the flood is over and the connection serves on
        assert fake._execs[1].killed_by == signal.SIGKILL
    fake.join()


def test_stdin_stops_once_the_exec_is_killed_for_its_output() -> None:
    host, guest = socket.socketpair()
    fake = FakeAgent(guest)
    with AgentConnection(host, name="test", max_output=1 << 20) as conn:
        cat = conn.exec(["cat"], on_output=lambda stream, data: None)
        with pytest.raises(ExecEnded, match=r"exec 1 \(cat\) has already ended"):
            cat.write_stdin(bytes(64 << 20))
        with pytest.raises(OutputTooLarge, match="exceeded 1 MiB"):
            cat.wait(5)
        assert conn.failure is None and conn.ping(5) >= 0
        stdin = sum(len(f.body) for f in fake.received if f.kind == Kind.STDIN)
        assert stdin < 4 << 20
    fake.join()


def test_a_slow_consumer_holds_the_reader_and_wait_still_times_out() -> None:
    host, guest = socket.socketpair()
    fake = FakeAgent(guest)
    with AgentConnection(host, name="test", max_queued=4) as conn:
        both = conn.exec(["both", "200"])
        with pytest.raises(AgentTimeout, match="its output queue is full"):
            both.wait(0.3)
        assert len(conn._execs[1].queue) == 4  # bounded: the rest waits in the socket
        status, out, err = both.collect(5)
        assert status.returncode == 0 and out.count(b"\n") + err.count(b"\n") == 200
    fake.join()


# -- hostile guests -----------------------------------------------------------------------


def test_a_guest_that_never_says_hello(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, _ = raw
    start = time.monotonic()
    with pytest.raises(AgentTimeout, match=r"no HELLO from the guest agent within 0\.2 s"):
        conn.wait_hello(0.2)
    assert time.monotonic() - start < 2


def test_a_request_nobody_answers_times_out(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    with pytest.raises(AgentTimeout, match=r"no answer \(PONG\) .* to PING within 0.2 s"):
        conn.ping(0.2)
    guest.send(Kind.PONG, guest.recv().chan)  # a late answer is dropped, not an error
    with pytest.raises(AgentTimeout, match="STATS"):
        conn.stats(0.2)
    assert conn.failure is None


def test_a_frame_length_of_2_to_the_31(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    guest.send(Kind.HELLO, 0, hello_body())
    conn.wait_hello(5)
    ex = _started(conn, guest, ["cat"])
    guest.sock.sendall(b"\x80\x00\x00\x00" + b"\x11" * 64)
    err = _ended_with(conn, AgentProtocolError)
    assert "agent sent a frame of 2147483648 bytes (cap 65541)" in str(err)
    with pytest.raises(AgentProtocolError, match="2147483648"):
        ex.wait(5)
    with pytest.raises(AgentProtocolError, match="2147483648"):
        conn.ping(5)
    assert guest.closed_by_host()


@pytest.mark.parametrize(("kind", "body", "problem"), [
    (Kind.STARTED, b"\x01\x00\x00\x00\x08\x00", "claims 8 bytes but only 1 remain"),
    (Kind.STARTED, fields([(1, b"1234")]), "integer field has 4 bytes"),
    (Kind.EXIT, fields([(1, 0), (2, 9)]), "exactly one of CODE and SIGNAL"),
    (Kind.EXIT, fields([(1, 300)]), "EXIT code 300"),
    (Kind.ERROR, fields([(1, b"\xff\xfe")]), "not UTF-8"),
    (Kind.EXEC_ERROR, fields([(1, "late")]), "EXEC_ERROR after STARTED on chan 1"),
    (Kind.HELLO, fields([(1, 1)]), "HELLO on exec chan 1"),
    (Kind.PONG, b"", "PONG on exec chan 1"),
])
def test_malformed_frames_close_the_connection(
        raw: tuple[AgentConnection, RawGuest], kind: Kind, body: bytes, problem: str) -> None:
    conn, guest = raw
    started = body if kind == Kind.STARTED else fields([(1, 42)])
    ready = threading.Thread(target=_answer_started, args=(guest, started))
    ready.start()
    try:
        ex = conn.exec(["cat"], timeout=5)
    except AgentProtocolError:
        ex = None
    ready.join()
    if kind != Kind.STARTED:
        guest.send(kind, 1, body)
    err = _ended_with(conn, AgentProtocolError)
    assert problem in str(err)
    if ex is not None:
        with pytest.raises(AgentProtocolError, match=problem[:10]):
            ex.wait(5)


def _answer_started(guest: RawGuest, body: bytes) -> None:
    f = guest.recv()
    assert f.kind == Kind.EXEC
    guest.send(Kind.STARTED, f.chan, body)


def _started(conn: AgentConnection, guest: RawGuest, argv: list[str]) -> Exec:
    t = threading.Thread(target=_answer_started, args=(guest, fields([(1, 42)])))
    t.start()
    ex = conn.exec(argv, timeout=5)
    t.join()
    assert ex.pid == 42
    return ex


def test_malformed_stats_close_the_connection(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    t = threading.Thread(target=lambda: guest.send(
        Kind.STATS, guest.recv().chan, fields([(20, "/\tbig\t1\t2")])))
    t.start()
    with pytest.raises(AgentProtocolError, match="STATS lacks field 1"):
        conn.stats(5)
    t.join()
    assert _ended_with(conn, AgentProtocolError)


def test_a_malformed_error_answer_fails_the_request_at_once(
        raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    t = threading.Thread(target=lambda: guest.send(Kind.ERROR, guest.recv().chan,
                                                   fields([(1, b"\xff")])))
    t.start()
    start = time.monotonic()
    with pytest.raises(AgentProtocolError, match="not UTF-8"):
        conn.ping(10)
    t.join()
    assert time.monotonic() - start < 5


def test_exit_for_an_unknown_chan(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    guest.send(Kind.EXIT, 77, fields([(1, 0)]))
    err = _ended_with(conn, AgentProtocolError)
    assert "EXIT on chan 77, which has no exec or request open" in str(err)


def test_a_second_exit(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    ex = _started(conn, guest, ["cat"])
    guest.send(Kind.EXIT, ex.chan, fields([(1, 0)]))
    assert ex.wait(5).returncode == 0
    guest.send(Kind.ERROR, ex.chan, fields([(1, "unknown chan")]))  # a raced STDIN: fine
    assert conn.failure is None
    guest.send(Kind.EXIT, ex.chan, fields([(1, 0)]))
    assert "EXIT on chan 1, which has no exec" in str(_ended_with(conn, AgentProtocolError))


def test_a_guest_that_disconnects_mid_exec(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    a = _started(conn, guest, ["cat"])
    b = _started(conn, guest, ["cat"])
    guest.send(Kind.STDOUT, a.chan, b"partial")
    guest.sock.close()
    for ex in (a, b):
        with pytest.raises(AgentDisconnected, match="the guest agent closed the connection"):
            ex.wait(5)
    assert list(_drain(a)) == [(Stream.STDOUT, b"partial")]
    _ended_with(conn, AgentDisconnected)


def _drain(ex: Exec) -> Iterator[tuple[Stream, bytes]]:
    try:
        yield from ex.output(5)
    except AgentDisconnected:
        return


def test_a_guest_that_stalls_after_started(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    ex = _started(conn, guest, ["cat"])
    start = time.monotonic()
    with pytest.raises(AgentTimeout, match=r"exec 1 \(cat\) did not end within 0.3 s"):
        ex.wait(0.3)
    with pytest.raises(AgentTimeout, match=r"printed nothing for 0\.2 s"):
        next(ex.output(0.2))
    assert time.monotonic() - start < 3
    assert conn.failure is None


def test_a_guest_that_never_starts_the_exec(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    # What is left of a deadline (0.1 + 0.2) is said short: not 0.30000000000000004 s.
    with pytest.raises(AgentTimeout, match=r"exec 1 \(cat\) was not started within 0\.3 s$"):
        conn.exec(["cat"], timeout=0.1 + 0.2)
    assert guest.recv().kind == Kind.EXEC
    guest.send(Kind.STARTED, 1, fields([(1, 9)]))  # late: it is killed, not left running
    kill = guest.recv()
    assert (kill.kind, kill.chan) == (Kind.SIGNAL, 1)
    assert as_int(parse_fields(kill.body)[0][1]) == signal.SIGKILL
    guest.send(Kind.STDOUT, 1, b"dropped")
    guest.send(Kind.EXIT, 1, fields([(2, signal.SIGKILL)]))
    deadline = time.monotonic() + 5
    while 1 in conn._execs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 1 not in conn._execs and conn.failure is None


def test_a_guest_that_reads_nothing_cannot_block_a_send(
        raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    host = conn._sock
    host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn._send_timeout = 0.3
    ex = _started(conn, guest, ["cat"])
    with pytest.raises(AgentTimeout, match=r"read nothing for 0\.3 s while banger sent STDIN"):
        for _ in range(100):
            ex.write_stdin(bytes(MAX_BODY))
    _ended_with(conn, AgentTimeout)


@pytest.mark.parametrize(("boot_id", "why"), [
    ("another-boot", f"the guest rebooted \\(boot id {BOOT_ID} -> another-boot\\)"),
    (BOOT_ID, "the guest agent restarted"),
])
def test_a_second_hello_ends_what_was_pending(
        raw: tuple[AgentConnection, RawGuest], boot_id: str, why: str) -> None:
    conn, guest = raw
    guest.send(Kind.HELLO, 0, hello_body())
    ex = _started(conn, guest, ["cat"])
    guest.send(Kind.HELLO, 0, hello_body(boot_id=boot_id))
    with pytest.raises(AgentDisconnected, match=why):
        ex.wait(5)
    assert conn.wait_hello(1).boot_id == boot_id
    assert conn.failure is None
    ex2 = _started(conn, guest, ["cat"])  # the connection serves on, with fresh chans
    assert ex2.chan == 2


@pytest.fixture
def asking() -> Iterator[tuple[AgentConnection, RawGuest]]:
    host, guest = socket.socketpair()
    conn = AgentConnection(host, name="asking")
    yield conn, RawGuest(guest)
    conn.close()
    guest.close()


def _hello_req_token(guest: RawGuest) -> int:
    req = guest.recv()
    assert (req.kind, req.chan) == (Kind.HELLO_REQ, 0), "the host asks for HELLO first"
    return as_int(dict(parse_fields(req.body))[1])


def test_an_agent_that_missed_the_hang_up_still_says_hello_when_asked(
        asking: tuple[AgentConnection, RawGuest]) -> None:
    # The agent never saw the previous host go (virtio-serial): no greeting, only the
    # answer to HELLO_REQ, and that is enough.
    conn, guest = asking
    guest.send(Kind.HELLO, 0, hello_body(token=_hello_req_token(guest)))
    assert conn.wait_hello(5).boot_id == BOOT_ID


def test_a_greeting_before_the_answer_asks_again_and_voids_nothing(
        asking: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = asking
    token = _hello_req_token(guest)
    # The agent reopened its end (it saw the last host go): its greeting, and the
    # HELLO_REQ sent before it may be lost. The host asks again.
    guest.send(Kind.HELLO, 0, hello_body(boot_id="greeting"))
    with pytest.raises(AgentTimeout):
        conn.wait_hello(0.2)  # a greeting is not the session; wait_hello asks again
    assert _hello_req_token(guest) == token
    guest.send(Kind.HELLO, 0, hello_body(token=token))
    assert conn.wait_hello(5).token == token
    ex = _started(conn, guest, ["cat"])
    assert ex.chan == 1
    # The second HELLO_REQ's answer (the first was not lost after all): nothing is void.
    guest.send(Kind.HELLO, 0, hello_body(token=token))
    guest.send(Kind.EXIT, 1, fields([(1, 0)]))
    assert ex.wait(5).returncode == 0 and conn.failure is None
    ex2 = _started(conn, guest, ["cat"])
    guest.send(Kind.HELLO, 0, hello_body(boot_id="rebooted"))  # after that: a new session
    with pytest.raises(AgentDisconnected, match="the guest rebooted"):
        ex2.wait(5)


def test_a_hello_of_another_protocol(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw
    guest.send(Kind.HELLO, 0, hello_body(protocol=2))
    with pytest.raises(AgentProtocolError, match="speaks protocol 2; this banger speaks 1"):
        conn.wait_hello(5)


def test_guest_text_in_errors_is_escaped(raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, guest = raw

    def refuse() -> None:
        guest.send(Kind.EXEC_ERROR, guest.recv().chan,
                   fields([(1, "\x1b[2Jgone\n" + "x" * 1000)]))
    t = threading.Thread(target=refuse)
    t.start()
    with pytest.raises(AgentRequestError) as info:
        conn.exec(["cat"])
    t.join()
    assert "\x1b" not in str(info.value) and "\\x1b[2Jgone\\n" in str(info.value)
    assert len(str(info.value)) < 500


_guest_kinds = st.sampled_from([k for k in Kind] + [0x00, 0x7F, 0xFF])
_field_items = st.lists(st.tuples(st.integers(0, 30), st.binary(max_size=12)
                                  | st.integers(-2, 300).map(lambda n: n.to_bytes(8, "big",
                                                                                 signed=True))),
                        max_size=4)
_frames = st.lists(st.tuples(_guest_kinds, st.integers(0, 4),
                             _field_items.map(fields) | st.binary(max_size=20)), max_size=6)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_frames)
def test_random_frames_never_hang_or_crash_the_host(
        frames: list[tuple[int, int, bytes]]) -> None:
    """Whatever frames a guest sends around a live exec, the host's waits end with the
    exec's status or an AgentError, and a broken connection's reader is gone."""
    host, guest_sock = socket.socketpair()
    conn = AgentConnection(host, name="fuzz", ask_hello=False)
    guest = RawGuest(guest_sock)
    try:
        guest.send(Kind.HELLO, 0, hello_body())
        ex = _started(conn, guest, ["cat"])
        with contextlib.suppress(OSError):  # the host may have hung up already
            for kind, chan, body in frames:
                guest.send(kind, chan, body)
            guest.send(Kind.EXIT, 1, fields([(1, 0)]))
        try:
            ex.wait(2)
            conn.ping(0.05)
        except AgentTimeout:
            pass  # nothing answers the PING: the fake guest is not listening
        except (AgentProtocolError, AgentDisconnected):
            conn._reader.join(5)
            assert not conn._reader.is_alive()
    finally:
        conn.close()
        guest_sock.close()
