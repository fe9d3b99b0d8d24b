"""banger: thin commands over the daemon client; progress, tables, JSON and exit codes."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from banger import __version__
from banger.api.schema import VMOut, VMSet, WorkspaceIn
from banger.cli.common import (
    SplitAtDashDash,
    handle_errors,
    make_create,
    parse_size_mib,
    positive,
    pydantic_message,
    run_ssh,
    spec_options,
)
from banger.cli.interrupt import (
    Cancelling,
    cancellable,
    delete_quietly,
    raise_on_signal,
    streamed,
)
from banger.cli.render import (
    Progress,
    err_console,
    mib,
    out_console,
    ports_table,
    print_error,
    print_json,
    vm_detail,
    vm_table,
)
from banger.cli.safe import markup, printable
from banger.cli.workspace import vm_exec, vm_workspace
from banger.client.client import ApiError, connect

# ~/.ssh/config is the user's file, so the CLI, running as the user, edits it, never the daemon.
from banger.local import sshconfig
from banger.model.layout import Layout


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="banger")
def cli() -> None:
    """One-command development sandboxes on microVMs."""


@cli.group()
def vm() -> None:
    """Create, run and manage VMs."""


@vm.command("run", cls=SplitAtDashDash)
@spec_options
@click.option("--rm", "remove", is_flag=True, help="delete the VM when the command or session ends")
@click.option("-d", "--detach", is_flag=True, help="create and start, then exit")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output (with -d)")
@click.option("--dry-run", is_flag=True, help="list the files PATH would copy; create nothing")
@click.option("--include-untracked", is_flag=True,
              help="also copy untracked files that git does not ignore")
@click.option("--branch", help="create this guest-only branch in /root/repo")
@click.option("--from", "from_ref", help="start --branch from this ref")
@click.option("--no-bootstrap", is_flag=True,
              help="do not install the tools .mise.toml/.tool-versions pin (that needs --nat)")
@click.argument("path", required=False, type=click.Path(exists=True, file_okay=False,
                                                        path_type=Path))
@click.pass_context
@handle_errors
def vm_run(ctx: click.Context, name: str | None, image: str, vcpu: int, memory: str,
           disk: str, nat: bool, network: str | None, remove: bool, detach: bool,
           as_json: bool, dry_run: bool,
           include_untracked: bool, branch: str | None, from_ref: str | None,
           no_bootstrap: bool, path: Path | None) -> None:
    """Start a fresh VM, with PATH's git repo at /root/repo if given; run a command after
    `--` (its exit code is banger's) or open a shell there.

    \b
      banger vm run -- make test
      banger vm run ./repo -- make test
      banger vm run --rm -- cat /etc/os-release
    """
    command: tuple[str, ...] = ctx.meta.get("guest_command", ())
    if detach and remove:
        raise click.UsageError("-d/--detach and --rm do not go together")
    if detach and command:
        raise click.UsageError("-d/--detach and a command do not go together")
    if from_ref and not branch:
        raise click.UsageError("--from needs --branch")
    if path is None and (dry_run or include_untracked or branch or no_bootstrap):
        raise click.UsageError("--dry-run, --include-untracked, --branch and --no-bootstrap "
                               "need a PATH")
    req = make_create(name, image, vcpu, memory, disk, nat, network)
    if path is not None:
        req.workspace = WorkspaceIn(path=str(path.resolve()),
                                    include_untracked=include_untracked, branch=branch,
                                    from_ref=from_ref, bootstrap=not no_bootstrap)
    client = connect()
    if dry_run:
        assert req.workspace is not None
        # File names and symlink targets are the repo's choice.
        for line in client.workspace_dry_run(req.workspace):
            print(printable(line, one_line=True))
        return
    err_console.print(f"{req.vcpus} vcpu · {mib(req.memory_mib)} memory · "
                      f"{mib(req.disk_mib)} disk · image {markup(req.image)}", highlight=False)
    req.delete_on_disconnect = remove
    progress = Progress()
    state = Cancelling()
    made: VMOut | None = None
    # With --rm, from here to the end a signal raises Interrupted (never the default
    # SIGTERM/SIGHUP death between two phases), and whatever ends the command once the
    # boot's result is in (a signal, a closed stderr while printing) passes the delete.
    with raise_on_signal() if remove else contextlib.nullcontext():
        try:
            try:
                with cancellable(client, progress) as state:
                    made = vm = client.create(req, progress)
            except ApiError as exc:
                cancelled = exc.body.code == "cancelled"
                if remove and progress.vm:
                    # --rm leaves nothing, a failed start included (the error names the
                    # stage and carries the console's last lines); first: the terminal
                    # may be gone.
                    delete_quietly(client, progress.vm)
                print_error(exc.body)
                kept = markup(progress.vm or "", one_line=True)
                if progress.vm and remove:
                    err_console.print(f"the VM {kept} is deleted (--rm)")
                elif progress.vm and cancelled:
                    err_console.print(f"the VM {kept} is kept, stopped: "
                                      f"`banger vm start {kept}`, or `banger vm delete {kept}`")
                elif progress.vm and not cancelled:
                    err_console.print(f"the VM {kept} is kept so you can look: "
                                      f"`banger vm logs {kept}`, then "
                                      f"`banger vm delete {kept}`")
                sys.exit(state.exit_code or 1)
            if state.exit_code is not None:  # the boot finished as the cancel arrived
                sys.exit(state.exit_code)
            if not as_json:
                err_console.print(f"[green]{markup(vm.name)} ready[/green] in "
                                  f"{progress.elapsed():.1f}s")
            if detach:
                if as_json:
                    print_json(vm.model_dump())
                else:
                    print(printable(vm.name))
                return
            rc = run_ssh(client, vm.id, command, tty=not command and sys.stdin.isatty())
        finally:
            if remove and made is not None:
                delete_quietly(client, made.id)
    if not remove and not command:
        name = markup(vm.name)
        err_console.print(f"{name} is still running: `banger vm ssh {name}` to get back, "
                          f"`banger vm delete {name}` to remove it")
    sys.exit(rc)


@vm.command("create")
@spec_options
@click.option("--no-start", is_flag=True, help="create the record and disks later, at start")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_create(name: str | None, image: str, vcpu: int, memory: str, disk: str, nat: bool,
              network: str | None,
              no_start: bool, as_json: bool) -> None:
    """Create a VM (and start it unless --no-start)."""
    req = make_create(name, image, vcpu, memory, disk, nat, network, start=not no_start)
    client = connect()
    vm = streamed(client, lambda progress: client.create(req, progress))
    if as_json:
        print_json(vm.model_dump())
    else:
        print(printable(vm.name))


@vm.command("list")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_list(as_json: bool) -> None:
    """List VMs with their observed state."""
    vms = connect().list_vms()
    if as_json:
        print_json([v.model_dump() for v in vms])
    else:
        out_console.print(vm_table(vms))


vm.add_command(vm_list, "ps")


@vm.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_show(ref: str, as_json: bool) -> None:
    """Show one VM: spec, observed state, runtime, last error."""
    v = connect().show(ref)
    if as_json:
        print_json(v.model_dump())
    else:
        out_console.print(vm_detail(v))


def _report_batch(results: list[tuple[str, VMOut | None, Any]], verb: str,
                  as_json: bool) -> None:
    failed = False
    rows = []
    for ref, vm, error in results:
        if error is not None:
            failed = True
            print_error(error)
            rows.append({"ref": ref, "error": error.model_dump()})
        elif vm is not None:
            if not as_json:
                print(printable(f"{vm.name}: {verb}"))
            rows.append({"ref": ref, "vm": vm.model_dump()})
    if as_json:
        print_json(rows)
    if failed:
        sys.exit(1)


def _lifecycle(action: str, verb: str) -> Callable[..., None]:
    @click.argument("refs", nargs=-1, required=True)
    @click.option("--json", "as_json", is_flag=True)
    @handle_errors
    def command(refs: tuple[str, ...], as_json: bool) -> None:
        client = connect()
        if len(refs) == 1 and action in ("start", "restart") and not as_json:
            fn = client.start if action == "start" else client.restart
            v = streamed(client, lambda progress: fn(refs[0], progress))
            print(printable(f"{v.name}: {verb}"))
            return
        res = client.batch(action, list(refs))
        _report_batch([(r.ref, r.vm, r.error) for r in res.results], verb, as_json)
    command.__doc__ = f"{action.capitalize()} one or more VMs."
    return command


for _action, _verb in (("start", "running"), ("stop", "stopped"), ("restart", "running"),
                       ("delete", "deleted")):
    vm.command(_action)(_lifecycle(_action, _verb))


@vm.command("kill")
@click.argument("refs", nargs=-1, required=True)
@click.option("--signal", "-s", "sig", default="KILL", show_default=True,
              help="signal for the VMM process (name or number)")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_kill(refs: tuple[str, ...], sig: str, as_json: bool) -> None:
    """Kill the VMM of one or more VMs (they end stopped, disks kept)."""
    import signal as signals
    try:
        num = int(sig) if sig.isdigit() else int(getattr(signals, "SIG" + sig.upper().removeprefix(
            "SIG")))
    except (AttributeError, ValueError) as exc:
        raise click.BadParameter(f"unknown signal {sig!r}", param_hint="--signal") from exc
    res = connect().batch("kill", list(refs), signal=num)
    _report_batch([(r.ref, r.vm, r.error) for r in res.results], "killed", as_json)


@vm.command("set")
@click.argument("ref")
@click.option("--vcpu", type=int, callback=positive)
@click.option("--memory")
@click.option("--disk-size", "disk")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_set(ref: str, vcpu: int | None, memory: str | None, disk: str | None,
           as_json: bool) -> None:
    """Change a stopped VM's spec; applies at its next start."""
    if vcpu is None and memory is None and disk is None:
        raise click.UsageError("nothing to set: give --vcpu, --memory or --disk-size")
    try:
        req = VMSet(vcpus=vcpu,
                    memory_mib=parse_size_mib(memory, "--memory") if memory else None,
                    disk_mib=parse_size_mib(disk, "--disk-size") if disk else None)
    except ValidationError as exc:
        raise click.UsageError(pydantic_message(exc)) from exc
    v = connect().set(ref, req)
    if as_json:
        print_json(v.model_dump())
    else:
        print(printable(f"{v.name}: {v.vcpus} vcpu, {mib(v.memory_mib)} memory (applies at "
                        "next start)"))


@vm.command("prune")
@click.option("-f", "--force", is_flag=True, help="do not ask")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_prune(force: bool, as_json: bool) -> None:
    """Delete every VM that is not running."""
    client = connect()
    listed = [v for v in client.list_vms() if v.state != "running"]
    doomed = [v.name for v in listed]
    if not doomed:
        if as_json:
            print_json([])
        else:
            print("nothing to prune")
        return
    if not force and not click.confirm(printable(f"delete {', '.join(doomed)}?"), err=True):
        sys.exit(1)
    # Exactly these (by id), not whatever is not running once the user has answered.
    res = client.prune([v.id for v in listed])
    _report_batch([(r.ref, r.vm, r.error) for r in res.results], "deleted", as_json)


@vm.command("logs")
@click.argument("ref")
@click.option("--vmm", is_flag=True, help="the VMM's own log instead of the serial console")
@click.option("--raw", is_flag=True,
              help="the text as the guest wrote it, terminal escapes included (for a "
                   "pipe; a guest's escapes can rewrite your terminal and clipboard)")
@handle_errors
def vm_logs(ref: str, vmm: bool, raw: bool) -> None:
    """Print the end of the serial console (or VMM) log, control characters shown
    escaped (`\\x1b`) unless --raw."""
    logs = connect().logs(ref)
    text = logs.vmm if vmm else logs.serial
    if not vmm and logs.serial_rotated:
        err_console.print(printable(f"(the serial log was rotated at its cap: older output "
                                    f"is in {logs.serial_rotated})"),
                          markup=False, highlight=False, soft_wrap=True)
    sys.stdout.write(text if raw else printable(text))


@vm.command("ports")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_ports(ref: str, as_json: bool) -> None:
    """List the running guest's listening TCP and UDP sockets and where the host reaches
    each one."""
    res = connect().ports(ref)
    if as_json:
        print_json([p.model_dump() for p in res.ports])
    elif not res.ports:
        print(printable(f"{res.vm}: nothing is listening"))
    else:
        out_console.print(ports_table(res.ports))


@vm.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("ref")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@handle_errors
def vm_ssh(ref: str, command: tuple[str, ...]) -> None:
    """Open a shell in a running VM, or run COMMAND there (its exit code is banger's)."""
    sys.exit(run_ssh(connect(), ref, command, tty=not command and sys.stdin.isatty()))


vm.add_command(vm_exec)
vm.add_command(vm_workspace)


@cli.command("doctor")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def doctor(as_json: bool) -> None:
    """Check what this host can do (tools, acceleration, state)."""
    d = connect().doctor()
    if as_json:
        print_json(d.model_dump())
        return
    marks = {"pass": "[green]PASS[/green]", "warn": "[yellow]WARN[/yellow]",
             "fail": "[red]FAIL[/red]"}
    for c in d.checks:
        out_console.print(f"{marks[c.status]} {markup(c.name)}: {markup(c.detail)}",
                          soft_wrap=True)
    if any(c.status == "fail" for c in d.checks):
        sys.exit(1)


@cli.command("ssh-config")
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
        changed = (sshconfig.install(user_config, path) if install
                   else sshconfig.uninstall(user_config) if uninstall else False)
        installed = sshconfig.is_installed(user_config, path)
    except (sshconfig.SshConfigError, ValueError, OSError) as exc:
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


@cli.command("ops")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def ops(as_json: bool) -> None:
    """List operations in flight."""
    items = connect().operations()
    if as_json:
        print_json([o.model_dump() for o in items])
        return
    for o in items:
        cancelling = " (cancelling)" if o.cancelled else ""
        print(printable(f"{o.id} {o.kind} {o.vm_name or '-'} stage={o.stage or '-'}"
                        f"{cancelling}", one_line=True))


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
