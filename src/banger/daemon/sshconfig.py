"""Keeps banger's ssh_config in step with the VMs: one ``Host <name>.vm`` block per running
VM, rewritten whole after every lifecycle change (a :attr:`VMService.on_change` listener).

The file exists from the daemon's first start on, even with no VM, so an Include that
``banger ssh-config --install`` put in ~/.ssh/config never points at nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from banger.core.service import VMService, VMView
from banger.local import sshconfig
from banger.model.layout import Layout
from banger.model.vm import VMState

log = logging.getLogger(__name__)


def entries(views: Iterable[VMView]) -> list[sshconfig.SshEntry]:
    """An entry for every running VM ssh can reach; stopped ones have no endpoint."""
    out = []
    for view in views:
        addr = view.handles.endpoint if view.handles else None
        if view.vm.state is VMState.RUNNING and addr is not None:
            out.append(sshconfig.SshEntry(name=view.vm.name, hostname=addr.host,
                                          port=addr.port, alias=view.paths.names.ssh_alias))
    return out


class SshConfigWriter:
    """Renders and atomically writes ``layout.ssh_config`` from a VM list
    (:meth:`VMService.notify` delivers lists in order, one at a time)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout

    def __call__(self, views: list[VMView]) -> None:
        text = sshconfig.render(entries(views), self.layout.ssh_key, self.layout.known_hosts)
        path = self.layout.ssh_config
        # The directory also holds the private key: private, like ensure_key makes it.
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        sshconfig.write(path, text)


def attach(service: VMService) -> SshConfigWriter:
    """Register the writer on ``service`` and write the file now."""
    writer = SshConfigWriter(service.layout)
    service.on_change.append(writer)
    try:
        writer(service.list_vms())
    except Exception:  # no ssh_config is no reason to refuse serving the VMs
        log.exception("could not write %s", service.layout.ssh_config)
    log.debug("ssh_config at %s", service.layout.ssh_config)
    return writer
