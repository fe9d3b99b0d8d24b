"""Keeps banger's ssh_config in step with the VMs: one ``Host <name>.vm`` block per running
VM, rewritten whole after every lifecycle change (a :attr:`VMService.on_change` listener).

The file exists from the daemon's first start on, even with no VM, so an Include that
``banger ssh-config --install`` put in ~/.ssh/config never points at nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from banger.core.service import VMService, VMView
from banger.host import sshconfig
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
    """Renders and atomically writes ``layout.ssh_config`` from the current VM list.

    Listeners run in whichever worker thread finished an operation, each with the list it
    saw. Writing that list could let an older snapshot land after a newer one, so the
    writer lists again under its lock: the last write always reflects the latest state.
    """

    def __init__(self, layout: Layout, list_vms: Callable[[], list[VMView]]) -> None:
        self.layout = layout
        self.list_vms = list_vms
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            text = sshconfig.render(entries(self.list_vms()), self.layout.ssh_key,
                                    self.layout.known_hosts)
            path = self.layout.ssh_config
            # The directory also holds the private key: private, like ensure_key makes it.
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            sshconfig.write(path, text)

    def __call__(self, _views: list[VMView]) -> None:
        self.refresh()


def attach(service: VMService) -> SshConfigWriter:
    """Register the writer on ``service`` and write the file now."""
    writer = SshConfigWriter(service.layout, service.list_vms)
    service.on_change.append(writer)
    try:
        writer.refresh()
    except Exception:  # no ssh_config is no reason to refuse serving the VMs
        log.exception("could not write %s", service.layout.ssh_config)
    log.debug("ssh_config at %s", service.layout.ssh_config)
    return writer
