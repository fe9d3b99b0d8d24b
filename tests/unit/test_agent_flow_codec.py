"""The agent protocol's additions to v1 on the host's side: the new decoders (fuzzed with
hypothesis: any bytes give a record or a ProtocolError, nothing else), and the host's
flow control and file transfers against a guest played frame by frame (a guest that sends
past its window breaks the protocol; an older agent gets the old behaviour)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from banger.host.agent_client import AgentConnection
from banger.host.agent_proto import (
    Kind,
    ProtocolError,
    as_int,
    fields,
    parse_fields,
)
from banger.host.agent_records import (
    AgentError,
    AgentProtocolError,
    AgentRequestError,
    AgentSocket,
    parse_credit,
    parse_hello,
    parse_listening,
    parse_started,
)
from tests.fake_agent import RawGuest, hello_body

pytestmark = pytest.mark.timeout(30)
CREDIT_HELLO = hello_body() + fields([(5, "credit"), (5, "files"), (5, "listening")])

field_lists = st.lists(st.tuples(st.integers(0, 8), st.binary(max_size=40)
                                 | st.text(max_size=30).map(str.encode)
                                 | st.integers(-2**63, 2**63 - 1).map(
                                     lambda i: i.to_bytes(8, "big", signed=True))),
                       max_size=8).map(fields)


@given(st.binary(max_size=200) | field_lists)
def test_new_decoders_raise_only_protocol_errors(body: bytes) -> None:
    for parse in (parse_listening, parse_credit, parse_started, parse_hello):
        with contextlib.suppress(ProtocolError):
            parse(body)


def test_listening_entries_merge_per_socket_and_sort_like_ss() -> None:
    body = fields([(1, "udp\t::1\t53"), (1, "tcp\t*\t22\t10\tsshd"),
                   (1, "tcp\t*\t22\t11\tsshd"), (1, "tcp\t*\t22\t12\tsshd: x\t\x1b")])
    assert parse_listening(body) == ([
        AgentSocket("tcp", "*", 22, "sshd,sshd: x\\t\\x1b"),
        AgentSocket("udp", "::1", 53, None)], False)
    assert parse_listening(fields([(2, 1)])) == ([], True)
    for bad in ("tcp\t::1", "sctp\t::1\t5", "tcp\t\t5", "tcp\t::1\t70000",
                "tcp\t::1\t5\t-1\tx", "tcp\t::1\t5\tx"):
        with pytest.raises(ProtocolError, match="LISTENING SOCKET"):
            parse_listening(fields([(1, bad)]))


def test_started_and_credit_and_features() -> None:
    assert parse_started(fields([(1, 7)])) == (7, None)
    assert parse_started(fields([(1, 7), (2, 4096)])) == (7, 4096)
    with pytest.raises(ProtocolError, match="stdin window of 0"):
        parse_started(fields([(1, 7), (2, 0)]))
    assert parse_credit(fields([(1, 5)])) == 5
    with pytest.raises(ProtocolError, match=r"not 1\.\.2\^40"):
        parse_credit(fields([(1, 0)]))
    assert parse_hello(CREDIT_HELLO).features == {"credit", "files", "listening"}
    with pytest.raises(ProtocolError, match="features"):
        parse_hello(hello_body() + fields([(5, "x")] * 65))


@pytest.fixture
def raw() -> Iterator[tuple[AgentConnection, RawGuest]]:
    host, guest = socket.socketpair()
    conn = AgentConnection(host, name="raw", ask_hello=False, window=1024)
    g = RawGuest(guest)
    g.send(Kind.HELLO, 0, CREDIT_HELLO)
    conn.wait_hello(5)
    yield conn, g
    conn.close()
    guest.close()


def _start(conn: AgentConnection, g: RawGuest) -> tuple[int, object]:
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(conn.exec(["x"], max_output=None)))
    t.start()
    f = g.recv()
    got = dict(parse_fields(f.body))
    assert as_int(got[6]) == 1024, "EXEC carries the WINDOW"
    g.send(Kind.STARTED, f.chan, fields([(1, 42), (2, 100)]))
    t.join(5)
    return f.chan, box[0]


def test_output_past_the_window_breaks_the_protocol(
        raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, g = raw
    chan, _ = _start(conn, g)
    g.send(Kind.STDOUT, chan, b"x" * 1024)
    g.send(Kind.STDOUT, chan, b"y")
    assert g.closed_by_host()
    assert isinstance(conn.failure, AgentProtocolError)
    assert "past the window" in str(conn.failure)


def test_stdin_waits_for_the_guests_credit_and_reading_grants_output(
        raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, g = raw
    chan, ex = _start(conn, g)
    t = threading.Thread(target=lambda: ex.write_stdin(b"s" * 250, timeout=5))  # type: ignore[attr-defined]
    t.start()
    first = g.recv()
    assert (first.kind, first.body) == (Kind.STDIN, b"s" * 100), "no more than the credit"
    g.send(Kind.STDOUT, chan, b"o" * 300)
    out = ex.output(5)  # type: ignore[attr-defined]
    assert next(out) == ("stdout", b"o" * 300)
    credit = g.recv()  # the host read over a quarter window: it grants that back
    assert (credit.kind, as_int(dict(parse_fields(credit.body))[1])) == (Kind.CREDIT, 300)
    g.send(Kind.CREDIT, chan, fields([(1, 1000)]))
    rest = g.recv()
    assert (rest.kind, rest.body) == (Kind.STDIN, b"s" * 150)
    t.join(5)
    assert not t.is_alive()


def test_stdin_until_the_end_outlasts_the_send_timeout() -> None:
    # A command that reads its stdin late (`sleep 40; wc -l`) still gets all of it.
    host, guest = socket.socketpair()
    conn = AgentConnection(host, name="raw", ask_hello=False, window=1024,
                           send_timeout=0.2)
    g = RawGuest(guest)
    try:
        g.send(Kind.HELLO, 0, CREDIT_HELLO)
        conn.wait_hello(5)
        chan, ex = _start(conn, g)
        errors: list[BaseException] = []

        def write() -> None:
            try:
                ex.write_stdin(b"s" * 250, until_end=True)  # type: ignore[attr-defined]
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=write)
        t.start()
        assert g.recv().body == b"s" * 100
        t.join(1.0)  # five send timeouts without credit
        assert t.is_alive() and not errors
        g.send(Kind.CREDIT, chan, fields([(1, 1000)]))
        assert g.recv().body == b"s" * 150
        t.join(5)
        assert not t.is_alive() and not errors
    finally:
        conn.close()
        guest.close()


def test_a_get_streams_chunks_and_an_error_ends_it(
        raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, g = raw
    it = conn.get_tar("/x", 5)
    f = g.recv()
    assert f.kind == Kind.FILE_GET
    assert as_int(dict(parse_fields(f.body))[2]) == 1024
    g.send(Kind.DATA, f.chan, b"tar bytes")
    assert next(it) == b"tar bytes"
    g.send(Kind.ERROR, f.chan, fields([(1, "x: Permission denied")]))
    with pytest.raises(AgentRequestError, match="x: Permission denied"):
        next(it)
    assert conn.ping  # the connection serves on


def test_a_put_waits_for_credit_and_ends_with_done(
        raw: tuple[AgentConnection, RawGuest]) -> None:
    conn, g = raw
    errors: list[BaseException] = []

    def put() -> None:
        try:
            conn.put_tar("/dest", [b"a" * 300], 5)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    t = threading.Thread(target=put)
    t.start()
    f = g.recv()
    assert (f.kind, dict(parse_fields(f.body))[1]) == (Kind.FILE_PUT, b"/dest")
    g.send(Kind.CREDIT, f.chan, fields([(1, 200)]))
    assert g.recv().body == b"a" * 200
    g.send(Kind.CREDIT, f.chan, fields([(1, 200)]))
    assert g.recv().body == b"a" * 100
    assert g.recv().kind == Kind.DATA_EOF
    g.send(Kind.DONE, f.chan)
    t.join(5)
    assert errors == []


def test_an_older_agent_gets_no_window_and_no_files() -> None:
    host, guest = socket.socketpair()
    conn = AgentConnection(host, name="old", ask_hello=False)
    g = RawGuest(guest)
    g.send(Kind.HELLO, 0, hello_body())
    conn.wait_hello(5)
    try:
        with pytest.raises(AgentError, match="lacks the 'files' feature"):
            conn.put_tar("/x", [b""], 5)
        with pytest.raises(AgentError, match="lacks the 'listening' feature"):
            conn.listening(5)
        def start() -> None:
            with contextlib.suppress(AgentError):  # closed unanswered at the end
                conn.exec(["x"], timeout=5)

        threading.Thread(target=start, daemon=True).start()
        assert 6 not in dict(parse_fields(g.recv().body)), "no WINDOW for an older agent"
    finally:
        conn.close()
        guest.close()


def test_a_guest_that_reads_nothing_while_it_prints_costs_one_sending_thread() -> None:
    # The guest grants stdin credit and then reads nothing: a stdin write waits on the
    # socket. Meanwhile it prints; the reader hands the output on and grants credit back
    # for each quarter window, from a thread when the send lock is busy. One such thread
    # for the connection, however much the guest prints (not one each).
    host, guest = socket.socketpair()
    host.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    conn = AgentConnection(host, name="raw", ask_hello=False, window=1024, send_timeout=20)
    g = RawGuest(guest)
    g.send(Kind.HELLO, 0, CREDIT_HELLO)
    conn.wait_hello(5)
    seen: list[int] = []
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(conn.exec(
        ["x"], max_output=None, on_output=lambda _s, data: seen.append(len(data)))))
    t.start()
    f = g.recv()
    g.send(Kind.STARTED, f.chan, fields([(1, 42), (2, 1 << 30)]))
    t.join(5)
    ex = box[0]

    def write() -> None:
        with contextlib.suppress(AgentError):
            ex.write_stdin(b"s" * (8 << 20))  # type: ignore[attr-defined]

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    for _ in range(50):  # until the write holds the send lock, waiting on the socket
        if conn._send_lock.locked():
            break
        threading.Event().wait(0.1)
    try:
        for _ in range(300):
            g.send(Kind.STDOUT, f.chan, b"o" * 256)  # a quarter window: a grant each
        deadline = 50
        while len(seen) < 300 and deadline:
            threading.Event().wait(0.1)
            deadline -= 1
        assert len(seen) == 300
        posting = [th for th in threading.enumerate() if th.name == "banger-agent-post"]
        assert len(posting) <= 1, f"{len(posting)} threads wait to send a CREDIT"
    finally:
        conn.close()
        guest.close()
        writer.join(30)
