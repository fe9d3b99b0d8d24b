"""The exec WebSocket, ``/v1/vms/{ref}/exec``: a command in a running guest, its stdin,
stdout and stderr streamed both ways, then its exit. The message protocol is in
docs/api.md ("Exec"); a plain GET of the path answers 426 and carries that description
into the OpenAPI document (FastAPI leaves WebSocket routes out of it).

The agent's side is synchronous (a thread per blocking wait), the socket's is the event
loop: three threads per exec (output; stdin and EOF; signal and resize) hand messages
across through bounded asyncio queues (stdin bounded in bytes by the client's window),
so every side waits for the slower one and memory stays bounded
whatever a command prints (the guest waits; nothing is dropped, nothing is capped).
The peer check (SO_PEERCRED) applies as to every connection: it runs in the HTTP
protocol before the upgrade request is read.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import FastAPI, WebSocket
from pydantic import BaseModel, Field, ValidationError
from starlette.websockets import WebSocketState

from banger.api.schema import ErrorBody, ErrorResponse
from banger.api.wire import EXEC_STDERR, EXEC_STDIN, EXEC_STDIN_WINDOW, EXEC_STDOUT, PREFIX
from banger.core.execs import HOME, RunningExec, exec_env
from banger.core.service import VMService
from banger.model.errors import BangerError, InvalidRequest, OperationFailed
from banger.model.vm import VM
from banger.ports import ExecExit, ExecOutput, ExecRequest

log = logging.getLogger(__name__)

# How long a client may take to send its start message after the upgrade.
START_WAIT = 30.0
# Messages in flight each way between the loop and the pumps: with the agent's own
# queue (64 frames of 64 KiB at most) that bounds what one exec holds in the daemon.
QUEUE = 8
# How often a pump blocked on a full queue or a quiet command checks for the end.
POLL = 0.5
MAX_SIGNAL = 64

PATH = f"{PREFIX}/vms/{{ref}}/exec"
DESCRIPTION = """\
A command in the running VM `ref`, through its guest agent: a **WebSocket** (upgrade
this GET; a plain GET answers 426). Messages:

- client, first, text: `{"argv": [...], "env": {...} | null, "cwd": str | null,
  "tty": {"rows": n, "cols": n} | null, "in_workspace": bool}` (no shell: argv runs
  as is; env goes over the default PATH, HOME=/root, LANG=C.UTF-8; cwd defaults to
  /root; tty runs the command on a pty of that size; in_workspace, default false: in
  the VM's workspace when it has one, i.e. cwd defaults to its guest path and the
  command runs under the tools the repo pins, `mise exec` when mise is there);
- client, binary: byte 0 = 0 (stdin), then bytes for the command's stdin: at most
  `stdin_window` bytes (from `started`) not yet acknowledged by the server's
  `{"type": "stdin_ack", "bytes": n}` (n bytes reached the command);
- client, text: `{"type": "eof"}` (close its stdin), `{"type": "resize", "rows": n,
  "cols": n}`, `{"type": "signal", "signal": n}`;
- server, text: `{"type": "started", "stdin_window": n, "vm": {"id", "name", "workspace_path",
  "workspace_guest_path", "workspace_head"}}` once it runs (the VM it runs in: a client
  needs no other request, e.g. to see that the host repo's HEAD moved);
- server, binary: byte 0 = 1 (stdout) or 2 (stderr), then the command's bytes (with a
  pty, everything is stdout);
- server, text, last: `{"type": "exit", "code": n | null, "signal": n | null,
  "returncode": n}` (returncode: the code, or 128 + the signal), or `{"type": "error",
  "code": str, "message": str}` (the command could not start, the VM was stopped, the
  agent went away); then the server closes.

Signal, resize and a hang-up are applied at once, whatever stdin waits for the command
to read. A client that goes away ends the command (SIGHUP, then SIGKILL). See
docs/api.md.
"""


class TtySize(BaseModel):
    rows: int = Field(ge=1, le=65535)
    cols: int = Field(ge=1, le=65535)


class ExecStart(BaseModel):
    """The client's first message."""

    argv: list[str] = Field(min_length=1)
    env: dict[str, str] | None = None
    cwd: str | None = None
    tty: TtySize | None = None
    in_workspace: bool = False


