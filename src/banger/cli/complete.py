"""Shell completion of VM refs: the names of the VMs the user's running daemon knows.

It runs on every Tab, so it stays cheap and harmless: no daemon is ever started (no
socket, no names), a daemon that does not answer within COMPLETE_TIMEOUT completes
nothing, and any failure completes nothing rather than printing into the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

COMPLETE_TIMEOUT = 1.0  # seconds; a Tab that hangs is worse than one that offers nothing


def vm_names() -> list[tuple[str, str]]:
    """(name, state) of every VM of the running daemon; [] when none answers."""
    from banger.client.client import Client
    from banger.local.trust import private_dir
    from banger.model.layout import Layout

    try:
        layout = Layout.for_user()
        if not layout.daemon_socket.exists():
            return []  # no daemon: never autostart one for a Tab
        # exists() raises when the socket cannot even be looked at (another user's
        # runtime directory, a name too long): that too is a Tab with nothing to offer.
        private_dir(layout.runtime_dir, what="runtime directory")
        vms = Client(layout.daemon_socket, read_timeout=COMPLETE_TIMEOUT).list_vms()
    except Exception:
        # Not answering (DaemonUnavailable), not ours (Untrusted, UnsafeDirectory), an
        # error reply or garbage: a Tab offers nothing rather than a traceback.
        return []
    return [(v.name, v.state) for v in vms]


def complete_vm(ctx: click.Context, param: click.Parameter,
                incomplete: str) -> list[CompletionItem]:
    from click.shell_completion import CompletionItem

    return [CompletionItem(name, help=state) for name, state in vm_names()
            if name.startswith(incomplete)]
