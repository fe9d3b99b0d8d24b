"""A command in a running guest, through its agent (`banger vm exec`, `vm run -- CMD`,
the API's exec WebSocket).

An exec takes no lifecycle lock: it may run for hours, and a stop must not wait for it.
It resolves the VM, checks that it runs, and starts the command through the agent port;
from then on the VM may be stopped under it. The stop's release of the runtime closes
the agent connection, and the exec then ends with an error saying the VM was stopped
(:class:`RunningExec`), not with the connection's own words.

An exec "in the workspace" (`vm exec`) runs in the VM's checkout when it has one (the
cwd unless given) and under the tools the repo pins: through sh and ``mise exec`` when
the workspace has .mise.toml/.tool-versions and mise is there, as itself otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from banger.core.context import VMContext
from banger.core.views import agent_channel
from banger.model.errors import InvalidRequest, OperationFailed
from banger.model.vm import VM, VMState
from banger.ports import ExecExit, ExecOutput, ExecRequest, GuestExec, ImageRecord
from banger.store.vms import NotFound

# Connect (after a daemon restart), HELLO and STARTED: a guest that says nothing in this
# long is not going to.
START_TIMEOUT = 15.0
# What a command gets unless the caller says otherwise: a PATH that finds the image's
# tools, root's home, a UTF-8 locale every glibc has.
DEFAULT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root", "LANG": "C.UTF-8", "USER": "root", "LOGNAME": "root",
}


# Runs the command under mise when the workspace pins tools and mise is there (what the
# tool bootstrap installed); as itself otherwise.
IN_TOOLS = ('for f in .mise.toml mise.toml .tool-versions; do [ -f "$f" ] || continue; '
            'PATH="/root/.local/bin:$PATH"; command -v mise >/dev/null 2>&1 && '
            'exec mise exec -- "$@"; break; done; exec "$@"')
HOME = "/root"


def exec_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """:data:`DEFAULT_ENV` with ``extra`` over it."""
    return {**DEFAULT_ENV, **(extra or {})}


@dataclass
class RunningExec:
    """A started command: the guest's handle, its VM, and errors said in the VM's terms."""

    vm: VM
    handle: GuestExec
    _ctx: VMContext

    def next(self, timeout: float) -> ExecOutput | ExecExit | None:
        try:
            return self.handle.next(timeout)
        except OperationFailed as exc:
            raise self._why(exc) from exc

    def write_stdin(self, data: bytes) -> None:
        self._guarded(lambda: self.handle.write_stdin(data))

    def close_stdin(self) -> None:
        self._guarded(self.handle.close_stdin)

    def signal(self, signo: int) -> None:
        self._guarded(lambda: self.handle.signal(signo))

    def resize(self, rows: int, cols: int) -> None:
        self._guarded(lambda: self.handle.resize(rows, cols))

    def abandon(self) -> None:
        self.handle.abandon()

    def _guarded(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except OperationFailed as exc:
            raise self._why(exc) from exc

    def _why(self, exc: OperationFailed) -> OperationFailed:
        return stopped_under(self._ctx, self.vm, exc, "while the command ran")


def in_vm(vm: VM, exc: OperationFailed) -> OperationFailed:
    """``exc`` naming ``vm``: a guest's error (its agent broke the protocol, stalled,
    refused) says which VM it came from; the agent port knows only its channel."""
    if f"VM {vm.name!r}" in str(exc):
        return exc
    return OperationFailed(f"VM {vm.name!r}: {exc}")


def stopped_under(ctx: VMContext, vm: VM, exc: OperationFailed,
                  during: str) -> OperationFailed:
    """``exc`` said in the VM's terms when the VM was stopped (or is being stopped, or
    was deleted) under the guest call ``during`` ("while the command ran")."""
    try:
        now = ctx.repo.get(vm.id)
    except NotFound:
        return OperationFailed(f"VM {vm.name!r} was deleted {during} ({exc})")
    busy = ctx.lock(vm.id).locked()
    if now.state is not VMState.RUNNING or busy or now.boot_id != vm.boot_id:
        return OperationFailed(f"VM {vm.name!r} was stopped {during} "
                               f"(it is {now.state.value}): {exc}")
    return in_vm(vm, exc)


def in_workspace(vm: VM, request: ExecRequest) -> ExecRequest:
    """``request`` in ``vm``'s workspace: its cwd unless one was given (an empty cwd is
    none), under the pinned tools; a VM without one runs it as is, in HOME."""
    if vm.workspace_guest_path is None:
        return replace(request, cwd=request.cwd or HOME)
    return replace(request, argv=("sh", "-c", IN_TOOLS, "banger-exec", *request.argv),
                   cwd=request.cwd or vm.workspace_guest_path)


def with_image_config(request: ExecRequest, image: ImageRecord | None) -> ExecRequest:
    """An OCI image's Env over :data:`DEFAULT_ENV` (what the caller set itself still
    wins), and its WorkingDir as the cwd of a command given none (HOME otherwise)."""
    if image is None or image.kind != "oci":
        return request
    env = dict(DEFAULT_ENV)
    env.update(e.partition("=")[::2] for e in image.env if "=" in e)
    env.update((k, v) for k, v in request.env.items() if DEFAULT_ENV.get(k) != v)
    cwd = request.cwd
    if image.workdir and cwd in ("", HOME):
        cwd = image.workdir
    return replace(request, env=env, cwd=cwd)


def exec_start(ctx: VMContext, ref: str, request: ExecRequest, *,
               workspace: bool = False) -> RunningExec:
    """Start ``request`` in VM ``ref``, which must be running; no lock is held after.
    ``workspace``: see :func:`in_workspace`."""
    if not request.argv or not request.argv[0]:
        raise InvalidRequest("exec needs a command: argv is empty")
    if request.pty is not None and not all(0 < n < 1 << 16 for n in request.pty):
        raise InvalidRequest(f"pty size {request.pty[0]}x{request.pty[1]}: rows and cols "
                             "must be 1..65535")
    shown, channel = agent_channel(ctx, ref, "a command runs")
    if shown.vm.workspace_guest_path is None:
        request = with_image_config(request, ctx.host.images.describe(shown.vm.spec.image))
    if workspace:
        request = in_workspace(shown.vm, request)
    try:
        handle = ctx.host.agent.exec(channel=channel, request=request, timeout=START_TIMEOUT)
    except OperationFailed as exc:
        raise in_vm(shown.vm, exc) from exc
    return RunningExec(shown.vm, handle, ctx)