class ExecControl(BaseModel):
    type: Literal["eof", "resize", "signal"]
    rows: int | None = Field(default=None, ge=1, le=65535)
    cols: int | None = Field(default=None, ge=1, le=65535)
    signal: int | None = Field(default=None, ge=1, le=MAX_SIGNAL)


def _invalid(exc: ValidationError, what: str) -> InvalidRequest:
    msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return InvalidRequest(f"invalid {what}: {msg}")


def start_request(text: str) -> tuple[ExecRequest, bool]:
    """The request, and whether it runs in the workspace (its cwd then stays empty
    unless given: core picks the workspace's)."""
    try:
        start = ExecStart.model_validate_json(text)
    except ValidationError as exc:
        raise _invalid(exc, "exec start message") from exc
    return ExecRequest(argv=tuple(start.argv), env=exec_env(start.env),
                       cwd=start.cwd or ("" if start.in_workspace else HOME),
                       pty=None if start.tty is None else (start.tty.rows, start.tty.cols)
                       ), start.in_workspace


def _started(vm: VM) -> str:
    return json.dumps({"type": "started", "stdin_window": EXEC_STDIN_WINDOW, "vm": {
        "id": vm.id, "name": vm.name, "workspace_path": vm.workspace_path,
        "workspace_guest_path": vm.workspace_guest_path,
        "workspace_head": vm.workspace_head}})


def _error(exc: BangerError) -> str:
    return json.dumps({"type": "error", "code": exc.code, "message": exc.message})


Item = ExecOutput | ExecExit | BangerError
# What the input pump applies: stdin bytes, or a control message.
Input = bytes | ExecControl


def add_exec_routes(app: FastAPI, service: VMService) -> None:
    @app.get(PATH, status_code=101, description=DESCRIPTION, responses={
        101: {"description": "Switching Protocols: the exec's WebSocket"},
        426: {"model": ErrorResponse, "description": "not a WebSocket upgrade"}})
    def exec_http(ref: str) -> None:
        """Run a command in a running VM (WebSocket)."""
        from fastapi.responses import JSONResponse
        body = ErrorBody(code="upgrade_required", message=(
            f"{PATH.format(ref=ref)} is a WebSocket: send the GET with `Connection: "
            "Upgrade` and `Upgrade: websocket` (see docs/api.md)"))
        return JSONResponse(status_code=426,  # type: ignore[return-value]
                            content=ErrorResponse(error=body).model_dump(),
                            headers={"Upgrade": "websocket", "Connection": "Upgrade"})

    @app.websocket(PATH)
    async def exec_ws(ws: WebSocket, ref: str) -> None:
        await ws.accept()
        try:
            msg = await asyncio.wait_for(ws.receive(), START_WAIT)
            if msg["type"] == "websocket.disconnect":
                return
            if msg.get("text") is None:
                raise InvalidRequest("the first message must be the exec's start (JSON text)")
            request, workspace = start_request(msg["text"])
            running = await _in_thread(lambda: service.exec(ref, request,
                                                            workspace=workspace))
        except TimeoutError:
            await _close(ws, _error(InvalidRequest(f"no start message within {START_WAIT} s")))
            return
        except BangerError as exc:
            await _close(ws, _error(exc))
            return
        except Exception as exc:  # report, never drop the client silently
            log.exception("exec could not start")
            await _close(ws, _error(OperationFailed(f"the exec failed in the daemon: {exc!r}")))
            return
        try:
            await ws.send_text(_started(running.vm))
        except Exception:  # the client closed during a slow start: nobody hears it
            log.info("exec in %s: its client left before it started; ending the command",
                     running.vm.name)
            running.abandon()
            return
        await _Pump(ws, running).run()


