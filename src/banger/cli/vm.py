"""`banger vm ...`: create, run and manage VMs (run, create, list, show, the lifecycle
verbs, kill, set, prune, ports); `vm ssh`, `vm exec`, `vm workspace` and `vm logs` join the
group from their own modules.

Only click is imported at load time: the client, rich and the renderers are imported by
the command that runs, so `banger --help` and completion stay cheap.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from banger.cli.common import (
    SplitAtDashDash,
    handle_errors,
    make_create,
    parse_size_mib,
    spec_options,
    usage_error,
)
from banger.cli.complete import complete_vm

if TYPE_CHECKING:
    from banger.client.types import ErrorBody, SetBody, VMOut


@click.group()
def vm() -> None:
    """Create, run and manage VMs."""


VM_REF = click.argument("ref", shell_complete=complete_vm)
VM_REFS = click.argument("refs", nargs=-1, required=True, shell_complete=complete_vm)


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
                                                        path_type=str))
@click.pass_context
@handle_errors
def vm_run(ctx: click.Context, name: str | None, image: str, vcpu: int, memory: str,
           disk: str, nat: bool, network: str | None, kernel: str, remove: bool, detach: bool,
           as_json: bool, dry_run: bool,
           include_untracked: bool, branch: str | None, from_ref: str | None,
           no_bootstrap: bool, path: str | None) -> None:
    """Start a fresh VM, with PATH's git repo at /root/repo if given; run a command after
    `--` (its exit code is banger's) or open a shell there.

    \b
      banger vm run -- make test
      banger vm run ./repo -- make test
      banger vm run --rm -- cat /etc/os-release
    """
    from banger.client.client import ApiError, connect

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
    req = make_create(name, image, vcpu, memory, disk, nat, network, kernel=kernel)
    if path is not None:
        req["workspace"] = {"path": os.path.realpath(path), "include_untracked": include_untracked,
                            "branch": branch, "from_ref": from_ref,
                            "bootstrap": not no_bootstrap}
    client = connect()
    if dry_run:
        assert req["workspace"] is not None
        try:
            lines = client.workspace_dry_run(req["workspace"])
        except ApiError as exc:
            raise usage_error(exc, req) or exc from exc
        from banger.cli.safe import printable

        # File names and symlink targets are the repo's choice.
        for line in lines:
            print(printable(line, one_line=True))
        return
    req["delete_on_disconnect"] = remove
    # Sent before the imports below (rich alone is ~70 ms): the daemon starts the VM
    # meanwhile. A CLI that dies before reading closes the stream, which the daemon
    # takes as its client gone (with --rm: the VM is deleted).
    pending = client.begin_create(req)
    try:
        from banger.cli.common import run_ssh
        from banger.cli.guestexec import run_in_guest
        from banger.cli.interrupt import (
            Cancelling,
            cancellable,
            delete_quietly,
            raise_on_signal,
        )
        from banger.cli.plain import mib, print_json
        from banger.cli.render import Progress, err_console, print_error
        from banger.cli.safe import markup, printable
        from banger.client import execws  # noqa: F401  loaded now, not after the boot
        from banger.client.types import as_json as json_of

        err_console.print(f"{req['vcpus']} vcpu · {mib(req['memory_mib'])} memory · "
                          f"{mib(req['disk_mib'])} disk · image {markup(req['image'])}",
                          highlight=False)
    except BaseException:
        pending.close()
        raise
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
                    made = vm = pending.result(progress)
            except ApiError as exc:
                refused = usage_error(exc, req)
                if refused is not None:
                    raise refused from exc
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
                    print_json(json_of(vm))
                else:
                    print(printable(vm.name))
                return
            if command:  # through the guest agent: no ssh for a command
                rc = run_in_guest(client, vm.id, command, cwd=vm.workspace_guest_path)
            else:  # a shell for a person: ssh
                rc = run_ssh(client, vm.id, (), tty=sys.stdin.isatty())
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
              network: str | None, kernel: str,
              no_start: bool, as_json: bool) -> None:
    """Create a VM (and start it unless --no-start)."""
    from banger.cli.interrupt import streamed
    from banger.cli.plain import print_json
    from banger.cli.safe import printable
    from banger.client.client import connect
    from banger.client.types import as_json as json_of

    req = make_create(name, image, vcpu, memory, disk, nat, network, start=not no_start,
                      kernel=kernel)
    client = connect()
    vm = streamed(client, lambda progress: client.create(req, progress),
                  refused=lambda exc: usage_error(exc, req))
    if as_json:
        print_json(json_of(vm))
    else:
        print(printable(vm.name))


@vm.command("list")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_list(as_json: bool) -> None:
    """List VMs with their observed state."""
    from banger.client.client import connect

    vms = connect().list_vms()
    if as_json:
        from banger.cli.plain import print_json
        from banger.client.types import as_json as json_of
        print_json(json_of(vms))
        return
    from banger.cli.plain import VM_COLUMNS, plain_table, to_pipe, vm_rows
    text = plain_table(VM_COLUMNS, vm_rows(vms)) if to_pipe() else None
    if text is not None:
        sys.stdout.write(text)  # what rich prints to a pipe, without loading rich
    else:
        from banger.cli.render import out_console, vm_table
        out_console.print(vm_table(vms))


vm.add_command(vm_list, "ps")


@vm.command("show")
@VM_REF
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_show(ref: str, as_json: bool) -> None:
    """Show one VM: spec, observed state, runtime, last error."""
    from banger.cli.plain import print_json
    from banger.cli.render import out_console, vm_detail
    from banger.client.client import connect
    from banger.client.types import as_json as json_of

    v = connect().show(ref)
    if as_json:
        print_json(json_of(v))
    else:
        out_console.print(vm_detail(v))


def _report_batch(results: list[tuple[str, VMOut | None, ErrorBody | None]], verb: str,
                  as_json: bool) -> None:
    from banger.cli.plain import print_json
    from banger.cli.render import print_error
    from banger.cli.safe import printable
    from banger.client.types import as_json as json_of

    failed = False
    rows = []
    for ref, vm, error in results:
        if error is not None:
            failed = True
            print_error(error)
            rows.append({"ref": ref, "error": json_of(error)})
        elif vm is not None:
            if not as_json:
                print(printable(f"{vm.name}: {verb}"))
            rows.append({"ref": ref, "vm": json_of(vm)})
    if as_json:
        print_json(rows)
    if failed:
        sys.exit(1)


def _lifecycle(action: str, verb: str) -> Callable[..., None]:
    @VM_REFS
    @click.option("--json", "as_json", is_flag=True)
    @handle_errors
    def command(refs: tuple[str, ...], as_json: bool) -> None:
        from banger.cli.interrupt import streamed
        from banger.cli.safe import printable
        from banger.client.client import connect

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
@VM_REFS
@click.option("--signal", "-s", "sig", default="KILL", show_default=True,
              help="signal for the VMM process (name or number)")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_kill(refs: tuple[str, ...], sig: str, as_json: bool) -> None:
    """Kill the VMM of one or more VMs (they end stopped, disks kept)."""
    import signal as signals

    from banger.client.client import connect
    try:
        num = int(sig) if sig.isdigit() else int(getattr(signals, "SIG" + sig.upper().removeprefix(
            "SIG")))
    except (AttributeError, ValueError) as exc:
        raise click.BadParameter(f"unknown signal {sig!r}", param_hint="--signal") from exc
    res = connect().batch("kill", list(refs), signal=num)
    _report_batch([(r.ref, r.vm, r.error) for r in res.results], "killed", as_json)


@vm.command("set")
@VM_REF
@click.option("--vcpu", type=int)
@click.option("--memory")
@click.option("--disk-size", "disk")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_set(ref: str, vcpu: int | None, memory: str | None, disk: str | None,
           as_json: bool) -> None:
    """Change a stopped VM's spec; applies at its next start."""
    from banger.cli.plain import mib, print_json
    from banger.cli.safe import printable
    from banger.client.client import ApiError, connect
    from banger.client.types import as_json as json_of

    if vcpu is None and memory is None and disk is None:
        raise click.UsageError("nothing to set: give --vcpu, --memory or --disk-size")
    req: SetBody = {}
    if vcpu is not None:
        req["vcpus"] = vcpu
    if memory:
        req["memory_mib"] = parse_size_mib(memory, "--memory")
    if disk:
        req["disk_mib"] = parse_size_mib(disk, "--disk-size")
    try:
        v = connect().set(ref, req)
    except ApiError as exc:
        raise usage_error(exc, req) or exc from exc
    if as_json:
        print_json(json_of(v))
    else:
        print(printable(f"{v.name}: {v.vcpus} vcpu, {mib(v.memory_mib)} memory (applies at "
                        "next start)"))


@vm.command("prune")
@click.option("-f", "--force", is_flag=True, help="do not ask")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_prune(force: bool, as_json: bool) -> None:
    """Delete every VM that is not running."""
    from banger.cli.plain import print_json
    from banger.cli.safe import printable
    from banger.client.client import connect

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


@vm.command("ports")
@VM_REF
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def vm_ports(ref: str, as_json: bool) -> None:
    """List the running guest's listening TCP and UDP sockets and where the host reaches
    each one."""
    from banger.cli.plain import print_json
    from banger.cli.render import out_console, ports_table
    from banger.cli.safe import printable
    from banger.client.client import connect
    from banger.client.types import as_json as json_of

    res = connect().ports(ref)
    if as_json:
        print_json(json_of(res.ports))
    elif not res.ports:
        print(printable(f"{res.vm}: nothing is listening"))
    else:
        out_console.print(ports_table(res.ports))
