"""Rendering for the CLI: live per-stage progress, tables, JSON, and error lines.

Every string from the daemon may carry what a guest or a repo chose: it reaches rich as
:class:`~rich.text.Text` or through :func:`banger.cli.safe.markup`, never as markup.
"""

from __future__ import annotations

import sys
import time
from typing import Any, assert_never

from rich.console import Console
from rich.table import Table
from rich.text import Text

from banger.cli.plain import PIPE_WIDTH, VM_COLUMNS, mib, vm_rows
from banger.cli.safe import cell, markup, printable
from banger.client.types import ErrorBody, GuestPortOut, ProgressEvent, VMOut

# emoji=False: a guest's ":smile:" stays the text it is (and rich's 36 ms table of emoji
# codes is never loaded).
err_console = Console(stderr=True, highlight=False, emoji=False)
out_console = Console(highlight=False, emoji=False)
if not out_console.is_terminal:
    # Piped output is for grep and awk: never truncate or wrap a row to 80 columns.
    out_console = Console(highlight=False, width=PIPE_WIDTH, emoji=False)


class Progress:
    """Per-stage progress on stderr: a spinner on a TTY, plain lines otherwise."""

    def __init__(self, *, quiet: bool = False) -> None:
        self.quiet = quiet
        self.tty = err_console.is_terminal
        self.started = time.monotonic()
        self._status: Any = None
        self.vm: str | None = None  # the VM the events are about, once one arrives
        self.op_id: str | None = None  # the operation, once the daemon named it (cancel)

    def __enter__(self) -> Progress:
        if self.tty and not self.quiet:
            self._status = err_console.status("contacting bangerd")
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)

    def __call__(self, ev: ProgressEvent) -> None:
        self.vm = ev.vm or self.vm
        self.op_id = ev.op_id or self.op_id
        if self.quiet:
            return
        label = markup(ev.label or ev.stage or "", one_line=True)
        stage = markup(ev.stage or "", one_line=True)
        message = markup(ev.message or "")
        took = f" ({ev.elapsed:.2f}s)" if ev.elapsed is not None else ""
        # Every kind of banger.model.events, or mypy fails at assert_never.
        match ev.kind:
            case "run":
                if self._status is not None:
                    self._status.update(f"{label} [dim]({stage})[/dim]")
                else:
                    self._line(f"… {stage}: {label}")
            case "ok":
                self._line(f"[green]✓[/green] {stage}{took}")
            case "failed":
                self._line(f"[red]✗[/red] {stage}{took}: {message}")
            case "undo":
                self._line(f"↺ rolling back {stage}")
            case "undo_failed":
                self._line(f"[red]✗[/red] rollback of {stage} failed: {message}")
            case "queued":
                if self._status is not None:
                    self._status.update(f"queued: {label}")
                else:
                    self._line(f"… queued: {label}")
            case "detail":
                self._line(f"  {stage}: {message}")
            case "undone" | None:
                pass  # a rollback step that worked is not news: only the failures are
            case _:
                assert_never(ev.kind)

    def _line(self, text: str) -> None:
        if self.tty:
            err_console.print(text)
        else:
            print(Console(no_color=True).render_str(text).plain, file=sys.stderr, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def print_error(body: ErrorBody) -> None:
    where = []
    if body.stage:
        where.append(f"stage {body.stage}")
    if body.op_id:
        where.append(f"operation {body.op_id}")
    suffix = f" ({', '.join(where)})" if where else ""
    err_console.print(f"[red]error:[/red] {markup(body.message + suffix)}", soft_wrap=True)


def vm_table(vms: list[VMOut]) -> Table:
    t = Table(box=None, pad_edge=False)
    for col in VM_COLUMNS:
        t.add_column(col, no_wrap=True)
    for row in vm_rows(vms):
        t.add_row(*(Text(c) for c in row))
    return t


def vm_detail(v: VMOut) -> Table:
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    rows: list[tuple[str, str]] = [
        ("id", v.id), ("name", v.name), ("state", v.state), ("image", v.image),
        ("vcpus", str(v.vcpus)), ("memory", mib(v.memory_mib)), ("disk", mib(v.disk_mib)),
        ("network", v.network + (" (nat)" if v.nat else "")
         + (f": {v.guest_ip}, {v.name}.vm" if v.guest_ip else "")),
        ("kernel", v.kernel),
        ("dir", v.dir), ("serial log", v.serial_log),
    ]
    if v.workspace_path:
        rows.append(("workspace", f"{v.workspace_path} -> {v.workspace_guest_path}"))
    if v.runtime:
        rows += [("vmm", f"{v.runtime.vmm} pid {v.runtime.pid}"),
                 ("accel", f"{v.runtime.accel} ({v.runtime.accel_reason})"),
                 ("ssh", f"{v.runtime.ssh_host}:{v.runtime.ssh_port}"),
                 ("boot id", v.runtime.boot_id)]
        if v.runtime.tap:
            rows.append(("tap", v.runtime.tap))
    if v.last_error:
        rows.append(("last error", f"{v.last_error} (stage {v.last_error_stage}, "
                                   f"operation {v.last_op_id})"))
    for k, val in rows:
        t.add_row(k, Text(printable(val)))
    return t


def ports_table(ports: list[GuestPortOut]) -> Table:
    t = Table(box=None, pad_edge=False)
    for col in ("PROTO", "ADDRESS", "PORT", "PROCESS", "ENDPOINT"):
        t.add_column(col, no_wrap=True)
    for p in ports:
        where = cell(p.endpoint)
        if p.note:
            where.append(f" ({printable(p.note, one_line=True)})", style="dim")
        t.add_row(cell(p.proto), cell(p.address), str(p.port), cell(p.process), where)
    return t
