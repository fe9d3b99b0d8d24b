"""The workspace port on this host: repos read with git (banger.host.workspace) and staged
as a real checkout (banger.host.repostage), in RAM where there is room."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from banger.host import repostage, workspace
from banger.host.scratch import Scratch
from banger.model.errors import InvalidRequest
from banger.ports import WorkspaceRequest, WorkspaceSelection


class LocalWorkspace:
    """Host repos read with git (banger.host.workspace) and staged as a real checkout
    (banger.host.repostage)."""

    def __init__(self, scratch: Scratch | None = None) -> None:
        self._scratch = scratch  # None: no RAM staging (the VM's directory only)
        self._ram_lock = threading.Lock()

    def select(self, req: WorkspaceRequest) -> WorkspaceSelection:
        try:
            sel = workspace.select(req.path, include_untracked=req.include_untracked)
        except workspace.WorkspaceError as exc:
            raise InvalidRequest(str(exc)) from exc
        if req.from_ref is not None and req.branch is None:
            raise InvalidRequest("--from needs --branch: name the guest-only branch to create")
        return WorkspaceSelection(request=req, repo=sel.repo, files=len(sel.files),
                                  total_bytes=sel.total_bytes, handle=sel,
                                  tool_files=workspace.tool_files(sel), head=sel.head)

    def dry_run(self, req: WorkspaceRequest) -> list[str]:
        sel = self.select(req).handle
        assert isinstance(sel, workspace.Selection)
        return workspace.dry_run_lines(sel)

    @contextlib.contextmanager
    def staged(self, sel: WorkspaceSelection, scratch: Path) -> Iterator[Path]:
        handle = sel.handle
        assert isinstance(handle, workspace.Selection)
        with self._ram_lock:
            ram = self._scratch.ram() if self._scratch is not None else None
            parent = repostage.staging_parent(handle, scratch, ram, sel.request.from_ref)
            tmp = Path(tempfile.mkdtemp(prefix=".workspace-", dir=parent))
        try:
            tree = tmp / "repo"
            try:
                repostage.stage(handle, tree, branch=sel.request.branch,
                                from_ref=sel.request.from_ref)
            except workspace.WorkspaceError as exc:
                raise InvalidRequest(str(exc)) from exc
            yield tree
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            # No idle directory left in /dev/shm (only removed when no other staging is in).
            if self._scratch is not None:
                with self._ram_lock, contextlib.suppress(OSError):
                    self._scratch.ram_dir.rmdir()
