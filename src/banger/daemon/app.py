"""bangerd's HTTP API: thin routes over the VM service, errors mapped at the boundary.

Lifecycle work is synchronous (the pipeline runs in a worker thread); create, start and
restart can stream their progress as NDJSON when the client asks for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from banger import __version__
from banger.api.schema import (
    NDJSON,
    PREFIX,
    BatchItem,
    BatchRequest,
    BatchResponse,
    Doctor,
    DryRun,
    ErrorBody,
    ErrorResponse,
    GuestPortOut,
    Health,
    Logs,
    OperationOut,
    ProgressEvent,
    Runtime,
    SshConfig,
    SshTarget,
    VMCreate,
    VMOut,
    VMPorts,
    VMSet,
    WorkspaceIn,
)
from banger.core.errors import BangerError, ConflictError, InvalidRequest, OperationFailed
from banger.core.operations import Progress, ProgressSink
from banger.core.ports import Endpoint, WorkspaceRequest
from banger.core.service import BatchResult, VMService, VMView
from banger.model.vm import VM, NetworkMode, VMSpec

log = logging.getLogger(__name__)

# Module level: FastAPI resolves annotations by name, and closures are out of its reach.
Accept = Annotated[str | None, Header()]
BatchAction = Literal["start", "stop", "restart", "kill", "delete"]

ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
    409: {"model": ErrorResponse}, 422: {"model": ErrorResponse},
    500: {"model": ErrorResponse},
}


def error_body(exc: BangerError) -> ErrorBody:
    return ErrorBody(code=exc.code, message=exc.message, stage=exc.stage, op_id=exc.op_id)


def vm_out(view: VMView) -> VMOut:
    vm, h = view.vm, view.handles
    return VMOut(
        id=vm.id, name=vm.name, state=vm.state.value, image=vm.spec.image, vcpus=vm.spec.vcpus,
        memory_mib=vm.spec.memory_mib, disk_mib=vm.spec.work_disk_mib,
        network=vm.spec.network.value, nat=vm.spec.nat, created_at=vm.created_at,
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


# What `vm logs` shows: the end of a log, so the answer stays small whatever a guest wrote.
LOG_TAIL = 256 * 1024


def _tail(path: os.PathLike[str] | str, limit: int = LOG_TAIL) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read(limit)  # not past `limit`: the guest may still be writing
    except FileNotFoundError:
        return b""


def _serial_tail(log: Path, rotated: Path) -> tuple[str, str | None]:
    """The last :data:`LOG_TAIL` bytes of the serial output, reaching back into the
    rotated file when the current one is shorter; and the rotated file, if any."""
    current = _tail(log)
    if not rotated.exists():
        return current.decode(errors="replace"), None
    older = _tail(rotated, LOG_TAIL - len(current)) if len(current) < LOG_TAIL else b""
    return (older + current).decode(errors="replace"), str(rotated)


def create_app(service: VMService, *, doctor: Callable[[], Doctor],
               ssh_key: str, known_hosts: str,
               ssh_argv: Callable[[Endpoint, str], list[str]]) -> FastAPI:
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
        vm = await asyncio.to_thread(fn)
        return await asyncio.to_thread(out, vm)

    def streamed(fn: Callable[[ProgressSink], VM]) -> StreamingResponse:
        q: queue.Queue[ProgressEvent | None] = queue.Queue()

        def sink(p: Progress) -> None:
            q.put(ProgressEvent(type="progress", op_id=p.op_id, vm=p.vm, kind=p.kind,
                                stage=p.stage, label=p.label, elapsed=p.elapsed,
                                message=p.message))

        def work() -> None:
            try:
                vm = fn(sink)
                q.put(ProgressEvent(type="result", result=out(vm)))
            except BangerError as exc:
                q.put(ProgressEvent(type="error", error=error_body(exc)))
            except Exception as exc:  # report, never drop the stream silently
                log.exception("operation failed")
                q.put(ProgressEvent(type="error", error=error_body(OperationFailed(str(exc)))))
            finally:
                q.put(None)

        async def lines() -> AsyncIterator[bytes]:
            task = asyncio.create_task(asyncio.to_thread(work))
            while True:
                item = await asyncio.to_thread(q.get)
                if item is None:
                    break
                yield item.model_dump_json(exclude_none=True).encode() + b"\n"
            await task

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

    @app.post(f"{PREFIX}/vms", status_code=201)
    async def create(body: VMCreate, accept: Accept = None) -> VMOut:
        network = NetworkMode(body.network) if body.network else service.default_network()
        spec = VMSpec(vcpus=body.vcpus, memory_mib=body.memory_mib, work_disk_mib=body.disk_mib,
                      image=body.image, network=network, nat=body.nat)

        ws = workspace_request(body.workspace) if body.workspace else None

        def run(sink: ProgressSink) -> VM:
            return service.create(name=body.name, spec=spec, start=body.start, sink=sink,
                                  workspace=ws)

        if wants_stream(accept):
            return streamed(run)  # type: ignore[return-value]
        return await call(lambda: run(lambda _: None))

    @app.post(f"{PREFIX}/vms/{{ref}}/workspace")
    async def prepare_workspace(ref: str, body: WorkspaceIn, accept: Accept = None) -> VMOut:
        req = workspace_request(body)
        if wants_stream(accept):
            return streamed(  # type: ignore[return-value]
                lambda sink: service.prepare_workspace(ref, req, sink=sink))
        return await call(lambda: service.prepare_workspace(ref, req))

    @app.post(f"{PREFIX}/workspace/dry-run")
    async def workspace_dry_run(body: WorkspaceIn) -> DryRun:
        return DryRun(lines=await asyncio.to_thread(service.workspace_dry_run,
                                                    workspace_request(body)))

    @app.get(f"{PREFIX}/vms/{{ref}}")
    def show(ref: str) -> VMOut:
        return vm_out(service.show(ref))

    @app.patch(f"{PREFIX}/vms/{{ref}}")
    async def set_vm(ref: str, body: VMSet) -> VMOut:
        return await call(lambda: service.set(ref, vcpus=body.vcpus, memory_mib=body.memory_mib,
                                              work_disk_mib=body.disk_mib))

    @app.post(f"{PREFIX}/vms/{{ref}}/start")
    async def start(ref: str, accept: Accept = None) -> VMOut:
        if wants_stream(accept):
            return streamed(lambda sink: service.start(ref, sink=sink))  # type: ignore[return-value]
        return await call(lambda: service.start(ref))

    @app.post(f"{PREFIX}/vms/{{ref}}/restart")
    async def restart(ref: str, accept: Accept = None) -> VMOut:
        if wants_stream(accept):
            return streamed(lambda sink: service.restart(ref, sink=sink))  # type: ignore[return-value]
        return await call(lambda: service.restart(ref))

    @app.post(f"{PREFIX}/vms/{{ref}}/stop")
    async def stop(ref: str) -> VMOut:
        return await call(lambda: service.stop(ref))

    @app.post(f"{PREFIX}/vms/{{ref}}/kill")
    async def kill(ref: str, signal: Annotated[int, Query(ge=1, le=64)] = 9) -> VMOut:
        return await call(lambda: service.kill(ref, signal=signal))

    @app.delete(f"{PREFIX}/vms/{{ref}}")
    async def delete(ref: str) -> VMOut:
        view = await asyncio.to_thread(service.show, ref)
        vm = await asyncio.to_thread(service.delete, view.vm.id)
        return vm_out(VMView(vm=vm, handles=None, paths=view.paths))

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
        results = await asyncio.to_thread(service.batch, action, body.refs, **kwargs)
        return batch_out(results)

    @app.post(f"{PREFIX}/prune")
    async def prune() -> BatchResponse:
        return batch_out(await asyncio.to_thread(service.prune))

    @app.get(f"{PREFIX}/vms/{{ref}}/logs")
    def logs(ref: str) -> Logs:
        paths = service.show(ref).paths
        serial, rotated = _serial_tail(paths.serial_log, paths.serial_log_rotated)
        return Logs(serial_log=str(paths.serial_log), serial=serial,
                    serial_rotated=rotated, vmm_log=str(paths.vmm_log),
                    vmm=_tail(paths.vmm_log).decode(errors="replace"))

    @app.get(f"{PREFIX}/vms/{{ref}}/ssh")
    def ssh_target(ref: str) -> SshTarget:
        view = service.show(ref)
        addr = view.handles.endpoint if view.handles else None
        if view.vm.state.value != "running" or addr is None:
            raise ConflictError(f"VM {view.vm.name!r} is {view.vm.state.value}, not running: "
                                f"start it with `banger vm start {view.vm.name}`")
        return SshTarget(host=addr.host, port=addr.port, user="root", key=ssh_key,
                         known_hosts=known_hosts, alias=view.paths.names.ssh_alias,
                         vm=view.vm.name, workdir=view.vm.workspace_guest_path,
                         argv=ssh_argv(addr, view.paths.names.ssh_alias))

    @app.get(f"{PREFIX}/vms/{{ref}}/ports")
    async def ports(ref: str) -> VMPorts:
        vm, views = await asyncio.to_thread(service.ports, ref)
        return VMPorts(vm=vm.name, network=vm.spec.network.value, ports=[
            GuestPortOut(proto=v.socket.proto, address=v.socket.address,
                         port=v.socket.port, process=v.socket.process, endpoint=v.endpoint,
                         note=v.note)
            for v in views])

    @app.get(f"{PREFIX}/ssh-config")
    def ssh_config() -> SshConfig:
        path = service.layout.ssh_config
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        return SshConfig(path=str(path), text=text)

    @app.get(f"{PREFIX}/operations")
    def operations() -> list[OperationOut]:
        return [OperationOut(id=o.id, kind=o.kind, vm_id=o.vm_id, vm_name=o.vm_name,
                             started_at=o.started_at, stage=o.stage)
                for o in service.ops.in_flight()]

    return app
