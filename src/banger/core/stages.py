"""Every stage name of every step list, and the label users see while it runs.

Stage names are stable identifiers: logs, progress, the op log, API errors and tests use
them. They are written here once; step lists are built with :func:`step`, which takes the
label from :data:`LABELS`, so a stage cannot appear under two spellings.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import TypeVar

from banger.pipeline import Step

C = TypeVar("C")

WORKSPACE_DIR = "repo"
# Where a workspace lands in the guest (the labels below name it).
WORKSPACE_GUEST_PATH = f"/root/{WORKSPACE_DIR}"


class Stage(StrEnum):
    # A start waiting for a boot slot (before its pipeline runs).
    QUEUED = "queued"
    # start
    PREFLIGHT = "preflight"
    CLEANUP_RUNTIME = "cleanup_runtime"
    BRIDGE = "bridge"
    SOCKET_DIR = "socket_dir"
    SYSTEM_OVERLAY = "system_overlay"
    WORK_DISK = "work_disk"
    PORT_FORWARD = "port_forward"
    PREPARE_HOST_FEATURES = "prepare_host_features"
    TAP = "tap"
    QEMU_LAUNCH = "qemu_launch"  # the launch is the driver's: see launch_stage
    FIRECRACKER_LAUNCH = "firecracker_launch"
    WAIT_AGENT = "wait_agent"
    WORKSPACE_SYNC = "workspace_sync"
    POST_START_FEATURES = "post_start_features"
    TOOL_BOOTSTRAP = "tool_bootstrap"
    # stop and kill
    GUEST_POWEROFF = "guest_poweroff"
    VMM_QUIT = "vmm_quit"  # VmmPort.quit: QMP quit for QEMU, the API for Firecracker
    VMM_SIGNAL = "vmm_signal"
    RELEASE_RUNTIME = "release_runtime"
    # workspace prepare
    WORKSPACE_STAGE = "workspace_stage"
    WORKSPACE_COPY = "workspace_copy"


LABELS: dict[Stage, str] = {
    Stage.QUEUED: "waiting for a boot slot",
    Stage.PREFLIGHT: "checking image and spec",
    Stage.CLEANUP_RUNTIME: "clearing stale runtime state",
    Stage.BRIDGE: "setting up the bridge",
    Stage.SOCKET_DIR: "creating socket directory",
    Stage.SYSTEM_OVERLAY: "creating root disk overlay",
    Stage.WORK_DISK: "creating work disk",
    Stage.PORT_FORWARD: "reserving ssh port",
    Stage.PREPARE_HOST_FEATURES: "adding NAT rules (--nat)",
    Stage.TAP: "creating the tap device",
    Stage.QEMU_LAUNCH: "launching QEMU",
    Stage.FIRECRACKER_LAUNCH: "launching Firecracker",
    Stage.WAIT_AGENT: "waiting for the guest agent",
    Stage.WORKSPACE_SYNC: f"copying the prepared workspace to {WORKSPACE_GUEST_PATH}",
    Stage.POST_START_FEATURES: "syncing files and git identity",
    Stage.TOOL_BOOTSTRAP: "starting the tool install in the background",
    Stage.GUEST_POWEROFF: "powering off the guest",
    Stage.VMM_QUIT: "asking the VMM to quit",
    Stage.VMM_SIGNAL: "signalling the VMM",
    Stage.RELEASE_RUNTIME: "releasing the VMM, its sockets and its network",
    Stage.WORKSPACE_STAGE: "staging the repo",
    Stage.WORKSPACE_COPY: f"copying to {WORKSPACE_GUEST_PATH}",
}


def launch_stage(vmm: str) -> Stage:
    """The launch stage of the VMM driver named ``vmm`` (``VmmPort.name``): each driver
    launches by its own mechanism, and says which under its own stable name."""
    try:
        return Stage(f"{vmm}_launch")
    except ValueError:
        raise ValueError(f"no launch stage for VMM driver {vmm!r}: add "
                         f"{vmm.upper()}_LAUNCH to banger.core.stages") from None


def step(stage: Stage, run: Callable[[C], None], undo: Callable[[C], None] | None = None, *,
         when: Callable[[C], bool] | None = None, best_effort: bool = False) -> Step[C]:
    """The pipeline step of ``stage``, labelled from :data:`LABELS`."""
    return Step(stage.value, run, undo, LABELS[stage], when=when, best_effort=best_effort)
