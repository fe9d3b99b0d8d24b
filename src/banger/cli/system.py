"""Commands about banger itself rather than one VM: `doctor`, `ops` (operations in
flight) and `completion` (the shell completion script)."""

from __future__ import annotations

import sys

import click

from banger.cli.common import handle_errors


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def doctor(as_json: bool) -> None:
    """Check what this host can do (tools, acceleration, state)."""
    from banger.cli.plain import print_json
    from banger.cli.render import out_console
    from banger.cli.safe import markup
    from banger.client.client import connect
    from banger.client.types import as_json as json_of

    d = connect().doctor()
    if as_json:
        print_json(json_of(d))
        return
    marks = {"pass": "[green]PASS[/green]", "warn": "[yellow]WARN[/yellow]",
             "fail": "[red]FAIL[/red]"}
    for c in d.checks:
        out_console.print(f"{marks[c.status]} {markup(c.name)}: {markup(c.detail)}",
                          soft_wrap=True)
    if any(c.status == "fail" for c in d.checks):
        sys.exit(1)


@click.command("ops")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def ops(as_json: bool) -> None:
    """List operations in flight."""
    from banger.cli.plain import print_json
    from banger.cli.safe import printable
    from banger.client.client import connect
    from banger.client.types import as_json as json_of

    items = connect().operations()
    if as_json:
        print_json(json_of(items))
        return
    for o in items:
        cancelling = " (cancelling)" if o.cancelled else ""
        print(printable(f"{o.id} {o.kind} {o.vm_name or '-'} stage={o.stage or '-'}"
                        f"{cancelling}", one_line=True))


PROG = "banger"
COMPLETE_VAR = "_BANGER_COMPLETE"  # click's name for `banger`: _{PROG}_COMPLETE


@click.command("completion")
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
@click.pass_context
def completion(ctx: click.Context, shell: str) -> None:
    """Print the shell completion script for SHELL. It completes commands, options and
    the names of your VMs (asking a running bangerd; it never starts one).

    \b
      bash:  echo 'eval "$(banger completion bash)"' >> ~/.bashrc
      zsh:   echo 'eval "$(banger completion zsh)"' >> ~/.zshrc
      fish:  banger completion fish > ~/.config/fish/completions/banger.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # the Choice above lists only shells click supports
    root = ctx.find_root().command
    sys.stdout.write(cls(root, {}, PROG, COMPLETE_VAR).source())
