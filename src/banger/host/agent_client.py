"""The host's side of the guest agent protocol: one connection to one guest's agent.

:class:`AgentConnection` runs over a connected stream socket (QEMU's chardev Unix socket
in production, a socketpair in tests). One reader thread decodes frames and hands each
to its chan: an exec (:class:`~banger.host.agent_exec.Exec`), a file transfer
(:mod:`banger.host.agent_files`) or a pending request. Sending is
:class:`~banger.host.agent_wire.AgentWire`'s.

The guest is hostile (docs/agent-protocol.md, "The host's rules"): every wait has a
timeout, every send has one too (a guest that stops reading cannot block the daemon),
each exec's output is held within the window banger granted (flow control, with an agent
that announces "credit"; the reader then never waits for a consumer) and optionally capped
in total, and anything that breaks the protocol closes the connection with an error
naming the problem. Every pending exec, transfer and request then ends with that error;
nothing waits for good.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import TypeVar

from banger.host import agent_files
from banger.host.agent_exec import Exec, ExecState, OutputCallback, on_exec_frame
from banger.host.agent_files import TarSource, TransferState, on_transfer_frame
from banger.host.agent_proto import (
    FEATURE_CREDIT,
    FEATURE_LISTENING,
    MAX_BODY,
    MAX_CHAN,
    Decoder,
    ExecTag,
    Frame,
    HelloReqTag,
    Kind,
    ProtocolError,
    TimeSetTag,
    fields,
    frame,
    kind_name,
)
from banger.host.agent_records import (
    AgentDisconnected,
    AgentError,
    AgentProtocolError,
    AgentRequestError,
    AgentSocket,
    AgentTimeout,
    GuestStats,
    Hello,
    exec_fields,
    fresh,
    parse_hello,
    parse_listening,
    parse_message,
    parse_stats,
    safe_text,
    unsent,
)
from banger.host.agent_wire import AgentWire

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTPUT = 16 << 20
# Frames of output queued per exec before the reader waits for the consumer: 4 MiB at
# most, and the wait is what slows a guest that prints faster than banger reads.
DEFAULT_MAX_QUEUED = 64
# With flow control: output (and FILE_GET data) the guest may send ahead of the consumer
# (4 MiB: what the older 64-frame queue held),
# per chan. This bounds what the host holds per exec; a quarter of it is granted back
# at a time.
DEFAULT_WINDOW = 4 << 20
_RECV = 1 << 16
_T = TypeVar("_T")


@dataclass
class _Request:
    what: str
    expect: Kind
    answer: Frame | None = None
    error: AgentError | None = None


class AgentConnection(AgentWire):
    """One connection to a guest's agent; thread-safe; close it when done."""

    def __init__(self, sock: socket.socket, *, max_output: int | None = DEFAULT_MAX_OUTPUT,
                 max_queued: int = DEFAULT_MAX_QUEUED, send_timeout: float = 30.0,
                 name: str = "agent", ask_hello: bool = True,
                 window: int = DEFAULT_WINDOW) -> None:
        if not 4 <= window <= 1 << 30:
            raise ValueError(f"window {window} is not 4 bytes..1 GiB")
        super().__init__(sock, send_timeout)
        self.max_output = max_output
        self.max_queued = max_queued
        self.window = window
        self._next_chan = 1
        self._execs: dict[int, ExecState] = {}
        self._requests: dict[int, _Request] = {}
        self.transfers: dict[int, TransferState] = {}
        # Chans whose request timed out: one late answer on each is dropped, not an error.
        self._abandoned: set[int] = set()
        self._hello: Hello | None = None
        # ask_hello: the session starts with the HELLO answering our HELLO_REQ (it carries
        # this token); a HELLO before it is the agent's greeting on opening its end.
        self._token = secrets.randbits(62) if ask_hello else None
        self._asked = 0  # HELLO_REQs sent and not answered (a lost one stays counted)
        # Greetings (a HELLO without our token) before the session, and how many of them
        # wait_hello asked again for.
        self._greetings = 0
        self._reasked = 0
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"banger-agent-reader:{name}")
        self._reader.start()
        if self._token is not None:
            # A host that connects right after another one closed may have hidden that
            # hang-up from the agent (virtio-serial): asking always gets a HELLO, and a new
            # session.
            self._ask_hello()

    def __enter__(self) -> AgentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def features(self) -> frozenset[str]:
        """What the agent announced in its HELLO (empty before it)."""
        return self._hello.features if self._hello is not None else frozenset()

    def wait_hello(self, timeout: float) -> Hello:
        """The agent's latest HELLO, waiting up to ``timeout`` seconds for the first.

        With ask_hello, call it before sending anything else: it may ask again (after a
        greeting, see :meth:`_on_hello`), and the agent's answer to that ends the execs
        of the session so far."""
        deadline = time.monotonic() + timeout
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self._hello or self._failure
                                   or self._greetings > self._reasked,
                                   max(0.0, deadline - time.monotonic()))
                self._raise_failure()
                if self._hello is not None:
                    return self._hello
                if self._greetings <= self._reasked:
                    raise AgentTimeout(f"no HELLO from the guest agent within {timeout:.3g} s")
                self._reasked += 1
            # Here, not on the reader: a send may block, and the reader must keep reading.
            self._ask_hello()

    def ping(self, timeout: float) -> float:
        """The round trip of a PING, in seconds."""
        start = time.monotonic()
        self._request(Kind.PING, b"", Kind.PONG, "PING", timeout)
        return time.monotonic() - start

    def stats(self, timeout: float) -> GuestStats:
        answer = self._request(Kind.STATS_REQ, b"", Kind.STATS, "STATS_REQ", timeout)
        return self._parsed(lambda: parse_stats(answer.body))

    def sync(self, timeout: float) -> None:
        self._request(Kind.SYNC, b"", Kind.DONE, "SYNC", timeout)

    def poweroff(self, timeout: float) -> None:
        """Ask the agent to power the guest off; returns once it accepted (DONE)."""
        self._request(Kind.POWEROFF, b"", Kind.DONE, "POWEROFF", timeout)

    def time_set(self, unix_ns: int, timeout: float) -> None:
        body = fields([(TimeSetTag.UNIX_NS, unix_ns)])
        self._request(Kind.TIME_SET, body, Kind.DONE, "TIME_SET", timeout)

    def listening(self, timeout: float) -> list[AgentSocket]:
        """The guest's listening TCP and bound UDP sockets (what ``ss -ltunp`` shows)."""
        self._need(FEATURE_LISTENING, "list the guest's sockets")
        answer = self._request(Kind.LISTENING_REQ, b"", Kind.LISTENING, "LISTENING_REQ",
                               timeout)
        socks, truncated = self._parsed(lambda: parse_listening(answer.body))
        if truncated:
            log.info("the guest has more listening sockets than one LISTENING frame holds")
        return socks

    def put_tar(self, dest: str, source: TarSource, timeout: float) -> None:
        """Extract a tar stream (an iterable of bytes, or a binary file) into the guest's
        directory ``dest`` (created if missing). ``timeout`` bounds each wait."""
        agent_files.put_tar(self, dest, source, timeout)

    def get_tar(self, path: str, timeout: float) -> Iterator[bytes]:
        """A tar of the guest's ``path`` (a file, or a directory recursively), in chunks
        of at most MAX_BODY bytes as the guest sends them; ``timeout`` bounds each wait.
        Closing the iterator early cancels the transfer."""
        return agent_files.get_tar(self, path, timeout)

    def _need(self, feature: str, what: str) -> None:
        if feature not in self.features():
            raise AgentError(f"the guest's agent cannot {what} (it lacks the {feature!r} "
                             "feature: an older agent; rebuild the VM's image)")

    def exec(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str = "/",
             pty: tuple[int, int] | None = None, *, on_output: OutputCallback | None = None,
             timeout: float = 10.0,
             max_output: int | EllipsisType | None = ...) -> Exec:
        """Start ``argv`` in the guest (no shell) and return once it started.

        ``env`` is the command's whole environment. ``pty=(rows, cols)`` runs it on a new
        pty. Output goes to ``on_output`` (called on the reader thread: a slow callback
        slows the guest) or, without one, to :meth:`Exec.output`. ``max_output``: the
        exec's total output cap (default: the connection's; None: no cap, memory is still
        bounded by the window). Raises :class:`AgentRequestError` when the agent cannot
        start it.
        """
        argv = tuple(argv)
        items = exec_fields(argv, env or {}, cwd, pty)
        credit = FEATURE_CREDIT in self.features()
        if credit:
            items.append((ExecTag.WINDOW, self.window))
        body = fields(items)
        if len(body) > MAX_BODY:
            raise ValueError(f"argv, env and cwd take {len(body)} bytes; "
                             f"the agent protocol's cap is {MAX_BODY}")
        state = ExecState(argv, on_output,
                          max_output=self.max_output if max_output is ... else max_output,
                          window=self.window if credit else 0,
                          allowed=self.window if credit else 0)
        with self.cond:
            chan = self._alloc_chan()
            self._execs[chan] = state
        handle = Exec(self, chan, state)
        self._send(frame(Kind.EXEC, chan, body), f"EXEC of {safe_text(argv[0], 80)}")
        with self.cond:
            if not self.cond.wait_for(lambda: state.started or state.ended, timeout):
                # Keep the chan: a late STARTED gets SIGKILL, its output is dropped.
                state.error = AgentTimeout(f"{handle.what()} was not started within "
                                           f"{timeout:.3g} s")
            if not state.started and state.error is not None:
                raise fresh(state.error)
        return handle

    def close(self) -> None:
        """End the connection: pending waits raise :class:`AgentDisconnected`."""
        self._fail(AgentDisconnected("the connection to the agent was closed by banger"),
                   quiet=True)
        if threading.current_thread() is not self._reader:
            self._reader.join()

    def alloc_chan(self) -> int:
        """A fresh chan id (with self.cond held)."""
        return self._alloc_chan()

    def _alloc_chan(self) -> int:
        if self._failure is not None:  # broken before this request: none of it was sent
            raise unsent(fresh(self._failure))
        if self._next_chan > MAX_CHAN:
            raise AgentError("this agent connection has used up its chan ids; reconnect")
        chan, self._next_chan = self._next_chan, self._next_chan + 1
        return chan

    def _parsed(self, parse: Callable[[], _T]) -> _T:
        """Parse an answer; a malformed one ends the connection like any protocol error."""
        try:
            return parse()
        except ProtocolError as exc:
            err = AgentProtocolError(f"the agent sent a malformed answer: {exc}")
            self._fail(err)
            raise err from None

    def _request(self, kind: Kind, body: bytes, expect: Kind, what: str,
                 timeout: float) -> Frame:
        req = _Request(what, expect)
        with self.cond:
            chan = self._alloc_chan()
            self._requests[chan] = req
        self._send(frame(kind, chan, body), what)
        with self.cond:
            if not self.cond.wait_for(lambda: req.answer or req.error, timeout):
                del self._requests[chan]
                self._abandoned.add(chan)
                raise AgentTimeout(f"no answer ({expect.name}) from the guest agent to "
                                   f"{what} within {timeout:.3g} s")
            if req.error is not None:
                raise fresh(req.error)
            assert req.answer is not None
            return req.answer

    def _fail(self, err: AgentError, *, quiet: bool = False) -> None:
        """End the connection with ``err`` (the first cause wins) and wake every waiter."""
        with self.cond:
            if self._failure is None:
                self._failure = err
                if not quiet:
                    log.warning("agent connection ended: %s", err)
            for state in self._execs.values():
                if state.error is None:
                    state.error = fresh(self._failure)
            for req in self._requests.values():
                req.error = fresh(self._failure)
            for transfer in self.transfers.values():
                transfer.error = transfer.error or fresh(self._failure)
            self._execs.clear()
            self._requests.clear()
            self.transfers.clear()
            self.cond.notify_all()
        # Wakes the reader out of recv(); the reader closes the socket on its way out.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _read_loop(self) -> None:
        decoder = Decoder()
        try:
            while True:
                try:
                    data = self._sock.recv(_RECV)
                except OSError as exc:
                    raise AgentDisconnected(f"the connection to the guest agent failed: {exc}"
                                            ) from None
                if not data:
                    raise AgentDisconnected("the guest agent closed the connection")
                for f in decoder.feed(data):
                    self._dispatch(f)
        except ProtocolError as exc:
            self._fail(AgentProtocolError(f"the guest agent broke the protocol: {exc}"))
        except AgentError as exc:
            self._fail(exc)
        except Exception as exc:  # an output callback's bug must not leave waiters hanging
            self._fail(AgentError(f"the agent connection's reader failed: {exc!r}"))
            raise
        finally:
            with self._send_lock:
                self._sock.close()

    def _dispatch(self, f: Frame) -> None:
        if f.chan == 0:
            if f.kind != Kind.HELLO:
                raise ProtocolError(f"{kind_name(f.kind)} on chan 0 (only HELLO goes there)")
            self._on_hello(parse_hello(f.body))
            return
        with self.cond:
            state = self._execs.get(f.chan)
            req = self._requests.get(f.chan) if state is None else None
            transfer = self.transfers.get(f.chan)
            if transfer is not None:
                if on_transfer_frame(self, f, transfer):
                    self.transfers.pop(f.chan, None)
                return
            if state is None and req is None:
                if f.chan in self._abandoned:
                    self._abandoned.discard(f.chan)
                    return
                # A STDIN/SIGNAL racing an EXIT is refused with ERROR after that EXIT.
                if f.kind == Kind.ERROR and f.chan < self._next_chan:
                    return
                raise ProtocolError(f"{kind_name(f.kind)} on chan {f.chan}, which has "
                                    "no exec or request open")
            if req is not None:
                if f.kind == Kind.ERROR:
                    req.error = AgentRequestError(f"the guest agent refused {req.what}: "
                                                  f"{parse_message(f.body)}")
                elif f.kind == req.expect:
                    req.answer = f
                else:
                    raise ProtocolError(f"{kind_name(f.kind)} in answer to {req.what}")
                # Only now: a malformed answer above leaves it to _fail, which wakes it.
                del self._requests[f.chan]
                self.cond.notify_all()
                return
        assert state is not None
        if on_exec_frame(self, f, state):
            with self.cond:
                self._execs.pop(f.chan, None)

    def _ask_hello(self) -> None:
        """Send a HELLO_REQ; a failed send ends the connection (wait_hello says why)."""
        assert self._token is not None
        with self.cond:
            self._asked += 1
        with contextlib.suppress(AgentError):
            self._send(frame(Kind.HELLO_REQ, 0, fields([(HelloReqTag.TOKEN, self._token)])),
                       "HELLO_REQ")

    def _on_hello(self, hello: Hello) -> None:
        """A HELLO starts a session: the first one readies the connection; a later one
        means the agent reopened its channel (it restarted, or the guest rebooted), and
        nothing of the session before it will ever answer (the chans are void).

        With ask_hello, the session starts with the HELLO carrying our token. A HELLO
        without it before then is the agent's greeting on (re)opening its end, which may
        have dropped the HELLO_REQ sent before it: wait_hello asks again. A second answer
        with our token precedes everything sent after that second ask: it voids nothing."""
        with self.cond:
            asked = self._token is not None
            if asked and self._hello is None and hello.token != self._token:
                self._greetings += 1
                self.cond.notify_all()
            elif asked and hello.token == self._token and self._asked > 0:
                self._asked -= 1
                if self._hello is None:
                    self._start_session(hello)
            else:
                self._start_session(hello)

    def _start_session(self, hello: Hello) -> None:
        """With self.cond held."""
        old, self._hello = self._hello, hello
        if old is not None:
            why = (f"the guest rebooted (boot id {old.boot_id} -> {hello.boot_id})"
                   if old.boot_id != hello.boot_id else
                   "the guest agent restarted (it said HELLO again)")
            for state in self._execs.values():
                state.error = state.error or AgentDisconnected(why)
            for req in self._requests.values():
                req.error = AgentDisconnected(why)
            for transfer in self.transfers.values():
                transfer.error = AgentDisconnected(why)
            self._execs.clear()
            self._requests.clear()
            self.transfers.clear()
        self.cond.notify_all()
