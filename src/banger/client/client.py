"""Typed client for bangerd's API over its Unix socket; starts the daemon on first use.

The stdlib's :mod:`http.client` carries the requests: the CLI sends one request per
connection and reads JSON or an NDJSON stream back, which needs nothing more, and it
loads in a few milliseconds where httpx took a quarter of a second per command. Every
connection's peer is checked before a byte is sent (:mod:`banger.client.peer`)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from banger.api.wire import NDJSON, PREFIX, STREAM_SILENCE_LIMIT
from banger.client.errors import ApiError as ApiError  # re-exported: the CLI names them here
from banger.client.errors import DaemonUnavailable as DaemonUnavailable
from banger.client.errors import seg as seg
from banger.client.httpconn import PeerCheckedConnection
from banger.client.peer import check_runtime_dir
from banger.client.types import (
    BatchResponse,
    CreateBody,
    Doctor,
    ErrorBody,
    FilesPut,
    Health,
    ImageOut,
    ImageProgress,
    LogEvent,
    Logs,
    OperationOut,
    ProgressEvent,
    SetBody,
    SshConfig,
    SshTarget,
    VMOut,
    VMPorts,
    VMStatsOut,
    WorkspaceBody,
)
from banger.local.trust import without_agent_env
from banger.model.layout import EXIT_ALREADY_RUNNING, PATH_ENV, Layout

if TYPE_CHECKING:
    from banger.client.execws import ExecSession

# Plain (non-streamed) requests never wait forever on a daemon that stopped answering.
# Reads answer from memory and SQLite. `ports` asks the guest's agent, `stats` asks it
# twice (10 s each at most); `ssh` waits for the guest's sshd the first time after a boot
# (core Timeouts.sshd, 30 s), so it gets GUEST_TIMEOUT, never the plain read's 30 s: the
# daemon must get to say what is wrong before the client gives up. Changes (stop,
# kill, delete, set, batch, prune) may first wait for the VM's lock, which a start holds
# up to its readiness timeout (core Timeouts.ready: 180 s, BANGER_READY_TIMEOUT), then
# power the guest off (10 s, then QMP quit 5 s, then kill 5 s): ten minutes covers both
# with room to spare.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
GUEST_TIMEOUT = 90.0
CHANGE_TIMEOUT = 600.0
STREAM_CONNECT_TIMEOUT = 10.0


ProgressFn = Callable[[ProgressEvent], None]


class Client:
    def __init__(self, socket_path: Path, *, read_timeout: float | None = None) -> None:
        self.socket_path = socket_path
        self.read_timeout = read_timeout  # overrides every plain request's (completion)

    def close(self) -> None:
        """Nothing to release: each request has its own connection."""

    def _connection(self, timeout: float, connect_timeout: float) -> PeerCheckedConnection:
        return PeerCheckedConnection(str(self.socket_path), timeout=timeout,
                                     connect_timeout=connect_timeout)

    @staticmethod
    def _send(conn: PeerCheckedConnection, method: str, path: str, body: Any,
              accept: str) -> http.client.HTTPResponse:
        headers = {"Accept": accept}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, PREFIX + path, body=data, headers=headers)
        return conn.getresponse()

    def _request(self, method: str, path: str, *, timeout: float | None = None,
                 body: Any = None) -> Any:
        timeout = READ_TIMEOUT if timeout is None else timeout
        if self.read_timeout is not None:
            timeout = min(timeout, self.read_timeout)
        conn = self._connection(timeout, min(CONNECT_TIMEOUT, timeout))
        try:
            resp = self._send(conn, method, path, body, "application/json")
            content = resp.read()
        except TimeoutError as exc:
            raise DaemonUnavailable(f"bangerd on {self.socket_path} did not answer {method} "
                                    f"{PREFIX + path} within {timeout:.0f} s ({exc!r})"
                                    ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnavailable(f"bangerd is not answering on {self.socket_path}: "
                                    f"{exc or type(exc).__name__}") from exc
        finally:
            conn.close()
        if not 200 <= resp.status < 300:  # a redirect too: this client follows none
            raise _api_error(resp.status, content)
        try:
            return json.loads(content)
        except ValueError as exc:
            raise DaemonUnavailable(f"bangerd's answer to {method} {PREFIX + path} is not "
                                    f"JSON: {content[:100]!r}") from exc

    @contextlib.contextmanager
    def _streaming(self, method: str, path: str,
                   body: Any = None) -> Iterator[http.client.HTTPResponse]:
        """An NDJSON stream's response; a daemon gone or silent is DaemonUnavailable, and
        the connection closes at the end, which tells the daemon its client went away."""
        pending = self._begin_stream(method, path, body)
        with contextlib.closing(pending), pending.translated():
            yield pending.response()

    def _begin_stream(self, method: str, path: str, body: Any = None) -> PendingStream:
        """Send an NDJSON stream's request now; its response is read later
        (:class:`PendingStream`)."""
        # No limit on the whole stream (a boot may take minutes, a follow hours), but the
        # daemon sends a line at least every HEARTBEAT_SECONDS: silence this long means
        # it is gone.
        conn = self._connection(STREAM_SILENCE_LIMIT, STREAM_CONNECT_TIMEOUT)
        pending = PendingStream(self.socket_path, conn)
        with pending.translated():
            try:
                headers = {"Accept": NDJSON}
                data = None
                if body is not None:
                    data = json.dumps(body).encode()
                    headers["Content-Type"] = "application/json"
                conn.request(method, PREFIX + path, body=data, headers=headers)
            except BaseException:
                conn.close()
                raise
        return pending

    def _stream(self, method: str, path: str, on_progress: ProgressFn,
                body: Any = None) -> VMOut:
        pending = self._begin_stream(method, path, body)
        return pending.result(on_progress)

    def images(self) -> list[ImageOut]:
        return [ImageOut.from_json(i) for i in self._request("GET", "/images")]

    def image(self, name: str) -> ImageOut:
        return ImageOut.from_json(self._request("GET", f"/images/{seg(name)}"))

    def pull_image(self, body: dict[str, Any], on_progress: Callable[[str], None], *,
                   archive: bool = False) -> ImageOut:
        """Pull (``{"ref", "name"?}``) or import (``{"path", "name"?}``) an image; its
        progress lines go to ``on_progress``."""
        path = "/images/import" if archive else "/images/pull"
        with self._streaming("POST", path, body) as resp:
            for line in resp:
                if not line.strip():
                    continue
                ev = _parsed(ImageProgress, line, "image progress")
                if ev.type == "progress" and ev.message is not None:
                    on_progress(ev.message)
                elif ev.type == "error" and ev.error is not None:
                    raise ApiError(ev.error)
                elif ev.type == "result" and ev.image is not None:
                    return ev.image
        raise DaemonUnavailable("bangerd ended the image stream without a result")

    def health(self) -> Health:
        return Health.from_json(self._request("GET", "/health"))

    def doctor(self) -> Doctor:
        return Doctor.from_json(self._request("GET", "/doctor"))

    def list_vms(self) -> list[VMOut]:
        return [VMOut.from_json(v) for v in self._request("GET", "/vms")]

    def show(self, ref: str) -> VMOut:
        return VMOut.from_json(self._request("GET", f"/vms/{seg(ref)}"))

    def create(self, req: CreateBody, on_progress: ProgressFn) -> VMOut:
        return self._stream("POST", "/vms", on_progress, body=req)

    def begin_create(self, req: CreateBody) -> PendingStream:
        """Send the create now, read its progress later (``.result(on_progress)``): the
        daemon starts the VM while the CLI loads what it shows progress with."""
        return self._begin_stream("POST", "/vms", req)

    def start(self, ref: str, on_progress: ProgressFn) -> VMOut:
        return self._stream("POST", f"/vms/{seg(ref)}/start", on_progress)

    def restart(self, ref: str, on_progress: ProgressFn) -> VMOut:
        return self._stream("POST", f"/vms/{seg(ref)}/restart", on_progress)

    def stop(self, ref: str) -> VMOut:
        return VMOut.from_json(self._request("POST", f"/vms/{seg(ref)}/stop",
                                             timeout=CHANGE_TIMEOUT))

    def delete(self, ref: str) -> VMOut:
        return VMOut.from_json(self._request("DELETE", f"/vms/{seg(ref)}",
                                             timeout=CHANGE_TIMEOUT))

    def set(self, ref: str, req: SetBody) -> VMOut:
        return VMOut.from_json(self._request("PATCH", f"/vms/{seg(ref)}", body=req,
                                             timeout=CHANGE_TIMEOUT))

    def batch(self, action: str, refs: list[str], signal: int | None = None) -> BatchResponse:
        body: dict[str, Any] = {"refs": refs}
        if signal is not None:
            body["signal"] = signal
        return BatchResponse.from_json(
            self._request("POST", f"/batch/{seg(action)}", body=body,
                          timeout=CHANGE_TIMEOUT))

    def prune(self, refs: list[str] | None = None) -> BatchResponse:
        """Delete the VMs that are not running (of ``refs`` only, when given)."""
        return BatchResponse.from_json(
            self._request("POST", "/prune", timeout=CHANGE_TIMEOUT,
                          body={"refs": refs} if refs else None))

    def prepare_workspace(self, ref: str, ws: WorkspaceBody,
                          on_progress: ProgressFn) -> VMOut:
        return self._stream("POST", f"/vms/{seg(ref)}/workspace", on_progress, body=ws)

    def workspace_dry_run(self, ws: WorkspaceBody) -> list[str]:
        lines: list[str] = self._request("POST", "/workspace/dry-run", body=ws,
                                         timeout=GUEST_TIMEOUT)["lines"]
        return lines

    def logs(self, ref: str) -> Logs:
        return Logs.from_json(self._request("GET", f"/vms/{seg(ref)}/logs"))

    def log_stream(self, ref: str, *, follow: bool = False, vmm: bool = False,
                   lines: int | None = None) -> Iterator[LogEvent]:
        """The end of a VM's serial log (the VMM's with ``vmm``: its last ``lines`` lines,
        or its last 256 KiB), then with ``follow`` what it writes, until the VM stops.
        Heartbeats are not handed out; closing the iterator ends the daemon's stream."""
        query = f"follow={str(follow).lower()}&vmm={str(vmm).lower()}"
        if lines is not None:
            query += f"&lines={lines}"
        with self._streaming("GET", f"/vms/{seg(ref)}/logs/stream?{query}") as resp:
            for line in resp:
                if not line.strip():
                    continue
                ev = _parsed(LogEvent, line, "log")
                if ev.type == "heartbeat":
                    continue
                yield ev
                if ev.type == "end":
                    return
        raise DaemonUnavailable("bangerd ended the log stream without its end line")

    def ssh_target(self, ref: str) -> SshTarget:
        return SshTarget.from_json(self._request("GET", f"/vms/{seg(ref)}/ssh",
                                                 timeout=GUEST_TIMEOUT))

    def ports(self, ref: str) -> VMPorts:
        return VMPorts.from_json(self._request("GET", f"/vms/{seg(ref)}/ports",
                                               timeout=GUEST_TIMEOUT))

    def stats(self, ref: str) -> VMStatsOut:
        """A running VM's guest and VMM stats (the daemon samples twice, ~0.5 s apart)."""
        return VMStatsOut.from_json(self._request("GET", f"/vms/{seg(ref)}/stats",
                                                  timeout=GUEST_TIMEOUT))

    def exec(self, ref: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
             cwd: str | None = None, tty: tuple[int, int] | None = None,
             in_workspace: bool = False) -> ExecSession:
        """Start ``argv`` in running VM ``ref`` (no shell) over the exec WebSocket; returns
        once it runs (see :mod:`banger.client.execws`). ``tty=(rows, cols)``: on a pty;
        ``in_workspace``: in the VM's workspace, under its pinned tools (docs/api.md)."""
        from banger.client.execws import open_exec

        return open_exec(str(self.socket_path), seg(ref), argv, env=env, cwd=cwd, tty=tty,
                         in_workspace=in_workspace)

    def put_files(self, ref: str, dest: str, tar: Iterable[bytes]) -> FilesPut:
        """Extract the tar stream ``tar`` (streamed, chunked) into the directory ``dest``
        of running VM ``ref`` (see :mod:`banger.client.files`)."""
        from banger.client import files

        return FilesPut.from_json(files.put(self.socket_path, seg(ref), dest, tar))

    def get_files(self, ref: str, path: str) -> Iterator[bytes]:
        """A tar of ``path`` in running VM ``ref``, in chunks; TransferBroken when it is
        cut short (see :mod:`banger.client.files`)."""
        from banger.client import files

        return files.get(self.socket_path, seg(ref), path)

    def ssh_config(self) -> SshConfig:
        return SshConfig.from_json(self._request("GET", "/ssh-config"))

    def cancel(self, op_id: str) -> OperationOut:
        """Ask the daemon to cancel operation ``op_id``; its stream reports the rollback."""
        return OperationOut.from_json(
            self._request("POST", f"/operations/{seg(op_id)}/cancel"))

    def operations(self) -> list[OperationOut]:
        return [OperationOut.from_json(o) for o in self._request("GET", "/operations")]


