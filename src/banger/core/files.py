"""Files in and out of a running guest (`vm cp`, the API's ``/vms/{ref}/files``): tar
streams through the guest agent.

Like an exec, a transfer takes no lifecycle lock (a 2 GB copy must not hold up a stop):
it resolves the VM, checks that it runs and hands the stream to the agent port. A stop
under a transfer releases the agent connection and the transfer ends with an error that
says the VM was stopped.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable
from posixpath import normpath

from banger.core.context import VMContext
from banger.core.execs import stopped_under
from banger.core.views import agent_channel
from banger.model.errors import InvalidRequest, OperationFailed
from banger.model.vm import VM

# Each wait of a transfer (the guest's credit, its next chunk, its answer): a guest that
# says nothing for this long is not going to. Not the whole transfer's limit.
FILE_TIMEOUT = 60.0


def guest_path(path: str) -> str:
    """``path`` checked: absolute, no NUL, at most 4096 bytes; normalised (no `.`, no
    repeated or trailing `/`)."""
    if not path.startswith("/"):
        raise InvalidRequest(f"guest path {path!r} must be absolute (e.g. /root/{path})")
    if "\0" in path or len(path.encode()) > 4096:
        raise InvalidRequest("a guest path may hold no NUL and is at most 4096 bytes")
    return normpath(path) if path != "//" else "/"


def put_files(ctx: VMContext, ref: str, dest: str, source: Iterable[bytes]) -> int:
    """Extract the tar ``source`` into ``dest`` in running VM ``ref``; the bytes sent."""
    dest = guest_path(dest)
    shown, channel = agent_channel(ctx, ref, "files are copied")
    try:
        return ctx.host.agent.put_files(channel=channel, dest=dest, source=source,
                                        timeout=FILE_TIMEOUT)
    except OperationFailed as exc:
        raise _why(ctx, shown.vm, exc) from exc
    except InvalidRequest as exc:  # the guest refused (a bad entry, no permission)
        raise _refused(shown.vm, exc) from exc


def get_files(ctx: VMContext, ref: str, path: str) -> Generator[bytes, None, None]:
    """A tar of ``path`` in running VM ``ref``, as a generator of chunks (see
    ``AgentPort.get_files``); errors before the first chunk raise here."""
    path = guest_path(path)
    shown, channel = agent_channel(ctx, ref, "files are copied")
    try:  # the port starts the transfer at once: errors before its first chunk
        chunks = ctx.host.agent.get_files(channel=channel, path=path, timeout=FILE_TIMEOUT)
    except OperationFailed as exc:
        raise _why(ctx, shown.vm, exc) from exc
    except InvalidRequest as exc:
        raise _refused(shown.vm, exc) from exc
    return _said(ctx, shown.vm, chunks)


def _said(ctx: VMContext, vm: VM,
          chunks: Generator[bytes, None, None]) -> Generator[bytes, None, None]:
    try:
        yield from chunks
    except OperationFailed as exc:
        raise _why(ctx, vm, exc) from exc
    except InvalidRequest as exc:
        raise _refused(vm, exc) from exc
    finally:
        chunks.close()


def _why(ctx: VMContext, vm: VM, exc: OperationFailed) -> OperationFailed:
    return stopped_under(ctx, vm, exc, "during the copy")


def _refused(vm: VM, exc: InvalidRequest) -> InvalidRequest:
    return InvalidRequest(f"VM {vm.name!r}: {exc}")
