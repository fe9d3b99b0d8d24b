"""`banger vm stats [REFS...] [--json]`: running VMs' guest CPU, memory, load and disks
(from each guest's agent) and what each VMM process costs the host.

The daemon samples each VM twice, ~0.5 s apart (for the CPU shares): several VMs are
asked at once, so the command takes about that long whatever their number. Mount points
are the guest's text: they reach the terminal through :func:`banger.cli.safe.printable`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from banger.cli.common import handle_errors
from banger.cli.complete import complete_vm

if TYPE_CHECKING:
    from rich.table import Table

    from banger.client.client import Client
    from banger.client.types import ErrorBody, VMStatsOut

MAX_PARALLEL = 8
STATS_COLUMNS = ("NAME", "CPU", "LOAD", "MEMORY", "DISK /", "VMM RSS", "VMM CPU")
FS_COLUMNS = ("NAME", "MOUNT", "SIZE", "USED", "AVAIL", "USE")


@click.command("stats")
@click.argument("refs", nargs=-1, shell_complete=complete_vm)
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", "-w", type=click.FloatRange(min=0.5), metavar="SECONDS",
              help="show them again every SECONDS until Ctrl-C")
@handle_errors
def vm_stats(refs: tuple[str, ...], as_json: bool, watch: float | None) -> None:
    """Show CPU, memory, load and disk use of running VMs (all of them without REFS),
    and their VMM processes' memory and CPU on the host."""
    from banger.cli.plain import print_json
    from banger.cli.render import out_console, print_error
    from banger.client.client import connect
    from banger.client.types import as_json as json_of

    client = connect()
    if watch is not None:
        if as_json:
            raise click.UsageError("--watch shows tables: it does not go with --json")
        _watch(client, refs, watch)
        return
    names = list(refs) or [v.name for v in client.list_vms() if v.state == "running"]
    results = _gather(client, names)
    found = [s for s, _ in results if s is not None]
    for _, error in results:
        if error is not None:
            print_error(error)
    if as_json:
        print_json(json_of(found))
    elif not names:
        print("no VM is running")
    elif found:
        out_console.print(stats_table(found))
        if any(s.guest.filesystems for s in found):
            out_console.print()
            out_console.print(fs_table(found))
    if len(found) < len(results):
        sys.exit(1)


def _watch(client: Client, refs: tuple[str, ...], every: float) -> None:
    """Redraw the tables every ``every`` seconds (a round's own ~0.5 s included) until
    Ctrl-C; without REFS, the VMs running at each round. Errors show under the tables."""
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from banger.cli.render import out_console
    from banger.cli.safe import printable

    with contextlib.suppress(KeyboardInterrupt), Live(console=out_console,
                                                      auto_refresh=False) as live:
        while True:
            started = time.monotonic()
            names = list(refs) or [v.name for v in client.list_vms() if v.state == "running"]
            results = _gather(client, names)
            found = [s for s, _ in results if s is not None]
            parts: list[Any] = [stats_table(found)] if found else [Text("no VM is running")]
            if any(s.guest.filesystems for s in found):
                parts += [Text(""), fs_table(found)]
            parts += [Text(printable(f"error: {e.message}"), style="red")
                      for _, e in results if e is not None]
            live.update(Group(*parts), refresh=True)
            pause(max(0.0, every - (time.monotonic() - started)))


def pause(seconds: float) -> None:
    """Between two rounds of --watch (a test ends the loop here)."""
    time.sleep(seconds)


def _gather(client: Client, refs: list[str]
            ) -> list[tuple[VMStatsOut | None, ErrorBody | None]]:
    """Each ref's stats or the daemon's error about it, in the order asked."""
    from concurrent.futures import ThreadPoolExecutor

    from banger.client.client import ApiError

    def one(ref: str) -> tuple[VMStatsOut | None, ErrorBody | None]:
        try:
            return client.stats(ref), None
        except ApiError as exc:
            return None, exc.body

    if not refs:
        return []
    with ThreadPoolExecutor(max_workers=min(MAX_PARALLEL, len(refs))) as pool:
        return list(pool.map(one, refs))


def size(n: int) -> str:
    """Bytes in binary units, one decimal: ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def percent(p: float | None) -> str:
    return "-" if p is None else f"{p:.1f}%"


def stats_rows(stats: list[VMStatsOut]) -> list[list[str]]:
    rows = []
    for s in stats:
        g = s.guest
        used = (g.mem_total_kib - g.mem_available_kib) * 1024
        root = next((f for f in g.filesystems if f.mountpoint == "/"), None)
        rows.append([
            s.vm, f"{percent(g.cpu_percent)} of {g.ncpu}",
            f"{g.load1:.2f} {g.load5:.2f} {g.load15:.2f}",
            f"{size(used)} / {size(g.mem_total_kib * 1024)}",
            "-" if root is None else f"{size(root.used_bytes)} / {size(root.size_bytes)}",
            "-" if s.vmm is None else size(s.vmm.rss_bytes),
            "-" if s.vmm is None else f"{percent(s.vmm.cpu_percent)} "
                                      f"({s.vmm.cpu_seconds:.1f} s)",
        ])
    return rows


def fs_rows(stats: list[VMStatsOut]) -> list[list[str]]:
    from banger.cli.safe import printable

    return [[s.vm, printable(f.mountpoint, one_line=True), size(f.size_bytes),
             size(f.used_bytes), size(f.avail_bytes),
             percent(f.used_bytes / f.size_bytes * 100 if f.size_bytes else None)]
            for s in stats for f in s.guest.filesystems]


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> Table:
    from rich.table import Table
    from rich.text import Text

    t = Table(box=None, pad_edge=False)
    for col in columns:
        t.add_column(col, no_wrap=True)
    for row in rows:
        t.add_row(*(Text(c) for c in row))
    return t


def stats_table(stats: list[VMStatsOut]) -> Table:
    return _table(STATS_COLUMNS, stats_rows(stats))


def fs_table(stats: list[VMStatsOut]) -> Table:
    return _table(FS_COLUMNS, fs_rows(stats))
