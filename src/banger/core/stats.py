"""A running VM's resource use (``banger vm stats``): the guest's own numbers from its
agent, and what its VMM process costs the host.

CPU is reported as a share over a short interval, not only as cumulative ticks: a user
asks "how busy is it now", and a tick count since boot cannot answer that. So each VM is
sampled twice, ``interval`` seconds apart (both the guest's ticks and the VMM's CPU time);
the cumulative numbers of the second sample are kept too, for tools that sample on their
own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from banger.core.context import VMContext
from banger.core.execs import in_vm
from banger.core.views import agent_channel
from banger.model.errors import OperationFailed
from banger.model.vm import VM
from banger.ports import GuestStats, VmmUsage

SAMPLE_INTERVAL = 0.5  # seconds between the two samples
AGENT_TIMEOUT = 10.0  # per sample: connect, HELLO and STATS


@dataclass(frozen=True)
class VMStats:
    vm: VM
    guest: GuestStats  # the second sample
    # Busy share of all the guest's CPUs over the interval, 0..100 (None: no ticks passed).
    guest_cpu_percent: float | None
    vmm_pid: int
    vmm: VmmUsage | None  # None: the process could not be read (it just exited)
    # The VMM's CPU time over the interval, as `top` shows it: 100 = one host core.
    vmm_cpu_percent: float | None
    interval: float  # seconds between the two samples, as measured


def vm_stats(ctx: VMContext, ref: str, interval: float = SAMPLE_INTERVAL) -> VMStats:
    shown, channel = agent_channel(ctx, ref, "its stats are read")
    vm, h = shown.vm, shown.handles
    assert h is not None
    try:
        g1 = ctx.host.agent.stats(channel=channel, timeout=AGENT_TIMEOUT)
        v1, t1 = ctx.host.vmm.usage(h.pid), time.monotonic()
        time.sleep(interval)
        g2 = ctx.host.agent.stats(channel=channel, timeout=AGENT_TIMEOUT)
    except OperationFailed as exc:
        raise in_vm(vm, exc) from exc
    v2, t2 = ctx.host.vmm.usage(h.pid), time.monotonic()
    vmm_pct = None
    if v1 is not None and v2 is not None and t2 > t1:
        vmm_pct = round(max(0.0, v2.cpu_seconds - v1.cpu_seconds) / (t2 - t1) * 100, 1)
    return VMStats(vm=vm, guest=g2, guest_cpu_percent=guest_cpu_percent(g1, g2),
                   vmm_pid=h.pid, vmm=v2,
                   vmm_cpu_percent=vmm_pct, interval=round(t2 - t1, 3))


def guest_cpu_percent(a: GuestStats, b: GuestStats) -> float | None:
    """The busy share (user + system) of all ticks between two samples; None when no tick
    passed (or the guest rebooted in between: its counters went back)."""
    busy = (b.cpu_user_ticks + b.cpu_system_ticks) - (a.cpu_user_ticks + a.cpu_system_ticks)
    total = busy + b.cpu_idle_ticks - a.cpu_idle_ticks
    if total <= 0 or busy < 0:
        return None
    return round(busy / total * 100, 1)
