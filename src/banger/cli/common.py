"""What every banger command shares: error handling at the boundary, the VM spec options
and their parsing, the ssh session into a guest, and the `--` split of a guest command."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import click

from banger.model.vm import NAME_RULE, KernelKind, NetworkMode, VMSpec

if TYPE_CHECKING:
    import subprocess

    from banger.client.client import ApiError, Client
    from banger.client.types import CreateBody

F = TypeVar("F", bound=Callable[..., Any])

# The request fields the spec options fill, and the flag each comes from: the daemon's
# validation error names the field, the user typed the flag.
SPEC_FLAGS = {"name": "--name", "image": "--image", "vcpus": "--vcpu",
              "memory_mib": "--memory", "disk_mib": "--disk-size", "network": "--network",
              "branch": "--branch", "from_ref": "--from", "path": "PATH"}
INVALID_REQUEST = "invalid request: "
# What a pattern the daemon refused means, for the fields whose pattern says little.
PATTERN_MEANS = {"name": f"not a DNS label: {NAME_RULE}"}


def handle_errors(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            sys.exit(130)
        except Exception as exc:
            # Imported once something went wrong, not for every command: a command that
            # raised one of these has loaded its module already.
            from banger.cli.interrupt import Interrupted
            from banger.cli.render import err_console, print_error
            from banger.cli.safe import markup
            from banger.client.client import ApiError, DaemonUnavailable
            from banger.client.peer import Untrusted
            if isinstance(exc, ApiError):
                print_error(exc.body)
                sys.exit(1)
            if isinstance(exc, (DaemonUnavailable, Untrusted)):
                err_console.print(f"[red]error:[/red] {markup(str(exc))}")
                sys.exit(1)
            if isinstance(exc, Interrupted):
                sys.exit(exc.exit_code)
            raise
    return wrapper  # type: ignore[return-value]


def usage_error(exc: ApiError, sent: Mapping[str, Any]) -> click.UsageError | None:
    """The daemon's refusal of a request's fields (code "invalid") as a usage error
    naming the flags and values the user gave; None for any other error.

    The daemon's API schema is the one validator of a VM spec: the CLI parses sizes but
    checks no range or pattern of its own, and only says the refusal in its own terms."""
    # The daemon's schema refusal (422, "invalid request: <field>: <why>; ..."), not a
    # use case's own "invalid" (a PATH outside a git work tree) which says it all.
    if exc.status != 422 or not exc.body.message.startswith(INVALID_REQUEST):
        return None
    parts = []
    for part in exc.body.message.removeprefix(INVALID_REQUEST).split("; "):
        field, sep, msg = part.partition(": ")
        key = field.rsplit(".", 1)[-1]
        if not sep or key not in SPEC_FLAGS:
            parts.append(part)
            continue
        value = sent.get(key, (sent.get("workspace") or {}).get(key))
        shown = ("" if value is None else f" {value!r}" if isinstance(value, str)
                 else f" {value} MiB" if key.endswith("_mib") else f" {value}")
        if msg.startswith("String should match pattern") and key in PATTERN_MEANS:
            msg = PATTERN_MEANS[key]
        parts.append(f"{SPEC_FLAGS[key]}{shown}: {msg}")
    return click.UsageError("; ".join(parts))


def parse_size_mib(value: str, flag: str) -> int:
    m = re.fullmatch(r"\s*(-?\d+)\s*([mMgG](?:i?[bB])?)?\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r}: use a number of MiB or a size like 512M or 2G",
                                 param_hint=flag)
    n = int(m.group(1))
    if m.group(2) and m.group(2)[0] in "gG":
        n *= 1024
    return n  # its range is the daemon's to check


def size_text(mib: int) -> str:
    """``mib`` as --memory and --disk-size take it (4096 -> "4G", 512 -> "512M")."""
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


# The defaults the spec options show and send: the model's (a create sends every field).
_DEFAULT = VMSpec()


def spec_options(fn: F) -> F:
    fn = click.option("--kernel", type=click.Choice([k.value for k in KernelKind]),
                      default=_DEFAULT.kernel.value, show_default=True,
                      help="microvm: banger's kernel, no initramfs (fast); cloud: Debian's "
                           "cloud kernel with an initramfs (the fallback)")(fn)
    fn = click.option("--nat", is_flag=True, help="give the guest outbound network access")(fn)
    fn = click.option("--network", type=click.Choice([m.value for m in NetworkMode]),
                      default=None,
                      help="user: rootless, ssh through a forwarded loopback port; tap: a "
                           "bridge, its own address and <name>.vm (needs a root daemon). "
                           "Default: [network] mode in config, else user")(fn)
    fn = click.option("--disk-size", "disk", default=size_text(_DEFAULT.work_disk_mib),
                      show_default=True, help="work disk size (/root), e.g. 4G")(fn)
    fn = click.option("--memory", default=size_text(_DEFAULT.memory_mib), show_default=True,
                      help="guest memory, e.g. 512M or 1G")(fn)
    fn = click.option("--vcpu", default=_DEFAULT.vcpus, show_default=True, type=int,
                      help="virtual CPUs")(fn)
    fn = click.option("--image", default=_DEFAULT.image, show_default=True)(fn)
    fn = click.option("--name", help="VM name (a DNS label)")(fn)
    return fn


def make_create(name: str | None, image: str, vcpu: int, memory: str, disk: str, nat: bool,
                network: str | None, start: bool = True,
                kernel: str = _DEFAULT.kernel.value) -> CreateBody:
    return {"name": name, "image": image, "vcpus": vcpu,
            "memory_mib": parse_size_mib(memory, "--memory"),
            "disk_mib": parse_size_mib(disk, "--disk-size"), "nat": nat, "start": start,
            "network": network, "kernel": kernel, "workspace": None, "delete_on_disconnect": False}


def run_ssh(client: Client, ref: str, command: tuple[str, ...], *, tty: bool,
            workdir: str | None = None) -> int:
    import shlex
    import subprocess

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
    import subprocess

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
