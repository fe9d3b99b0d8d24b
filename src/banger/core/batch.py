"""Several VMs at once: one action over many refs (resolved once, de-duplicated, run
concurrently, each result reported), and prune (delete the VMs that are not running)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from banger.core.context import VMContext
from banger.core.views import list_views
from banger.model.errors import BangerError, OperationFailed
from banger.model.vm import VM, VMState


@dataclass(frozen=True)
class BatchResult:
    ref: str
    vm: VM | None
    error: BangerError | None


def batch(ctx: VMContext, action: str, act: Callable[..., VM], refs: Sequence[str],
          **kwargs: object) -> list[BatchResult]:
    """Resolve every ref once, de-duplicate, ``act`` (the use case ``action``, called
    with a VM id and ``kwargs``) concurrently, report each result."""
    resolved: list[tuple[str, VM | None, BangerError | None]] = []
    for ref in refs:
        try:
            resolved.append((ref, ctx.resolve(ref), None))
        except BangerError as exc:
            resolved.append((ref, None, exc))
    unique: dict[str, VM] = {}
    for _, vm, _err in resolved:
        if vm is not None:
            unique.setdefault(vm.id, vm)
    outcomes: dict[str, tuple[VM | None, BangerError | None]] = {}

    def one(vm: VM) -> None:
        try:
            outcomes[vm.id] = (act(vm.id, **kwargs), None)
        except BangerError as exc:
            outcomes[vm.id] = (None, exc)
        except Exception as exc:
            outcomes[vm.id] = (None, OperationFailed(f"{action} {vm.name}: {exc}"))

    if unique:
        with ThreadPoolExecutor(max_workers=min(8, len(unique))) as pool:
            list(pool.map(one, unique.values()))
    results: list[BatchResult] = []
    seen: set[str] = set()
    for ref, vm, err in resolved:
        if vm is None:
            results.append(BatchResult(ref, None, err))
        elif vm.id not in seen:
            seen.add(vm.id)
            done, failure = outcomes[vm.id]
            results.append(BatchResult(ref, done, failure))
    return results


def prune(ctx: VMContext, delete: Callable[..., VM],
          refs: Sequence[str] | None = None) -> list[BatchResult]:
    """Delete the VMs that are not running: of ``refs`` when given (the ones the user
    saw and confirmed; a VM that stopped since the question was asked is not among
    them), else of all."""
    doomed = list(refs) if refs is not None else [
        v.vm.id for v in list_views(ctx) if v.vm.state is not VMState.RUNNING]
    # A VM listed as starting (or stopped, in the middle of a restart) is checked
    # again under its lock: it is deleted only if it is still not running then.
    return batch(ctx, "delete", delete, doomed, only_idle=True)
