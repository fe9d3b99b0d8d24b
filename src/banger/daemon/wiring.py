"""The daemon's composition root: the host adapters (banger.host) behind the core's ports."""

from __future__ import annotations

from banger.host.guest_agent import LocalAgent
from banger.host.guest_ssh import SshGuest
from banger.host.images import LocalImages
from banger.host.localdisks import LocalDisks
from banger.host.network import LocalNet
from banger.host.scratch import Scratch
from banger.host.vmm_qemu import QemuVmm
from banger.host.workspace_port import LocalWorkspace
from banger.model.layout import Layout
from banger.ports import HostPorts


def host_ports(layout: Layout) -> HostPorts:
    return HostPorts(images=LocalImages(layout.images_dir, layout.cache_dir,
                                         layout.state_dir / "oci"),
                     disks=LocalDisks(), vmm=QemuVmm(layout.state_dir / "accel.json"),
                     workspace=LocalWorkspace(Scratch(layout.state_dir)),
                     guest=SshGuest(layout), net=LocalNet(layout.state_dir / "ip_forward.orig"),
                     agent=LocalAgent())
