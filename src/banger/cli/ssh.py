"""`banger vm ssh` (a shell or command in a running VM) and `banger ssh-config` (banger's
ssh_config, and its Include in the user's ~/.ssh/config)."""

from __future__ import annotations

import sys

import click

from banger.cli.common import handle_errors
from banger.cli.complete import complete_vm


@click.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("ref", shell_complete=complete_vm)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def vm_ssh(ref: str, command: tuple[str, ...]) -> None:
    """Open a shell in a running VM, or run COMMAND there (its exit code is banger's)."""
    from banger.cli.common import run_ssh
    from banger.client.client import connect

    sys.exit(run_ssh(connect(), ref, command, tty=not command and sys.stdin.isatty()))


@click.command("ssh-config")
@click.option("--install", is_flag=True,
              help="add one Include of banger's ssh_config to ~/.ssh/config")
@click.option("--uninstall", is_flag=True, help="remove that Include again")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def ssh_config(install: bool, uninstall: bool, as_json: bool) -> None:
    """banger's ssh_config: with it installed, `ssh <name>.vm` (and scp, rsync, editors'
    remote mode) reaches every running VM with banger's key and pinned host keys.

    Without options: where it is and whether ~/.ssh/config includes it. --install adds a
    marker-fenced Include block at the top of ~/.ssh/config and changes nothing else in
    it; --uninstall removes exactly that block.
    """
    # ~/.ssh/config is the user's file, so the CLI, running as the user, edits it, never
    # the daemon.
    from pathlib import Path

    from banger.cli.plain import print_json
    from banger.cli.render import err_console
    from banger.cli.safe import markup, printable
    from banger.cli.userssh import install as install_include
    from banger.cli.userssh import uninstall as uninstall_include
    from banger.client.client import connect
    from banger.local.sshconfig import SshConfigError, is_installed
    from banger.model.layout import Layout

    if install and uninstall:
        raise click.UsageError("--install and --uninstall do not go together")
    user_config = Path.home() / ".ssh" / "config"
    if uninstall:
        # Needs no daemon: the block is found by its markers, wherever it points.
        path, hosts = Layout.for_user().ssh_config, None
    else:
        # Through the daemon: it owns the file and has written it once it answers, so the
        # Include never points at nothing.
        current = connect().ssh_config()
        path = Path(current.path)
        hosts = [line.split()[1] for line in current.text.splitlines()
                 if line.startswith("Host ") and "*" not in line]
    try:
        changed = (install_include(user_config, path) if install
                   else uninstall_include(user_config) if uninstall else False)
        installed = is_installed(user_config, path)
    except (SshConfigError, ValueError, OSError) as exc:
        err_console.print(f"[red]error:[/red] {markup(str(exc))}", soft_wrap=True)
        sys.exit(1)
    if as_json:
        print_json({"path": str(path), "user_config": str(user_config),
                    "installed": installed, "changed": changed, "hosts": hosts})
        return
    if install:
        print(printable(f"added an Include of {path} to {user_config}" if changed
                        else f"already installed in {user_config}"))
    elif uninstall:
        print(f"removed banger's Include from {user_config}" if changed
              else f"not installed in {user_config}: nothing to remove")
    else:
        print(printable(f"banger's ssh_config: {path}"))
        print(f"installed in {user_config}" if installed
              else f"not installed in {user_config}: `banger ssh-config --install` adds one "
                   "Include block (`--uninstall` removes it)")
    if hosts is not None and installed:
        print(printable("reachable now: " + ", ".join(f"ssh {h}" for h in hosts)) if hosts
              else "no VM running: `ssh <name>.vm` works for each VM while it runs")