async def _in_thread(fn: Callable[[], RunningExec]) -> RunningExec:
    """``fn`` on a thread of its own (an exec's start may wait for a reconnect)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[RunningExec] = loop.create_future()

    def target() -> None:
        try:
            value = fn()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, fut, value, None)

    threading.Thread(target=target, name="exec-start", daemon=True).start()
    # Cancelled (the client left during the start): _settle abandons what starts later.
    return await fut


def _settle(fut: asyncio.Future[RunningExec], value: RunningExec | None,
            exc: BaseException | None) -> None:
    if fut.cancelled():
        if value is not None:
            value.abandon()
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert value is not None
        fut.set_result(value)


async def _close(ws: WebSocket, last: str | None = None, code: int = 1000) -> None:
    with contextlib.suppress(Exception):  # the client may be gone already
        if last is not None:
            await ws.send_text(last)
        if ws.client_state is WebSocketState.CONNECTED:
            await ws.close(code)


class _Ack:
    """``n`` bytes of the client's stdin reached the guest (or were dropped)."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n


class _Pump:
    """One exec's streams between the WebSocket and the agent.

    Three threads: output (agent to loop), stdin (bytes and EOF, in order, each waiting
    for the guest to read), control (signal, resize: at once, never behind stdin). The
    socket is read all the time, so a signal or the client's hang-up is seen whatever
    stdin waits; stdin is bounded by the client's window (acknowledged as delivered)."""

    def __init__(self, ws: WebSocket, running: RunningExec) -> None:
        self.ws, self.running = ws, running
        self.loop = asyncio.get_running_loop()
        # Output items and acks; QUEUE output items at most (out_room), acks are small.
        self.out: asyncio.Queue[Item | _Ack] = asyncio.Queue()
        self.out_room = asyncio.Semaphore(QUEUE)
        self.inp: asyncio.Queue[Input] = asyncio.Queue()  # bounded by `held`
        self.ctl: asyncio.Queue[Input] = asyncio.Queue(QUEUE)
        self.held = 0  # stdin bytes received, not yet delivered
        self.room = asyncio.Event()
        self.stop = threading.Event()

    async def run(self) -> None:
        # Not named "banger-…": those are operations, which the daemon's exit waits for;
        # these end with their WebSocket, which the server's exit closes.
        threads = [threading.Thread(target=self._read_output, daemon=True,
                                    name="exec-out"),
                   threading.Thread(target=self._apply, args=(self.inp, True),
                                    daemon=True, name="exec-in"),
                   threading.Thread(target=self._apply, args=(self.ctl, False),
                                    daemon=True, name="exec-ctl")]
        for t in threads:
            t.start()
        sender = asyncio.create_task(self._send())
        receiver = asyncio.create_task(self._receive())
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.stop.set()
            if not sender.done():
                # The client left (or broke the protocol) before the command ended.
                log.info("exec in %s: its client went away; ending the command",
                         self.running.vm.name)
                self.running.abandon()
            for task in (sender, receiver):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.gather(sender, receiver, return_exceptions=True)

    # ---- the event loop's side ---------------------------------------------------------

    async def _send(self) -> None:
        while True:
            item = await self.out.get()
            if isinstance(item, _Ack):
                await self.ws.send_text(json.dumps({"type": "stdin_ack", "bytes": item.n}))
                continue
            self.out_room.release()
            if isinstance(item, ExecOutput):
                tag = EXEC_STDOUT if item.stream == "stdout" else EXEC_STDERR
                await self.ws.send_bytes(bytes((tag,)) + item.data)
                continue
            if isinstance(item, ExecExit):
                last = json.dumps({"type": "exit", "code": item.code, "signal": item.signal,
                                   "returncode": item.returncode})
            else:
                last = _error(item)
            await _close(self.ws, last)
            return

    async def _put_output(self, item: Item) -> None:
        await self.out_room.acquire()  # full: the output pump waits (backpressure)
        self.out.put_nowait(item)

    def _delivered(self, n: int) -> None:
        """On the loop: ``n`` stdin bytes left the daemon."""
        self.held -= n
        self.out.put_nowait(_Ack(n))
        if self.held <= EXEC_STDIN_WINDOW:
            self.room.set()

    async def _receive(self) -> None:
        while True:
            msg = await self.ws.receive()
            if msg["type"] == "websocket.disconnect":
                return
            data, text = msg.get("bytes"), msg.get("text")
            try:
                item = self._parse(data, text)
            except InvalidRequest as exc:
                await _close(self.ws, _error(exc), code=1008)
                return
            if item is None:
                continue
            if isinstance(item, bytes) or item.type == "eof":
                # In order, behind the stdin before it.
                self.inp.put_nowait(item)
                if isinstance(item, bytes):
                    self.held += len(item)
                while self.held > EXEC_STDIN_WINDOW:
                    # Past the window (a client that does not count acks): stop reading
                    # it until the guest takes some, as backpressure.
                    self.room.clear()
                    await self.room.wait()
            else:
                await self.ctl.put(item)  # signal, resize: applied at once

    @staticmethod
    def _parse(data: bytes | None, text: str | None) -> Input | None:
        if data is not None:
            if not data or data[0] != EXEC_STDIN:
                raise InvalidRequest("a binary message from the client must start with "
                                     f"the stdin tag ({EXEC_STDIN})")
            return data[1:] or None
        try:
            control = ExecControl.model_validate_json(text or "")
        except ValidationError as exc:
            raise _invalid(exc, "control message") from exc
        if control.type == "resize" and (control.rows is None or control.cols is None):
            raise InvalidRequest("a resize needs rows and cols")
        if control.type == "signal" and control.signal is None:
            raise InvalidRequest("a signal message needs its signal number")
        return control

    # ---- the pumps' threads ----------------------------------------------------------

    def _on_loop(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run a coroutine on the loop and wait for it, giving up once stopped (None)."""
        try:
            fut = asyncio.run_coroutine_threadsafe(make(), self.loop)
        except RuntimeError:  # the loop is closed: the daemon is stopping
            self.stop.set()
            return None
        while True:
            try:
                return fut.result(POLL)
            except concurrent.futures.TimeoutError:
                if self.stop.is_set():
                    fut.cancel()
                    return None
            except concurrent.futures.CancelledError:
                return None

    def _read_output(self) -> None:
        while not self.stop.is_set():
            try:
                item: Item | None = self.running.next(POLL)
            except BangerError as exc:
                item = exc
            except Exception as exc:  # report, never leave the client waiting
                log.exception("exec output failed")
                item = OperationFailed(f"the exec failed in the daemon: {exc!r}")
            if item is None:
                continue
            self._on_loop(lambda i=item: self._put_output(i))  # type: ignore[misc]
            if not isinstance(item, ExecOutput):
                return

    def _apply(self, queue: asyncio.Queue[Input], stdin: bool) -> None:
        """Apply what ``queue`` brings (stdin and EOF, or signal and resize) in order;
        once one fails, the rest is dropped (the exec's end says what happened)."""
        failed = False
        while not self.stop.is_set():
            item = self._on_loop(queue.get)
            if item is None:
                return
            if not failed:
                try:
                    self._deliver(item)
                except BangerError as exc:
                    log.info("exec in %s: input not delivered: %s",
                             self.running.vm.name, exc)
                    failed = True
            if stdin and isinstance(item, bytes):
                with contextlib.suppress(RuntimeError):  # the loop closed: stopping
                    self.loop.call_soon_threadsafe(self._delivered, len(item))

    def _deliver(self, item: Input) -> None:
        if isinstance(item, bytes):
            self.running.write_stdin(item)  # as long as the guest takes to read it
        elif item.type == "eof":
            self.running.close_stdin()
        elif item.type == "resize":
            assert item.rows is not None and item.cols is not None
            self.running.resize(item.rows, item.cols)
        else:
            assert item.signal is not None
            self.running.signal(item.signal)
