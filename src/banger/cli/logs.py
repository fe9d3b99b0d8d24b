"""`banger vm logs [-f] [-n N] [--vmm] [--raw] REF`: the end of a VM's serial console (or
VMM) log, and with -f what the guest writes next, until the VM stops or Ctrl-C.

A guest writes what it likes on its console: it reaches the terminal through
:class:`banger.cli.safe.PrintableStream` (escapes shown as ``\\x1b``, chunk by chunk)
unless --raw, which writes the guest's bytes as they are (for a pipe).
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from banger.cli.common import handle_errors
from banger.cli.complete import complete_vm

if TYPE_CHECKING:
    from banger.client.client import Client


@click.command("logs")
@click.argument("ref", shell_complete=complete_vm)
@click.option("--follow", "-f", is_flag=True,
              help="go on printing what the VM writes, until it stops (or Ctrl-C)")
@click.option("--lines", "-n", type=click.IntRange(min=0), metavar="N",
              help="the last N lines first (default: the last 256 KiB)")
@click.option("--vmm", is_flag=True, help="the VMM's own log instead of the serial console")
@click.option("--raw", is_flag=True,
              help="the text as the guest wrote it, terminal escapes included (for a "
                   "pipe; a guest's escapes can rewrite your terminal and clipboard)")
@handle_errors
def vm_logs(ref: str, follow: bool, lines: int | None, vmm: bool, raw: bool) -> None:
    """Print the end of the serial console (or VMM) log, control characters shown
    escaped (`\\x1b`) unless --raw; with -f, follow it until the VM stops."""
    from banger.client.client import connect

    client = connect()
    if follow or lines is not None:
        try:
            _stream(client, ref, follow=follow, lines=lines, vmm=vmm, raw=raw)
        except BrokenPipeError:
            # `banger vm logs -f box | head`: the reader is done, as `tail -f` would be.
            # stdout goes to /dev/null so the interpreter's own flush at exit is quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(141)  # 128 + SIGPIPE, as a shell reports `tail -f` killed by it
        return
    from banger.cli.render import err_console
    from banger.cli.safe import printable

    logs = client.logs(ref)
    text = logs.vmm if vmm else logs.serial
    if not vmm and logs.serial_rotated:
        err_console.print(printable(f"(the serial log was rotated at its cap: older output "
                                    f"is in {logs.serial_rotated})"),
                          markup=False, highlight=False, soft_wrap=True)
    sys.stdout.write(text if raw else printable(text))


def _stream(client: Client, ref: str, *, follow: bool, lines: int | None, vmm: bool,
            raw: bool) -> None:
    import base64

    from banger.cli.safe import PrintableStream

    shown = PrintableStream()
    for ev in client.log_stream(ref, follow=follow, vmm=vmm, lines=lines):
        if ev.type == "data" and ev.data:
            chunk = base64.b64decode(ev.data)
            if raw:
                sys.stdout.buffer.write(chunk)
            else:
                sys.stdout.write(shown.feed(chunk))
            sys.stdout.flush()
        elif ev.type == "skipped":
            sys.stdout.flush()
            how_much = f"{ev.count} bytes" if ev.count is not None else "some output"
            print(f"(banger: {how_much} of the log rotated away before it could be shown: "
                  "the guest wrote faster than this terminal read)", file=sys.stderr)
        elif ev.type == "end":
            if not raw:
                sys.stdout.write(shown.feed(b"", final=True))
            sys.stdout.flush()
            if ev.reason == "daemon_stopping":
                print("banger: bangerd is stopping: the log is no longer followed; "
                      f"`banger vm logs -f {ref}` again once it is back", file=sys.stderr)
                sys.exit(1)
