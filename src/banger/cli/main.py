"""banger: thin commands over the daemon client; progress, tables, JSON and exit codes."""

from __future__ import annotations

import contextlib
import functools
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from banger import __version__
from banger.api.schema import VMCreate, VMOut, VMSet, WorkspaceIn
from banger.cli.interrupt import (
    Cancelling,
    Interrupted,
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
from banger.cli.safe import markup, printable, relay_printable
from banger.client.client import ApiError, Client, DaemonUnavailable, connect
from banger.client.peer import Untrusted

# The one host module the CLI may use (an explicit, linted exception): ~/.ssh/config is the
# user's file, so the CLI, running as the user, edits it, never the daemon.
from banger.local import sshconfig
from banger.model.layout import Layout
from banger.model.vm import InvalidSpec, VMSpec

F = TypeVar("F", bound=Callable[..., Any])
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiError as exc:
            print_error(exc.body)
            sys.exit(1)
        except (DaemonUnavailable, Untrusted) as exc:
            err_console.print(f"[red]error:[/red] {markup(str(exc))}")
            sys.exit(1)
        except Interrupted as exc:
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            sys.exit(130)
    return wrapper  # type: ignore[return-value]


def parse_size_mib(value: str, flag: str) -> int:
    m = re.fullmatch(r"\s*(-?\d+)\s*([mMgG](?:i?[bB])?)?\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r}: use a number of MiB or a size like 512M or 2G",
                                 param_hint=flag)
    n = int(m.group(1))
    if m.group(2) and m.group(2)[0] in "gG":
        n *= 1024
    if n <= 0:
        raise click.BadParameter(f"{value!r}: must be positive", param_hint=flag)
    return n


def _pydantic_message(exc: ValidationError) -> str:
    flags = {"vcpus": "--vcpu", "memory_mib": "--memory", "disk_mib": "--disk-size"}
    return "; ".join(f"{flags.get(str(e['loc'][-1]), e['loc'][-1])}: {e['msg']}"
                     for e in exc.errors())


def positive(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise click.BadParameter(f"{value}: must be at least 1")
    return value


def check_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _NAME.match(value):
        raise click.BadParameter(
            f"{value!r} is not a DNS label: 1-63 characters of a-z, 0-9 and '-', starting and "
            "ending with a letter or digit")
    return value


def spec_options(fn: F) -> F:
    fn = click.option("--nat", is_flag=True, help="give the guest outbound network access")(fn)
    fn = click.option("--network", type=click.Choice(["user", "tap"]), default=None,
                      help="user: rootless, ssh through a forwarded loopback port; tap: a "
                           "bridge, its own address and <name>.vm (needs a root daemon). "
                           "Default: [network] mode in config, else user")(fn)
    fn = click.option("--disk-size", "disk", default="4G", show_default=True,
                      help="work disk size (/root), e.g. 4G")(fn)
    fn = click.option("--memory", default="512M", show_default=True,
                      help="guest memory, e.g. 512M or 1G")(fn)
    fn = click.option("--vcpu", default=1, show_default=True, type=int, callback=positive,
                      help="virtual CPUs")(fn)
    fn = click.option("--image", default="debian-bookworm", show_default=True)(fn)
    fn = click.option("--name", callback=check_name, help="VM name (a DNS label)")(fn)
    return fn


def make_create(name: str | None, image: str, vcpu: int, memory: str, disk: str, nat: bool,
                network: str | None, start: bool = True) -> VMCreate:
    spec = VMSpec(vcpus=vcpu, memory_mib=parse_size_mib(memory, "--memory"),
                  work_disk_mib=parse_size_mib(disk, "--disk-size"), image=image, nat=nat)
    try:
        spec.validated()  # the daemon checks again; refusing here saves a round trip
    except InvalidSpec as exc:
        raise click.UsageError(str(exc)) from exc
    return VMCreate(name=name, image=image, vcpus=spec.vcpus, memory_mib=spec.memory_mib,
                    disk_mib=spec.work_disk_mib, nat=nat, start=start,
                    network=network)  # type: ignore[arg-type]



def run_ssh(client: Client, ref: str, command: tuple[str, ...], *, tty: bool,
            workdir: str | None = None) -> int:
    target = client.ssh_target(ref)
    argv = list(target.argv)
    argv.insert(1, "-t" if tty else "-T")
    workdir = workdir or target.workdir
    cd = f"cd {shlex.quote(workdir)} && " if workdir else ""
    if command:
        # One argument, quoted for the guest's shell, so argv arrives intact. The trailing
        # `exit $?` keeps the shell from exec'ing the command, so a signal becomes 128+n.
        argv.append(cd + shlex.join(command) + "; exit $?")
    elif cd:
        argv.append(cd + 'exec "$SHELL" -l')
    proc = subprocess.Popen(argv)
    try:
        return proc.wait()
    except BaseException:
        # Interrupted (a signal under --rm) or Ctrl-C: ssh is asked to stop, so that it
        # puts back the terminal it set raw (-t); subprocess.call's SIGKILL would leave
        # the user's terminal without echo.
        _end_ssh(proc)
        raise


SSH_GRACE = 5.0  # seconds ssh gets to exit on SIGTERM before it is killed


def _end_ssh(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.terminate()
        proc.wait(SSH_GRACE)
    except subprocess.TimeoutExpired:
        pass
    finally:  # also when a further signal cuts the wait short
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class SplitAtDashDash(click.Command):
    """Everything after the first ``--`` is the guest command, never an option or PATH."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            i = args.index("--")
            ctx.meta["guest_command"] = tuple(args[i + 1:])
            args = args[:i]
        return super().parse_args(ctx, args)


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
        raise click.UsageError(_pydantic_message(exc)) from exc
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


@vm.command("exec", cls=SplitAtDashDash)
@click.argument("ref")
@click.option("--guest-path", help="directory to run in (default: the VM's workspace)")
@click.option("--auto-prepare", is_flag=True,
              help="re-sync the workspace first if the host repo's HEAD moved since it was "
                   "copied")
@click.pass_context
@handle_errors
def vm_exec(ctx: click.Context, ref: str, guest_path: str | None, auto_prepare: bool) -> None:
    """Run the command after `--` in the VM's workspace; its exit code is banger's. When the
    repo pins tools (.mise.toml, .tool-versions) and mise is installed in the guest, the
    command runs under `mise exec`."""
    command: tuple[str, ...] = ctx.meta.get("guest_command", ())
    if not command:
        raise click.UsageError("give the command after --, e.g. banger vm exec box -- make")
    client = connect()
    if guest_path is None:
        vm = client.show(ref)
        if vm.workspace_guest_path is None:
            raise click.UsageError(f"{ref} has no workspace: pass --guest-path, or use "
                                   f"`banger vm ssh {ref} -- ...`")
        moved = _head_moved(vm)
        if moved and auto_prepare:
            assert vm.workspace_path is not None
            err_console.print(f"{markup(moved)}: re-syncing", highlight=False)
            with Progress() as progress:
                client.prepare_workspace(ref, WorkspaceIn(path=vm.workspace_path,
                                                          bootstrap=False), progress)
        elif moved:
            err_console.print(f"[yellow]warning:[/yellow] {markup(moved)}; the VM has the "
                              f"old tree. `banger vm workspace prepare {markup(vm.name)} "
                              f"{markup(shlex.quote(vm.workspace_path or ''))}` or "
                              "--auto-prepare re-syncs it.", highlight=False)
    sys.exit(run_ssh(client, ref, ("sh", "-c", _IN_TOOLS, "banger-exec", *command), tty=False,
                     workdir=guest_path))


# Runs the command under mise when the workspace pins tools and mise is there (what the
# tool bootstrap installed); as itself otherwise.
_IN_TOOLS = ('for f in .mise.toml mise.toml .tool-versions; do [ -f "$f" ] || continue; '
             'PATH="/root/.local/bin:$PATH"; command -v mise >/dev/null 2>&1 && '
             'exec mise exec -- "$@"; break; done; exec "$@"')


def _head_moved(vm: VMOut) -> str | None:
    """Why the workspace is stale, if the host repo's HEAD moved since it was copied."""
    if not vm.workspace_path or not vm.workspace_head:
        return None
    proc = subprocess.run(["git", "-C", vm.workspace_path, "rev-parse", "-q", "--verify",
                           "HEAD"], capture_output=True, text=True, check=False)
    head = proc.stdout.strip()
    if proc.returncode != 0 or not head or head == vm.workspace_head:
        return None
    return (f"the host repo's HEAD moved since the workspace was copied "
            f"({vm.workspace_head[:12]} -> {head[:12]})")


@vm.group("workspace")
def vm_workspace() -> None:
    """The repo copied into a VM (`banger vm run ./repo`)."""


@vm_workspace.command("prepare")
@click.argument("ref")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--include-untracked", is_flag=True)
@click.option("--branch", help="create this guest-only branch")
@click.option("--from", "from_ref", help="start --branch from this ref")
@click.option("--no-bootstrap", is_flag=True,
              help="do not install the tools .mise.toml/.tool-versions pin")
@handle_errors
def vm_workspace_prepare(ref: str, path: Path, include_untracked: bool, branch: str | None,
                         from_ref: str | None, no_bootstrap: bool) -> None:
    """Re-sync a VM's /root/repo from PATH: a running VM now (one stream over ssh), a
    stopped one at its next start (the repo is staged now, as it is at this moment)."""
    if from_ref and not branch:
        raise click.UsageError("--from needs --branch")
    ws = WorkspaceIn(path=str(path.resolve()), include_untracked=include_untracked,
                     branch=branch, from_ref=from_ref, bootstrap=not no_bootstrap)
    with Progress() as progress:
        vm = connect().prepare_workspace(ref, ws, progress)
    print(printable(f"{vm.name}: {vm.workspace_path} -> {vm.workspace_guest_path}"))


# Runs in the guest. A throwaway index (seeded from the real one so unchanged files are
# not hashed again) takes every change, untracked files included; the repo's own index,
# HEAD and work tree are left as they were. --binary keeps binary files exact.
_EXPORT = """set -e
cd {workdir}
base={base}
git rev-parse -q --verify "$base^{{commit}}" >/dev/null || {{
  echo "banger: no base commit $base in {workdir}: pass --base-commit" >&2; exit 2; }}
idx=$(mktemp)
trap 'rm -f "$idx"' EXIT
if [ -f .git/index ]; then cp .git/index "$idx"; fi
GIT_INDEX_FILE=$idx git add -A
GIT_INDEX_FILE=$idx git diff --cached --binary "$base"
"""


@vm_workspace.command("export")
@click.argument("ref")
@click.option("--base-commit", help="diff against this commit instead of the state the "
              "workspace was copied in with (refs/banger/base)")
@handle_errors
def vm_workspace_export(ref: str, base_commit: str | None) -> None:
    """Print a binary patch of everything changed in the guest's workspace: guest commits,
    uncommitted and untracked (not ignored) files. `git apply` takes it on the host.
    Streamed, so any size works; on a terminal, control characters are shown escaped."""
    client = connect()
    target = client.ssh_target(ref)
    if target.workdir is None:
        raise click.UsageError(f"{ref} has no workspace (it was not created from a PATH)")
    script = _EXPORT.format(workdir=shlex.quote(target.workdir),
                            base=shlex.quote(base_commit or "refs/banger/base"))
    argv = [target.argv[0], "-T", *target.argv[1:], script]
    # The patch is the guest's text, streamed (never held whole). A pipe or file gets its
    # bytes as they are, which `git apply` needs; a terminal sees control characters
    # escaped, and so does ssh's stderr, which carries the guest's messages.
    tty = sys.stdout.isatty()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE if tty else None,
                            stderr=subprocess.PIPE)
    relays = [threading.Thread(target=relay_printable, args=(src, dst), daemon=True)
              for src, dst in ((proc.stderr, sys.stderr), (proc.stdout, sys.stdout))
              if src is not None]
    for t in relays:
        t.start()
    rc = proc.wait()
    for t in relays:
        t.join()
    sys.exit(rc)


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