def _api_error(status: int, content: bytes) -> ApiError:
    try:
        body = ErrorBody.from_json(json.loads(content)["error"])
    except (ValueError, KeyError, TypeError):
        body = ErrorBody(code="http_error", message=f"HTTP {status}: {content[:300]!r}")
    return ApiError(body, status)


E = TypeVar("E", ProgressEvent, LogEvent, ImageProgress)


def _parsed(cls: type[E], line: bytes, what: str) -> E:
    try:
        return cls.from_json(json.loads(line))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DaemonUnavailable(f"bangerd sent a {what} line this banger cannot "
                                f"read ({exc!r}): {line[:100]!r}") from exc


class PendingStream:
    """A progress stream whose request is sent and whose response is not read yet.
    ``result`` reads it to its result (and closes it); ``close`` abandons it, which the
    daemon takes as its client gone."""

    def __init__(self, socket_path: Path, conn: PeerCheckedConnection) -> None:
        self.socket_path = socket_path
        self.conn = conn

    @contextlib.contextmanager
    def translated(self) -> Iterator[None]:
        """A daemon gone or silent as DaemonUnavailable."""
        try:
            yield
        except TimeoutError as exc:
            raise DaemonUnavailable(f"bangerd on {self.socket_path} sent nothing for "
                                    f"{STREAM_SILENCE_LIMIT:.0f} s (not even its "
                                    "heartbeat): it is stuck or gone; see its log"
                                    ) from exc
        except (OSError, http.client.HTTPException) as exc:
            raise DaemonUnavailable(f"lost bangerd on {self.socket_path}: "
                                    f"{exc or type(exc).__name__}") from exc

    def response(self) -> http.client.HTTPResponse:
        """The response once its status is in; an error status is raised as ApiError."""
        with self.translated():
            resp = self.conn.getresponse()
            if not 200 <= resp.status < 300:
                raise _api_error(resp.status, resp.read())
            return resp

    def result(self, on_progress: ProgressFn) -> VMOut:
        """Each progress event to ``on_progress``, then the result (or its ApiError)."""
        with contextlib.closing(self):
            resp = self.response()
            with self.translated():
                for ev in _events(resp):
                    if ev.type == "progress":
                        on_progress(ev)
                    elif ev.type == "error" and ev.error is not None:
                        raise ApiError(ev.error)
                    elif ev.type == "result" and ev.result is not None:
                        return ev.result
        raise DaemonUnavailable("bangerd ended the progress stream without a result")

    def close(self) -> None:
        self.conn.close()


