"""Several VMs at once: one action over many refs (resolved once, de-duplicated, run
concurrently, each result reported), and prune (delete the VMs that are not running)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from banger.model.errors import BangerError, OperationFailed
from banger.model.vm import VM, VMState

if TYPE_CHECKING:
    from banger.core.service import VMService


@dataclass(frozen=True)
class BatchResult:
    ref: str
    vm: VM | None
    error: BangerError | None


def batch(svc: VMService, action: str, refs: Sequence[str],
          **kwargs: object) -> list[BatchResult]:
    """Resolve every ref once, de-duplicate, act concurrently, report each result."""
    fn: Callable[..., VM] = {
        "start": svc.start, "stop": svc.stop, "restart": svc.restart,
        "kill": svc.kill, "delete": svc.delete,
    }[action]
    resolved: list[tuple[str, VM | None, BangerError | None]] = []
    for ref in refs:
        try:
            resolved.append((ref, svc.resolve(ref), None))
        except BangerError as exc:
            resolved.append((ref, None, exc))
    unique: dict[str, VM] = {}
    for _, vm, _err in resolved:
        if vm is not None:
            unique.setdefault(vm.id, vm)
    outcomes: dict[str, tuple[VM | None, BangerError | None]] = {}

    def act(vm: VM) -> None:
        try:
            outcomes[vm.id] = (fn(vm.id, **kwargs), None)
        except BangerError as exc:
            outcomes[vm.id] = (None, exc)
        except Exception as exc:
            outcomes[vm.id] = (None, OperationFailed(f"{action} {vm.name}: {exc}"))

    if unique:
        with ThreadPoolExecutor(max_workers=min(8, len(unique))) as pool:
            list(pool.map(act, unique.values()))
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


def prune(svc: VMService, refs: Sequence[str] | None = None) -> list[BatchResult]:
    """Delete the VMs that are not running: of ``refs`` when given (the ones the user
    saw and confirmed; a VM that stopped since the question was asked is not among
    them), else of all."""
    doomed = list(refs) if refs is not None else [
        v.vm.id for v in svc.list_vms() if v.vm.state is not VMState.RUNNING]
    # A VM listed as starting (or stopped, in the middle of a restart) is checked
    # again under its lock: it is deleted only if it is still not running then.
    return batch(svc, "delete", doomed, only_idle=True)
