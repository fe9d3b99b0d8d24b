"""What every banger command shares: error handling at the boundary, the VM spec options
and their parsing, the ssh session into a guest, and the `--` split of a guest command."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from banger.api.schema import VMCreate
from banger.cli.interrupt import (
    Interrupted,
)
from banger.cli.render import (
    err_console,
    print_error,
)
from banger.cli.safe import markup
from banger.client.client import ApiError, Client, DaemonUnavailable
from banger.client.peer import Untrusted
from banger.model.vm import NAME_PATTERN, InvalidSpec, NetworkMode, VMSpec

F = TypeVar("F", bound=Callable[..., Any])
_NAME = re.compile(NAME_PATTERN)


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


def pydantic_message(exc: ValidationError) -> str:
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
    fn = click.option("--network", type=click.Choice([m.value for m in NetworkMode]),
                      default=None,
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