def _events(lines: Iterator[bytes] | http.client.HTTPResponse) -> Iterator[ProgressEvent]:
    for line in lines:
        if line.strip():
            yield _parsed(ProgressEvent, line, "progress")


def _absolute_paths(env: dict[str, str]) -> dict[str, str]:
    for key in PATH_ENV:
        if env.get(key):
            env[key] = os.path.abspath(env[key])
    return env


def connect(layout: Layout | None = None, *, autostart: bool = True,
            notify: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
            timeout: float = 60.0) -> Client:
    """A client for the user's daemon, starting bangerd first if it is not running.

    The runtime directory is verified (ours, 0700, not a symlink) before its socket is
    used, and every connection's peer is checked (:mod:`banger.client.peer`). Many CLIs
    may autostart at once: one bangerd wins the state directory's lock, the others exit
    with EXIT_ALREADY_RUNNING and their CLIs wait for the winner's /health. ``timeout``
    allows for a first start on a loaded machine (16 Python processes starting at once
    on 2 busy cores took up to 23 s here).
    """
    layout = layout or Layout.for_user()
    check_runtime_dir(layout)
    client = Client(layout.daemon_socket)
    try:
        client.health()
        return client
    except DaemonUnavailable:
        if not autostart:
            raise
    layout.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = layout.daemon_log
    with open(log_path, "ab") as logf:
        # -P: `python -m` would otherwise put the current directory first on sys.path,
        # and the CLI runs in the user's repo (`cd repo && banger vm run .`): a repo's
        # uvicorn.py or banger/ would be imported by the daemon, as root under a root one.
        # cwd /: the daemon outlives this directory, and nothing it runs (git, ssh with a
        # `.` on PATH) may be looked up in a repo; so the paths it is given go absolute.
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "banger.daemon.main"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True,
            env=_absolute_paths(without_agent_env(dict(os.environ))), cwd="/",
        )
    deadline = time.monotonic() + timeout
    other = False  # our bangerd lost the lock to another CLI's: wait for that one
    while time.monotonic() < deadline:
        if not other and proc.poll() is not None:
            if proc.returncode != EXIT_ALREADY_RUNNING:
                raise DaemonUnavailable(f"bangerd exited at start (status {proc.returncode}); "
                                        f"see {log_path}")
            other = True
        try:
            health = client.health()
        except DaemonUnavailable:
            time.sleep(0.1)
            continue
        if health.pid == proc.pid:  # not when another CLI's bangerd won the lock
            notify(f"banger: started bangerd (pid {health.pid}; log {log_path})")
        return client
    if other:
        raise DaemonUnavailable(
            f"another bangerd holds {layout.daemon_lock} (its pid is in that file) but did "
            f"not answer on {layout.daemon_socket} within {timeout:.0f} s; see {log_path}")
    raise DaemonUnavailable(f"bangerd did not answer within {timeout:.0f} s; see {log_path}")
