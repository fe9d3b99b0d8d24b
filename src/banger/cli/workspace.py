"""`banger vm exec` and `banger vm workspace`: commands in a VM's checkout, re-syncing it
from the host repo, and exporting the guest's changes as a patch."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from banger.cli.common import SplitAtDashDash, handle_errors
from banger.cli.complete import complete_vm

if TYPE_CHECKING:
    from banger.client.execws import Started


@click.command("exec", cls=SplitAtDashDash)
@click.argument("ref", shell_complete=complete_vm)
@click.option("--guest-path", help="directory to run in (default: the VM's workspace)")
@click.option("--auto-prepare", is_flag=True,
              help="re-sync the workspace first if the host repo's HEAD moved since it was "
                   "copied")
@click.pass_context
@handle_errors
def vm_exec(ctx: click.Context, ref: str, guest_path: str | None, auto_prepare: bool) -> None:
    """Run the command after `--` in the VM (no shell: through its guest agent), in its
    workspace (else /root); its exit code is banger's, a signal n is 128+n. stdin is
    passed on; on a terminal the command gets a pty. When the repo pins tools
    (.mise.toml, .tool-versions) and mise is installed in the guest, the command runs
    under `mise exec`."""
    from banger.cli.guestexec import run_in_guest

    command: tuple[str, ...] = ctx.meta.get("guest_command", ())
    if not command:
        raise click.UsageError("give the command after --, e.g. banger vm exec box -- make")
    if not auto_prepare:
        # One connection: the daemon runs it in the workspace (cwd, pinned tools) and
        # its "started" names the workspace, whose HEAD is checked as the command runs.
        sys.exit(run_in_guest(None, ref, command, cwd=guest_path, in_workspace=True,
                              on_started=_warn_if_moved))
    from banger.client.client import connect

    client = connect()
    vm = client.show(ref)
    moved = _head_moved(vm.workspace_path, vm.workspace_head)
    if moved:  # re-synced before the command runs
        from banger.cli.render import Progress, err_console
        from banger.cli.safe import markup
        assert vm.workspace_path is not None
        err_console.print(f"{markup(moved)}: re-syncing", highlight=False)
        with Progress() as progress:
            client.prepare_workspace(ref, {"path": vm.workspace_path, "bootstrap": False},
                                     progress)
    sys.exit(run_in_guest(client, vm.id, command, cwd=guest_path, in_workspace=True))


def _warn_if_moved(vm: Started) -> None:
    """Warn (the command runs meanwhile, on the old tree) when the host repo's HEAD
    moved since the workspace was copied."""
    moved = _head_moved(vm.workspace_path, vm.workspace_head)
    if not moved:
        return
    from shlex import quote

    from banger.cli.render import err_console
    from banger.cli.safe import markup
    err_console.print(f"[yellow]warning:[/yellow] {markup(moved)}; the VM has the "
                      f"old tree. `banger vm workspace prepare {markup(vm.name or '')} "
                      f"{markup(quote(vm.workspace_path or ''))}` or "
                      "--auto-prepare re-syncs it.", highlight=False)


def _head_moved(path: str | None, copied: str | None) -> str | None:
    """Why the workspace is stale, if the host repo's HEAD moved since it was copied."""
    if not path or not copied:
        return None
    import subprocess

    proc = subprocess.run(["git", "-C", path, "rev-parse", "-q", "--verify", "HEAD"],
                          capture_output=True, text=True, check=False)
    head = proc.stdout.strip()
    if proc.returncode != 0 or not head or head == copied:
        return None
    return (f"the host repo's HEAD moved since the workspace was copied "
            f"({copied[:12]} -> {head[:12]})")


@click.group("workspace")
def vm_workspace() -> None:
    """The repo copied into a VM (`banger vm run ./repo`)."""


@vm_workspace.command("prepare")
@click.argument("ref", shell_complete=complete_vm)
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=str))
@click.option("--include-untracked", is_flag=True)
@click.option("--branch", help="create this guest-only branch")
@click.option("--from", "from_ref", help="start --branch from this ref")
@click.option("--no-bootstrap", is_flag=True,
              help="do not install the tools .mise.toml/.tool-versions pin")
@handle_errors
def vm_workspace_prepare(ref: str, path: str, include_untracked: bool, branch: str | None,
                         from_ref: str | None, no_bootstrap: bool) -> None:
    """Re-sync a VM's /root/repo from PATH: a running VM now (one stream over ssh), a
    stopped one at its next start (the repo is staged now, as it is at this moment)."""
    from banger.cli.common import usage_error
    from banger.cli.render import Progress
    from banger.cli.safe import printable
    from banger.client.client import ApiError, connect
    from banger.client.types import WorkspaceBody

    if from_ref and not branch:
        raise click.UsageError("--from needs --branch")
    ws: WorkspaceBody = {"path": os.path.realpath(path), "include_untracked": include_untracked,
                         "branch": branch, "from_ref": from_ref, "bootstrap": not no_bootstrap}
    try:
        with Progress() as progress:
            vm = connect().prepare_workspace(ref, ws, progress)
    except ApiError as exc:
        raise usage_error(exc, ws) or exc from exc
    print(printable(f"{vm.name}: {vm.workspace_path} -> {vm.workspace_guest_path}"))


# Runs in the guest. A throwaway index (seeded from the real one so unchanged files are
# not hashed again) takes every change, untracked files included; the repo's own index,
# HEAD and work tree are left as they were. --binary keeps binary files exact. The
# quoted words are used once each, never inside double quotes (where a quoted
# '$(...)' would run): the message names the directory as $PWD.
_EXPORT = """set -e
cd {workdir}
base={base}
git rev-parse -q --verify "$base^{{commit}}" >/dev/null || {{
  echo "banger: no base commit $base in $PWD: pass --base-commit" >&2; exit 2; }}
idx=$(mktemp)
trap 'rm -f "$idx"' EXIT
if [ -f .git/index ]; then cp .git/index "$idx"; fi
GIT_INDEX_FILE=$idx git add -A
GIT_INDEX_FILE=$idx git diff --cached --binary "$base"
"""


@vm_workspace.command("export")
@click.argument("ref", shell_complete=complete_vm)
@click.option("--base-commit", help="diff against this commit instead of the state the "
              "workspace was copied in with (refs/banger/base)")
@handle_errors
def vm_workspace_export(ref: str, base_commit: str | None) -> None:
    """Print a binary patch of everything changed in the guest's workspace: guest commits,
    uncommitted and untracked (not ignored) files. `git apply` takes it on the host.
    Streamed, so any size works; on a terminal, control characters are shown escaped."""
    import subprocess
    import threading
    from shlex import quote

    from banger.cli.safe import relay_printable
    from banger.client.client import connect

    client = connect()
    target = client.ssh_target(ref)
    if target.workdir is None:
        raise click.UsageError(f"{ref} has no workspace (it was not created from a PATH)")
    script = _EXPORT.format(workdir=quote(target.workdir),
                            base=quote(base_commit or "refs/banger/base"))
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
