"""bangerd's HTTP API: thin routes over the VM service, errors mapped at the boundary.

Lifecycle work is synchronous and runs on a thread of its own per operation, never on the
shared pools the event loop and the plain routes use: a burst of boots cannot starve the
reads (list, show, ops, health) or a stop of another VM. Create, start and restart can
stream their progress as NDJSON when the client asks for it; the worker hands each event
to the event loop (call_soon_threadsafe), so a stream costs no waiting thread. An idle
stream carries a heartbeat line every HEARTBEAT_SECONDS.

Client-disconnect policy: when the client of a streamed operation goes away, the operation
is cancelled (nobody is there to use what it makes; it rolls back); a create flagged
``delete_on_disconnect`` (`vm run --rm`) is then deleted once the operation has stopped,
whether it rolled back or had just finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from banger import __version__
from banger.api.schema import (
    BatchItem,
    BatchRequest,
    BatchResponse,
    Doctor,
    DryRun,
    ErrorBody,
    ErrorResponse,
    FilesystemOut,
    GuestPortOut,
    GuestStatsOut,
    Health,
    OperationOut,
    ProgressEvent,
    Runtime,
    SshConfig,
    SshTarget,
    VMCreate,
    VmmUsageOut,
    VMOut,
    VMPorts,
    VMSet,
    VMStatsOut,
    WorkspaceIn,
)
from banger.api.wire import NDJSON, PREFIX
from banger.core.batch import BatchResult
from banger.core.operations import OpControl, Operation, Progress, ProgressSink
from banger.core.service import VMService, VMView
from banger.daemon.execws import add_exec_routes
from banger.daemon.files import add_file_routes
from banger.daemon.images import add_image_routes
from banger.daemon.logstream import add_log_routes
from banger.daemon.ndjson import queued_lines
from banger.daemon.threads import in_thread
from banger.model.errors import BangerError, InvalidRequest, OperationFailed
from banger.model.vm import VM, NetworkMode, VMSpec
from banger.ports import Endpoint, WorkspaceRequest

log = logging.getLogger(__name__)
T = TypeVar("T")
# The thread of an sshd wait (the ssh target, the ssh_config answer).
SSHD_WAIT_THREAD = "sshd-wait"

# Module level: FastAPI resolves annotations by name, and closures are out of its reach.
Accept = Annotated[str | None, Header()]
BatchAction = Literal["start", "stop", "restart", "kill", "delete"]

ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
    409: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
    500: {"model": ErrorResponse},
}


def streams(status: int = 200) -> dict[int | str, dict[str, object]]:
    """The OpenAPI entry of a route that streams its progress when asked to (Accept:
    application/x-ndjson): a ProgressEvent a line, so the published document carries the
    event vocabulary too (its nested models are the document's own components)."""
    line = ProgressEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    line.pop("$defs", None)
    return {status: {"content": {NDJSON: {"schema": line}}}}


def error_body(exc: BangerError) -> ErrorBody:
    return ErrorBody(code=exc.code, message=exc.message, stage=exc.stage, op_id=exc.op_id)


def vm_out(view: VMView) -> VMOut:
    vm, h = view.vm, view.handles
    return VMOut(
        id=vm.id, name=vm.name, state=vm.state, image=vm.spec.image, vcpus=vm.spec.vcpus,
        memory_mib=vm.spec.memory_mib, disk_mib=vm.spec.work_disk_mib,
        network=vm.spec.network, nat=vm.spec.nat, kernel=vm.spec.kernel,
        created_at=vm.created_at,
        updated_at=vm.updated_at, last_error=vm.last_error,
        last_error_stage=vm.last_error_stage, last_op_id=vm.last_op_id, boot_id=vm.boot_id,
        guest_ip=vm.guest_ip, dir=str(view.paths.dir), serial_log=str(view.paths.serial_log),
        workspace_path=vm.workspace_path, workspace_guest_path=vm.workspace_guest_path,
        workspace_head=vm.workspace_head,
        runtime=Runtime(pid=h.pid, ssh_port=h.ssh_port, ssh_host=h.ssh_host, tap=h.tap,
                        accel=h.accel,
                        accel_reason=h.accel_reason, vmm=h.vmm,
                        boot_id=h.boot_id, started_at=h.started_at) if h else None,
    )


def workspace_request(body: WorkspaceIn) -> WorkspaceRequest:
    path = Path(body.path)
    if not path.is_absolute():
        raise InvalidRequest(f"workspace path {body.path!r} must be absolute")
    return WorkspaceRequest(path=path, include_untracked=body.include_untracked,
                            branch=body.branch, from_ref=body.from_ref,
                            bootstrap=body.bootstrap)


class _Ending:
    """Whichever comes second of "the operation stopped" and "its client went away"
    runs the abandoned-operation cleanup, exactly once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._gone = False

    def stopped(self) -> bool:
        with self._lock:
            self._stopped = True
            return self._gone

    def gone(self) -> bool:
        with self._lock:
            self._gone = True
            return self._stopped


def create_app(service: VMService, *, doctor: Callable[[], Doctor],
               ssh_key: str, known_hosts: str,
               ssh_argv: Callable[[Endpoint, str], list[str]],
               stopping: threading.Event | None = None) -> FastAPI:
    """``stopping`` is set when the daemon begins to stop: log streams that follow a
    running VM end then (uvicorn waits for every response to end)."""
    app = FastAPI(title="bangerd", version=__version__,
                  description="banger's daemon API (JSON over a Unix socket)",
                  responses=ERRORS)

    @app.exception_handler(BangerError)
    async def _banger_error(_: Request, exc: BangerError) -> JSONResponse:
        return JSONResponse(status_code=exc.status,
                            content=ErrorResponse(error=error_body(exc)).model_dump())

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}"
                        for e in exc.errors())
        body = ErrorBody(code="invalid", message=f"invalid request: {msg}")
        return JSONResponse(status_code=422, content=ErrorResponse(error=body).model_dump())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = ErrorBody(code="http_error", message=str(exc.detail))
        return JSONResponse(status_code=exc.status_code, headers=exc.headers,
                            content=ErrorResponse(error=body).model_dump())

    def out(vm: VM) -> VMOut:
        return vm_out(service.view(vm))

    async def call(fn: Callable[[], VM]) -> VMOut:
        return await in_thread(lambda: out(fn()))


    def streamed(fn: Callable[[ProgressSink, OpControl], VM],
                 on_abandoned: Callable[[], None] | None = None) -> StreamingResponse:
        """Stream ``fn``'s progress; when the client goes away, cancel it and, once it
        has stopped, run ``on_abandoned``."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[ProgressEvent | None] = asyncio.Queue()
        control = OpControl()
        ending = _Ending()

        def put(item: ProgressEvent | None) -> None:
            with contextlib.suppress(RuntimeError):  # a closed loop: the daemon is stopping
                loop.call_soon_threadsafe(q.put_nowait, item)

        def sink(p: Progress) -> None:
            put(ProgressEvent(type="progress", op_id=p.op_id, vm=p.vm, kind=p.kind,
                              stage=p.stage, label=p.label, elapsed=p.elapsed,
                              message=p.message))

        def abandoned() -> None:
            if on_abandoned is None:
                return
            try:
                on_abandoned()
            except Exception:
                log.exception("cleanup of an operation whose client went away failed")

        def work() -> VM | None:
            try:
                vm = fn(sink, control)
                put(ProgressEvent(type="result", result=out(vm)))
                return vm
            except BangerError as exc:
                put(ProgressEvent(type="error", error=error_body(exc)))
            except Exception as exc:  # report, never drop the stream silently
                log.exception("operation failed")
                put(ProgressEvent(type="error", error=error_body(OperationFailed(str(exc)))))
            finally:
                put(None)
                if ending.stopped():
                    abandoned()
            return None

        async def lines() -> AsyncIterator[bytes]:
            in_thread(work)
            delivered = False  # the final line (result or error) went out
            try:
                async for line, item in queued_lines(q, ProgressEvent(type="heartbeat")):
                    yield line
                    # A client hangs up as soon as it has the final line: from here on
                    # its going away is no news.
                    delivered = item is not None and item.type in ("result", "error")
            finally:
                # Closed or cancelled before the final line went out: the client is gone.
                if not delivered:
                    log.warning("the client of a streamed operation went away: cancelling it")
                    control.cancel("cancelled: its client went away")
                    if ending.gone():
                        in_thread(abandoned, "banger-cleanup")

        return StreamingResponse(lines(), media_type=NDJSON)

    def wants_stream(accept: str | None) -> bool:
        return accept is not None and NDJSON in accept

    @app.get(f"{PREFIX}/health")
    def health() -> Health:
        return Health(version=__version__, pid=os.getpid())

    @app.get(f"{PREFIX}/doctor")
    def doctor_route() -> Doctor:
        return doctor()

    @app.get(f"{PREFIX}/vms")
    def list_vms() -> list[VMOut]:
        return [vm_out(v) for v in service.list_vms()]

    @app.post(f"{PREFIX}/vms", status_code=201, responses=streams(201))
    async def create(body: VMCreate, accept: Accept = None) -> VMOut:
        network = NetworkMode(body.network) if body.network else service.default_network()
        spec = VMSpec(vcpus=body.vcpus, memory_mib=body.memory_mib, work_disk_mib=body.disk_mib,
                      image=body.image, network=network, nat=body.nat, kernel=body.kernel)

        ws = workspace_request(body.workspace) if body.workspace else None
        made: list[VM] = []

        def run(sink: ProgressSink, control: OpControl | None = None) -> VM:
            return service.create(name=body.name, spec=spec, start=body.start, sink=sink,
                                  workspace=ws, control=control, on_record=made.append)

        def delete_ephemeral() -> None:
            if body.delete_on_disconnect and made:
                log.info("deleting %s: its client went away", made[0].name)
                service.delete(made[0].id)

        if wants_stream(accept):
            return streamed(run, delete_ephemeral)  # type: ignore[return-value]
        return await call(lambda: run(lambda _: None))

    @app.post(f"{PREFIX}/vms/{{ref}}/workspace", responses=streams())
    async def prepare_workspace(ref: str, body: WorkspaceIn, accept: Accept = None) -> VMOut:
        req = workspace_request(body)
        if wants_stream(accept):
            return streamed(  # type: ignore[return-value]
                lambda sink, _: service.prepare_workspace(ref, req, sink=sink))
        return await call(lambda: service.prepare_workspace(ref, req))

    @app.post(f"{PREFIX}/workspace/dry-run")
    async def workspace_dry_run(body: WorkspaceIn) -> DryRun:
        req = workspace_request(body)
        return DryRun(lines=await in_thread(lambda: service.workspace_dry_run(req)))

    @app.get(f"{PREFIX}/vms/{{ref}}")
    def show(ref: str) -> VMOut:
        return vm_out(service.show(ref))

    @app.patch(f"{PREFIX}/vms/{{ref}}")
    async def set_vm(ref: str, body: VMSet) -> VMOut:
        return await call(lambda: service.set(ref, vcpus=body.vcpus, memory_mib=body.memory_mib,
                                              work_disk_mib=body.disk_mib))

    @app.post(f"{PREFIX}/vms/{{ref}}/start", responses=streams())
    async def start(ref: str, accept: Accept = None) -> VMOut:
        if wants_stream(accept):
            return streamed(  # type: ignore[return-value]
                lambda sink, control: service.start(ref, sink=sink, control=control))
        return await call(lambda: service.start(ref))

    @app.post(f"{PREFIX}/vms/{{ref}}/restart", responses=streams())
    async def restart(ref: str, accept: Accept = None) -> VMOut:
        if wants_stream(accept):
            return streamed(  # type: ignore[return-value]
                lambda sink, control: service.restart(ref, sink=sink, control=control))
        return await call(lambda: service.restart(ref))

    @app.post(f"{PREFIX}/vms/{{ref}}/stop")
    async def stop(ref: str) -> VMOut:
        return await call(lambda: service.stop(ref))

    @app.post(f"{PREFIX}/vms/{{ref}}/kill")
    async def kill(ref: str, signal: Annotated[int, Query(ge=1, le=64)] = 9) -> VMOut:
        return await call(lambda: service.kill(ref, signal=signal))

    @app.delete(f"{PREFIX}/vms/{{ref}}")
    async def delete(ref: str) -> VMOut:
        def run() -> VMOut:
            view = service.show(ref)
            vm = service.delete(view.vm.id)
            return vm_out(VMView(vm=vm, handles=None, paths=view.paths))
        return await in_thread(run)

    def batch_out(results: list[BatchResult]) -> BatchResponse:
        items = []
        for r in results:
            vm = None
            if r.vm is not None:
                try:
                    vm = vm_out(service.view(r.vm))
                except BangerError:
                    vm = vm_out(VMView(r.vm, None, service.layout.vm(r.vm.id)))  # deleted
            items.append(BatchItem(ref=r.ref, vm=vm,
                                   error=error_body(r.error) if r.error else None))
        return BatchResponse(results=items)

    @app.post(f"{PREFIX}/batch/{{action}}")
    async def batch(action: BatchAction, body: BatchRequest) -> BatchResponse:
        kwargs = {"signal": body.signal} if action == "kill" and body.signal else {}
        return await in_thread(lambda: batch_out(service.batch(action, body.refs, **kwargs)))

    @app.post(f"{PREFIX}/prune")
    async def prune(body: BatchRequest | None = None) -> BatchResponse:
        """Delete the VMs that are not running; only those of ``refs`` when given."""
        refs = body.refs if body is not None else None
        return await in_thread(lambda: batch_out(service.prune(refs)))

    add_log_routes(app, service, stopping or threading.Event())

    @app.get(f"{PREFIX}/vms/{{ref}}/ssh")
    async def ssh_target(ref: str) -> SshTarget:
        """Where a person's ssh reaches the VM; waits for its sshd the first time after
        a boot (a start ends before sshd may be up)."""
        # A thread of its own, not the server's shared pool: waits of up to
        # timeouts.sshd each must not stop the daemon answering (daemon/threads.py). Not
        # "banger-": the daemon's exit does not wait for a wait.
        view = await in_thread(lambda: service.ssh_view(ref), SSHD_WAIT_THREAD)
        assert view.handles is not None and view.handles.endpoint is not None
        addr = view.handles.endpoint
        return SshTarget(host=addr.host, port=addr.port, user="root", key=ssh_key,
                         known_hosts=known_hosts, alias=view.paths.names.ssh_alias,
                         vm=view.vm.name, workdir=view.vm.workspace_guest_path,
                         argv=ssh_argv(addr, view.paths.names.ssh_alias))

    @app.get(f"{PREFIX}/vms/{{ref}}/ports")
    async def ports(ref: str) -> VMPorts:
        vm, views = await in_thread(lambda: service.ports(ref))
        return VMPorts(vm=vm.name, network=vm.spec.network.value, ports=[
            GuestPortOut(proto=v.socket.proto, address=v.socket.address,
                         port=v.socket.port, process=v.socket.process, endpoint=v.endpoint,
                         note=v.note)
            for v in views])

    @app.get(f"{PREFIX}/vms/{{ref}}/stats")
    async def stats(ref: str) -> VMStatsOut:
        """The running guest's CPU, memory, load and disks (from its agent, two samples
        ~0.5 s apart) and its VMM process's memory and CPU on the host."""
        s = await in_thread(lambda: service.stats(ref))
        g = s.guest
        vmm = None if s.vmm is None else VmmUsageOut(
            pid=s.vmm_pid, rss_bytes=s.vmm.rss_bytes, cpu_seconds=s.vmm.cpu_seconds,
            cpu_percent=s.vmm_cpu_percent)
        return VMStatsOut(vm=s.vm.name, interval=s.interval, vmm=vmm, guest=GuestStatsOut(
            uptime_ms=g.uptime_ms, load1=g.load1, load5=g.load5, load15=g.load15,
            mem_total_kib=g.mem_total_kib, mem_available_kib=g.mem_available_kib,
            ncpu=g.ncpu, cpu_user_ticks=g.cpu_user_ticks, cpu_system_ticks=g.cpu_system_ticks,
            cpu_idle_ticks=g.cpu_idle_ticks, cpu_percent=s.guest_cpu_percent,
            filesystems=[FilesystemOut(mountpoint=f.mountpoint, size_bytes=f.size_bytes,
                                       used_bytes=f.used_bytes, avail_bytes=f.avail_bytes)
                         for f in g.filesystems]))

    @app.get(f"{PREFIX}/ssh-config")
    async def ssh_config() -> SshConfig:
        """banger's ssh_config, once the sshd of each VM it names answered (or was given
        up on) on this boot: a start ends before sshd may be up."""
        await in_thread(service.await_sshd, SSHD_WAIT_THREAD)
        path = service.layout.ssh_config
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        return SshConfig(path=str(path), text=text)

    def op_out(o: Operation) -> OperationOut:
        return OperationOut(id=o.id, kind=o.kind, vm_id=o.vm_id, vm_name=o.vm_name,
                            started_at=o.started_at, stage=o.stage,
                            cancelled=o.control.cancelled)

    @app.get(f"{PREFIX}/operations")
    def operations() -> list[OperationOut]:
        return [op_out(o) for o in service.ops.in_flight()]

    @app.post(f"{PREFIX}/operations/{{op_id}}/cancel")
    def cancel(op_id: str) -> OperationOut:
        """Ask an operation in flight to stop; its stream reports the rollback and ends
        with an error of code "cancelled". A start (also of a create or restart) stops
        between steps, in line for a boot slot or in its readiness wait; stop, kill and
        delete are short and run to their end."""
        return op_out(service.ops.cancel(op_id))

    add_exec_routes(app, service)
    add_file_routes(app, service)
    add_image_routes(app, service)
    return app
