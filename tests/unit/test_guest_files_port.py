"""The agent port's files (host/guest_files.py) against a guest played frame by frame
over a real Unix socket: an agent without the "files" feature is a conflict naming the
fix, the guest's refusal is an invalid request, a guest gone part way through a download
is an operation failure from the iteration."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from banger.host.agent_proto import Decoder, Frame, Kind, as_int, fields, frame, parse_fields
from banger.host.guest_agent import LocalAgent
from banger.model.errors import ConflictError, InvalidRequest, OperationFailed
from tests.fake_agent import hello_body

pytestmark = pytest.mark.timeout(30)


def _guest(path: Path, features: list[str], then: Callable[[socket.socket, Frame], None]
           ) -> threading.Thread:
    """Accept one connection, answer its HELLO_REQ with ``features``, then hand the next
    request to ``then``."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        conn.settimeout(5)
        dec = Decoder()
        frames: list[Frame] = []

        def nxt() -> Frame:
            while not frames:
                frames.extend(dec.feed(conn.recv(1 << 16)))
            return frames.pop(0)

        req = nxt()
        token = fields([(4, as_int(dict(parse_fields(req.body))[1]))])
        feats = fields([(5, f) for f in features])
        conn.sendall(frame(Kind.HELLO, 0, hello_body() + feats + token))
        with contextlib.suppress(OSError):  # the host hung up first
            then(conn, nxt())
        srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@contextlib.contextmanager
def _agent(tmp_path: Path, features: list[str],
           then: Callable[[socket.socket, Frame], None]) -> Iterator[tuple[LocalAgent, Path]]:
    path = tmp_path / "agent.sock"
    t = _guest(path, features, then)
    agent = LocalAgent()
    try:
        yield agent, path
    finally:
        agent.close()
        t.join(5)


def test_an_agent_without_files_is_told_to_restart(tmp_path: Path) -> None:
    with _agent(tmp_path, ["credit"], lambda c, f: None) as (agent, path), \
            pytest.raises(ConflictError, match="restart the VM"):
        agent.get_files(channel=path, path="/root", timeout=5)


def test_a_refusal_is_an_invalid_request(tmp_path: Path) -> None:
    def refuse(conn: socket.socket, f: Frame) -> None:
        assert f.kind == Kind.FILE_GET
        conn.sendall(frame(Kind.ERROR, f.chan, fields([(1, "open /x: No such file")])))
        conn.recv(1 << 16)

    with _agent(tmp_path, ["credit", "files"], refuse) as (agent, path), \
            pytest.raises(InvalidRequest, match="No such file"):
        agent.get_files(channel=path, path="/x", timeout=5)


def test_a_guest_gone_part_way_fails_the_iteration(tmp_path: Path) -> None:
    def half(conn: socket.socket, f: Frame) -> None:
        assert f.kind == Kind.FILE_GET
        conn.sendall(frame(Kind.DATA, f.chan, b"x" * 512))
        conn.close()

    with _agent(tmp_path, ["credit", "files"], half) as (agent, path):
        chunks = agent.get_files(channel=path, path="/x", timeout=5)
        assert next(chunks) == b"x" * 512
        with pytest.raises(OperationFailed, match="copying /x out"):
            next(chunks)
