"""banger's root command: the nouns (`vm`, `ssh-config`, `doctor`, `ops`, `completion`)
come from their modules; `main()` is the console script.

Every command module imports only click at load time (the client, rich and the
renderers load when a command runs), so `banger --version`, `--help` and a Tab's
completion cost little more than click itself; bench/cli_latency.py measures it and
tests/unit/test_cli_imports.py keeps it so.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

import click

from banger import __version__
from banger.cli.cp import vm_cp
from banger.cli.image import image
from banger.cli.logs import vm_logs
from banger.cli.ssh import ssh_config, vm_ssh
from banger.cli.stats import vm_stats
from banger.cli.system import COMPLETE_VAR, completion, doctor, ops
from banger.cli.vm import vm
from banger.cli.workspace import vm_exec, vm_workspace


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="banger")
def cli() -> None:
    """One-command development sandboxes on microVMs."""


cli.add_command(vm)
cli.add_command(image)
vm.add_command(vm_ssh)
vm.add_command(vm_exec)
vm.add_command(vm_workspace)
vm.add_command(vm_stats)
vm.add_command(vm_logs)
vm.add_command(vm_cp)
cli.add_command(doctor)
cli.add_command(ssh_config)
cli.add_command(ops)
cli.add_command(completion)


def main() -> None:
    try:
        # The completion variable is banger's whatever the program is called
        # (`python -m banger.cli.main` would otherwise read _MAIN.PY_COMPLETE).
        cli.main(complete_var=COMPLETE_VAR)
    except SystemExit as exc:
        exit_now(exc.code)
    exit_now(0)


def exit_now(code: object) -> NoReturn:
    """End the process without Python's finalization: tearing down the modules a command
    loaded took 40-90 ms after every `vm run` here, on the user's clock. Everything a
    command leaves is written by the time it returns (its files closed, its deletes
    answered), so only the standard streams are flushed. ``code`` as for SystemExit."""
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        if sys.stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                print(code, file=sys.stderr)
        status = 1
    # A stream closed before the start is None here (`banger ... >&-`): nothing to flush.
    if sys.stdout is not None:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            status = status or 120  # what Python exits with when its final flush fails
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
    os._exit(status & 0xFF)


if __name__ == "__main__":
    main()
