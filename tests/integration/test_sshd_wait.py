"""The sshd wait of a person's ssh target (`vm ssh`) and of the ssh_config answer: many
of them waiting on a slow sshd never stop the daemon answering anything else."""

from __future__ import annotations

import threading

import httpx

from tests.integration.conftest import Daemon

POOL = 40  # the threads of the server's shared pool (anyio's default)
WAITERS = POOL + 8


def test_ssh_targets_waiting_for_sshd_do_not_stop_the_daemon_answering(
        daemon: Daemon) -> None:
    daemon.client.create({"name": "s"}, lambda _: None)
    daemon.guest.ready_delay = 3600.0  # an sshd that never comes: each ask waits
    done = threading.Barrier(WAITERS + 1)

    def ask() -> None:
        try:
            daemon.http.get("/v1/vms/s/ssh", timeout=120)
        except httpx.HTTPError:
            pass
        finally:
            done.wait()

    threads = [threading.Thread(target=ask, daemon=True) for _ in range(WAITERS)]
    for t in threads:
        t.start()
    while len(daemon.guest.ready_waits) < POOL:  # as many as the pool holds are waiting
        threading.Event().wait(0.05)
    try:
        assert daemon.http.get("/v1/health", timeout=30).status_code == 200
        assert daemon.http.get("/v1/vms", timeout=30).status_code == 200
    finally:
        daemon.service.stop("s")  # the VMM gone: every wait ends
        done.wait(timeout=120)
