"""The sending half of an agent connection, and its shared state: the socket, the send
lock, the condition every waiter uses, and the failure that ended the connection.

Every send is a whole frame within the send timeout (a guest that reads nothing cannot
block the daemon: the connection is closed). :meth:`AgentWire.post` is how the reader
thread sends (a SIGKILL, a CREDIT) without ever waiting for the send lock.
:class:`banger.host.agent_client.AgentConnection` is the rest (the reader, the chans).
"""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable

from banger.host.agent_proto import Kind, SignalTag, fields, frame
from banger.host.agent_records import (
    AgentDisconnected,
    AgentError,
    AgentTimeout,
    fresh,
    unsent,
)


class AgentWire:
    """The socket and the sends of one agent connection (thread-safe)."""

    def __init__(self, sock: socket.socket, send_timeout: float) -> None:
        sock.setblocking(True)
        self._sock = sock
        self._send_timeout = send_timeout
        self.cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._failure: AgentError | None = None
        # Frames the reader posted while a send was under way, and the one thread that
        # sends them (see post).
        self._posts: deque[tuple[bytes, str]] = deque()
        self._posts_lock = threading.Lock()
        self._poster: threading.Thread | None = None

    def _fail(self, err: AgentError, *, quiet: bool = False) -> None:
        """End the connection with ``err`` (the connection's reader and waiters)."""
        raise NotImplementedError

    @property
    def send_timeout(self) -> float:
        return self._send_timeout

    @property
    def failure(self) -> AgentError | None:
        """Why the connection ended (None while it is open)."""
        return self._failure

    def send_request_frame(self, chan: int, kind: Kind, items: Iterable[tuple[int, int]],
                           what: str) -> None:
        self._send(frame(kind, chan, fields(items)), f"{kind.name} to {what}")

    def send_data(self, chan: int, kind: Kind, data: bytes, what: str) -> None:
        """One frame of raw data (at most MAX_BODY bytes)."""
        self._send(frame(kind, chan, data), f"{kind.name} to {what}")

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise fresh(self._failure)

    def _send(self, data: bytes, what: str, *, busy_ok: bool = False) -> bool:
        """Write one whole frame, within the send timeout; a stall closes the connection
        (a frame cut short leaves the stream unusable anyway). ``busy_ok``: return False
        at once, sending nothing, when another send holds the lock."""
        deadline = time.monotonic() + self._send_timeout
        if busy_ok:
            if not self._send_lock.acquire(blocking=False):
                return False
        elif not self._send_lock.acquire(timeout=self._send_timeout):
            raise AgentTimeout(f"could not send {what} to the guest agent within "
                               f"{self._send_timeout} s (another send is stuck)")
        try:
            with self.cond:
                if self._failure is not None:
                    # Broken before this request: none of it was sent.
                    raise unsent(fresh(self._failure))
            view, sent = memoryview(data), 0
            poller = select.poll()
            poller.register(self._sock, select.POLLOUT)
            while sent < len(data):
                try:
                    sent += self._sock.send(view[sent:], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
                    continue
                except BlockingIOError:
                    pass
                except OSError as exc:
                    err: AgentError = AgentDisconnected(
                        f"the connection to the guest agent failed sending {what}: {exc}")
                    self._fail(err)
                    raise (unsent(fresh(err)) if sent == 0 else fresh(err)) from None
                left = deadline - time.monotonic()
                if left <= 0:
                    err = AgentTimeout(f"the guest agent read nothing for {self._send_timeout}"
                                       f" s while banger sent {what}; connection closed")
                    self._fail(err)
                    raise fresh(err)
                poller.poll(left * 1000)
        finally:
            self._send_lock.release()
        return True

    def kill(self, chan: int) -> None:
        """SIGKILL to an exec, asked by the reader (see :meth:`post`)."""
        self.post(frame(Kind.SIGNAL, chan, fields([(SignalTag.SIGNO, signal.SIGKILL)])),
                  f"SIGNAL to exec {chan}")

    def post(self, data: bytes, what: str) -> None:
        """A frame sent on behalf of the reader: at once when no other send is under way,
        else queued for one sending thread of the connection's. The reader must never
        wait for the send lock: its holder (a large stdin write) may be waiting for the
        guest, which waits for the reader to take its output. One thread, not one per
        frame: a guest that reads nothing while it prints makes the reader post a CREDIT
        per quarter window, each of which would wait the send timeout. A failure to send
        ends the connection."""
        with self._posts_lock:
            if self._poster is not None:  # after the frames queued before it
                self._posts.append((data, what))
                return
        with contextlib.suppress(AgentError):
            if self._send(data, what, busy_ok=True):
                return
        with self._posts_lock:
            self._posts.append((data, what))
            if self._poster is None:
                self._poster = threading.Thread(target=self._send_posts, daemon=True,
                                                name="banger-agent-post")
                self._poster.start()

    def _send_posts(self) -> None:
        while True:
            with self._posts_lock:
                if not self._posts:
                    self._poster = None
                    return
                data, what = self._posts.popleft()
            with contextlib.suppress(AgentError):
                self._send(data, what)
