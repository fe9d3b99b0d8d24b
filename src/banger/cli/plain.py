"""Output that needs no rich: JSON, sizes, and the VM table as plain text for a pipe.

`banger vm list` in a script or a shell loop writes to a pipe, where rich draws its table
without colour or style: columns padded to their widest cell, two spaces apart. For
printable ASCII (one terminal column per character, as rich counts them) that text is
made here, without loading rich (half of the command's time); anything else, and every
terminal, goes to rich (:mod:`banger.cli.render`). tests/unit/test_cli_plain.py checks
the two give the same bytes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from banger.cli.safe import cell_text

if TYPE_CHECKING:
    from banger.client.types import VMOut

PIPE_WIDTH = 10_000  # the width rich is given for a pipe (render.out_console)
VM_COLUMNS = ("ID", "NAME", "STATE", "IMAGE", "IP", "VCPU", "MEM", "DISK", "SSH", "CREATED")
_ASCII = re.compile(r"[\x20-\x7e]*")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def mib(n: int) -> str:
    return f"{n // 1024} GiB" if n % 1024 == 0 else f"{n} MiB"


def vm_rows(vms: list[VMOut]) -> list[list[str]]:
    """The cells of `banger vm list`, one row per VM, in VM_COLUMNS order."""
    rows = []
    for v in vms:
        ssh = (f"{v.runtime.ssh_host}:{v.runtime.ssh_port}" if v.runtime and v.runtime.ssh_port
               else "-")
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created_at))
        rows.append([cell_text(x) for x in (v.id, v.name, v.state, v.image, v.guest_ip,
                                            str(v.vcpus), mib(v.memory_mib),
                                            mib(v.disk_mib), ssh, created)])
    return rows


def to_pipe() -> bool:
    """Whether rich would see stdout as no terminal (its own test, without rich)."""
    if "TTY_COMPATIBLE" in os.environ or "FORCE_COLOR" in os.environ:
        return False  # rich's overrides: let rich decide
    isatty = getattr(sys.stdout, "isatty", None)
    return isatty is not None and not isatty()


def plain_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str | None:
    """What rich prints for ``Table(box=None, pad_edge=False)`` of no-wrap columns on a
    console that is no terminal, or None when rich must draw it (a cell that is not
    printable ASCII, or a table wider than the pipe's width)."""
    table = [list(header), *(list(r) for r in rows)]
    if not all(_ASCII.fullmatch(c) for r in table for c in r):
        return None
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    if sum(widths) + 2 * (len(widths) - 1) > PIPE_WIDTH:
        return None
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + "\n"
                   for r in table)
