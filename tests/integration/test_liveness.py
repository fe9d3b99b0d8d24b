"""A daemon under a burst of boots: every start finishes, reads and a stop of another VM
answer at once, boots queue; a client that goes away cancels its operation."""

from __future__ import annotations

import sys
import threading
import time

import httpx

from banger.api.schema import ProgressEvent
from banger.api.wire import NDJSON
from banger.client.client import ApiError, Client
from banger.client.types import ProgressEvent as ClientEvent
from banger.client.types import VMOut
from banger.core.operations import BootSlots
from banger.model.vm import VMState
from tests.integration.conftest import Daemon

BURST = 16
ROUNDS = 20
READY_DELAY = 0.5  # a slow guest: each boot waits this long for its agent


def _start(client: Client, name: str, barrier: threading.Barrier,
           results: dict[str, VMOut | Exception], kinds: dict[str, list[str]]) -> None:
    barrier.wait()
    try:
        results[name] = client.start(
            name, lambda ev: kinds[name].append(f"{ev.kind}:{ev.label or ''}"))
    except Exception as exc:
        results[name] = exc


def test_burst_of_streamed_starts_all_finish_and_reads_and_stop_answer(daemon: Daemon) -> None:
    daemon.service.ctx.boots = BootSlots(8)  # 16 starts: half of them wait in line
    names = [f"b{i}" for i in range(BURST)]
    for name in names:
        daemon.client.create({"name": name, "start": False}, lambda _: None)
    daemon.client.create({"name": "other", "start": False}, lambda _: None)
    # The reads and the stop go over a client with short timeouts: a daemon that does
    # not answer fails the test instead of hanging it.
    quick = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.layout.daemon_socket)),
                         base_url="http://bangerd", timeout=httpx.Timeout(10.0))
    clients = [Client(daemon.layout.daemon_socket) for _ in names]
    saw_queued = False
    began = time.monotonic()
    slowest = {"reads": 0.0, "stop": 0.0, "burst": 0.0}
    for rnd in range(ROUNDS):
        daemon.agent.hello_delay = 0.0
        assert quick.post("/v1/vms/other/start").status_code == 200
        daemon.agent.hello_delay = READY_DELAY
        barrier = threading.Barrier(BURST + 1)
        results: dict[str, VMOut | Exception] = {}
        kinds: dict[str, list[str]] = {n: [] for n in names}

        threads = [threading.Thread(target=_start, daemon=True,
                                    args=(clients[i], names[i], barrier, results, kinds))
                   for i in range(BURST)]
        for t in threads:
            t.start()
        barrier.wait()
        released = time.monotonic()
        time.sleep(0.1)  # the burst is in: boots running, the rest in line
        t0 = time.monotonic()
        r = quick.get("/v1/vms", timeout=1.0)
        assert r.status_code == 200 and len(r.json()) == BURST + 1
        assert quick.get("/v1/vms/b3", timeout=1.0).status_code == 200
        assert quick.get("/v1/operations", timeout=1.0).status_code == 200
        slowest["reads"] = max(slowest["reads"], time.monotonic() - t0)
        assert time.monotonic() - t0 < 1.0, f"round {rnd}: reads waited behind the boots"
        t0 = time.monotonic()
        r = quick.post("/v1/vms/other/stop", timeout=2.0)
        assert r.status_code == 200 and r.json()["state"] == "stopped"
        slowest["stop"] = max(slowest["stop"], time.monotonic() - t0)
        assert time.monotonic() - t0 < 2.0, f"round {rnd}: a stop of another VM waited"
        deadline = time.monotonic() + 30
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        bad = {n: r for n, r in results.items() if not isinstance(r, VMOut)}
        assert len(results) == BURST and not bad, f"round {rnd}: {bad or 'starts hang'}"
        slowest["burst"] = max(slowest["burst"], time.monotonic() - released)
        assert all(isinstance(r, VMOut) and r.state == "running" for r in results.values())
        saw_queued = saw_queued or any(
            k.startswith("queued:") and "in line" in k for ks in kinds.values() for k in ks)
        stopped = quick.post("/v1/batch/stop", json={"refs": names}).json()["results"]
        assert all(i["vm"]["state"] == "stopped" for i in stopped)
    print(f"{ROUNDS} rounds of {BURST} starts in {time.monotonic() - began:.1f} s; slowest: "
          + ", ".join(f"{k} {v:.3f} s" for k, v in slowest.items()))
    assert saw_queued, "a start beyond the boot limit says it is queued"
    assert daemon.vmm.procs == {}
    assert time.monotonic() - began < 90
    quick.close()
    for c in clients:
        c.close()


def _stream_then_leave(daemon: Daemon, body: dict[str, object], until_stage: str) -> str:
    """Open a streamed create, read until ``until_stage`` runs, then hang up."""
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.layout.daemon_socket)),
                        base_url="http://bangerd", timeout=httpx.Timeout(10.0))
    name = ""
    with http.stream("POST", "/v1/vms", json=body, headers={"Accept": NDJSON}) as resp:
        for line in resp.iter_lines():
            ev = ProgressEvent.model_validate_json(line)
            name = ev.vm or name
            if ev.kind == "run" and ev.stage == until_stage:
                break
    http.close()  # the client is gone
    return name


def _wait_until(cond, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_an_ephemeral_create_whose_client_leaves_is_deleted(daemon: Daemon) -> None:
    daemon.agent.hello_delay = 30.0
    name = _stream_then_leave(daemon, {"name": "eph", "delete_on_disconnect": True},
                              "wait_agent")
    assert name == "eph"
    _wait_until(lambda: daemon.client.list_vms() == [], "the ephemeral VM is deleted")
    _wait_until(lambda: daemon.client.operations() == [], "the operation ended")
    assert daemon.vmm.procs == {}
    vms = daemon.layout.state_dir / "vms"
    assert not vms.exists() or list(vms.iterdir()) == [], "the VM dir is gone"


def test_an_ephemeral_create_that_finished_as_its_client_left_is_deleted(
        daemon: Daemon) -> None:
    # The client leaves while the last step runs, before the result is written: the step
    # takes a while, or a loaded machine could have the result in the socket already (and
    # a client that had the result may hang up: that is no news).
    daemon.guest.identity_delay = 0.5
    name = _stream_then_leave(daemon, {"name": "late", "delete_on_disconnect": True},
                              "post_start_features")
    assert name == "late"
    _wait_until(lambda: daemon.client.list_vms() == [], "the ephemeral VM is deleted")
    assert daemon.vmm.procs == {}


def test_a_create_whose_client_leaves_is_cancelled_and_rolled_back(daemon: Daemon) -> None:
    daemon.agent.hello_delay = 30.0
    _stream_then_leave(daemon, {"name": "kept"}, "wait_agent")
    _wait_until(lambda: daemon.client.operations() == [], "the operation was cancelled")
    vm = daemon.client.show("kept")
    assert vm.state == VMState.STOPPED.value and "cancelled" in (vm.last_error or "")
    assert daemon.vmm.procs == {}
    paths = daemon.service.layout.vm(vm.id)
    assert not paths.root_disk.exists() and not paths.work_disk.exists()


def test_cancel_route_rolls_back_and_the_stream_says_cancelled(daemon: Daemon) -> None:
    daemon.agent.hello_delay = 30.0
    kinds: list[str] = []

    def on_progress(ev: ClientEvent) -> None:
        kinds.append(f"{ev.kind}:{ev.stage}")
        if ev.kind == "run" and ev.stage == "wait_agent" and ev.op_id:
            assert Client(daemon.layout.daemon_socket).cancel(ev.op_id).cancelled

    try:
        daemon.client.create({"name": "c"}, on_progress)
        raise AssertionError("the create was not cancelled")
    except ApiError as exc:
        assert exc.body.code == "cancelled" and exc.body.op_id
    assert "undone:qemu_launch" in kinds and "undone:work_disk" in kinds
    assert daemon.vmm.procs == {}
    r = daemon.http.post("/v1/operations/op-nope/cancel")
    assert r.status_code == 404 and "banger ops" in r.json()["error"]["message"]


def test_an_idle_stream_carries_heartbeats(daemon: Daemon, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import banger.daemon.ndjson as ndjson_module  # the streams' heartbeat (app, images)
    assert ndjson_module.HEARTBEAT_SECONDS <= 10
    monkeypatch.setattr(ndjson_module, "HEARTBEAT_SECONDS", 0.2)
    daemon.agent.hello_delay = 1.0
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.layout.daemon_socket)),
                        base_url="http://bangerd", timeout=httpx.Timeout(30.0))
    types = []
    with http.stream("POST", "/v1/vms", json={"name": "hb"},
                     headers={"Accept": NDJSON}) as resp:
        for line in resp.iter_lines():
            types.append(ProgressEvent.model_validate_json(line).type)
    http.close()
    assert "heartbeat" in types and types[-1] == "result"


def test_the_cli_shows_a_queued_start(daemon: Daemon) -> None:
    from tests.integration.test_api_cli import banger
    daemon.service.ctx.boots = BootSlots(1)
    for name in ("first", "second"):
        daemon.client.create({"name": name, "start": False}, lambda _: None)
    daemon.agent.hello_delay = 1.5
    first = threading.Thread(target=daemon.client.start, args=("first", lambda _: None))
    first.start()
    _wait_until(lambda: any(o.stage == "wait_agent" for o in daemon.client.operations()),
                "the first boot holds the only slot")
    code, out, err = banger("vm", "start", "second")
    first.join(10)
    assert code == 0, err
    assert "queued: waiting for a boot slot (one boot at a time): number 1 in line" in err
    assert out == "second: running\n"


def test_an_ephemeral_create_whose_client_read_the_result_is_kept(daemon: Daemon) -> None:
    # The client hangs up as soon as it has the result line: that is not "gone". (Each
    # create on a client of its own, so each hangs up at once, as the CLI does; frequent
    # thread switches let the hang-up overtake whatever the daemon does after the result.)
    names = [f"eph{i:02}" for i in range(50)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for name in names:
            client = Client(daemon.layout.daemon_socket)
            vm = client.create({"name": name, "delete_on_disconnect": True}, lambda _: None)
            client.close()
            assert vm.state == "running"
    finally:
        sys.setswitchinterval(interval)
    time.sleep(0.5)  # time for a wrong cleanup to happen
    assert sorted(v.name for v in daemon.client.list_vms()) == names
    assert daemon.client.operations() == []


def test_booleans_are_not_numbers(daemon: Daemon) -> None:
    # (Found by the API fuzz test: `"signal": true` was taken as signal 1.)
    r = daemon.http.post("/v1/batch/kill", json={"refs": ["x"], "signal": True})
    assert r.status_code == 422 and "signal" in r.json()["error"]["message"]
    r = daemon.http.post("/v1/vms", json={"name": "b", "vcpus": True})
    assert r.status_code == 422 and "vcpus" in r.json()["error"]["message"]
    assert daemon.client.list_vms() == []
    # A whole number written as 2.0 is still an integer to JSON Schema.
    r = daemon.http.post("/v1/vms", json={"name": "f", "vcpus": 2.0, "start": False})
    assert r.status_code == 201 and r.json()["vcpus"] == 2


def test_a_stopping_daemon_cancels_its_boots_instead_of_waiting_for_them(
        tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # SIGTERM while a streamed boot waits for a slow guest: bangerd's server rolls the
    # boot back and exits in seconds, rather than answering nothing until the boot ends
    # (and being SIGKILLed half way by a service manager).
    import signal

    import uvicorn

    from banger.daemon.app import create_app
    from banger.daemon.main import Server
    from banger.daemon.sockets import bind_socket
    from banger.model.layout import Layout
    from tests.fakes import agent_of, fake_service

    monkeypatch.setenv("BANGER_HOME", str(tmp_path / "h"))
    layout = Layout.for_user()
    service, _images, _disks, vmm, _guest, db = fake_service(tmp_path, layout)
    app = create_app(service, doctor=lambda: None,  # type: ignore[arg-type,return-value]
                     ssh_key="k", known_hosts="kh", ssh_argv=lambda addr, alias: [])
    server = Server(uvicorn.Config(app, log_level="warning"), service.ops)
    thread = threading.Thread(target=server.run,
                              kwargs={"sockets": [bind_socket(layout.daemon_socket).sock]},
                              daemon=True)
    thread.start()
    _wait_until(lambda: server.started, "the server started")
    agent_of(service).hello_delay = 60.0
    outcome: list[object] = []

    def create() -> None:
        try:
            outcome.append(Client(layout.daemon_socket).create({"name": "slow"},
                                                               lambda _: None))
        except ApiError as exc:
            outcome.append(exc)

    threading.Thread(target=create, daemon=True).start()
    _wait_until(lambda: any(o.stage == "wait_agent" for o in service.ops.in_flight()),
                "the boot is waiting for the agent")
    t0 = time.monotonic()
    server.handle_exit(signal.SIGTERM, None)
    thread.join(20)
    assert not thread.is_alive() and time.monotonic() - t0 < 10, "it waited for the boot"
    assert isinstance(outcome[0], ApiError) and outcome[0].body.code == "cancelled"
    assert "bangerd is stopping" in outcome[0].body.message
    assert vmm.procs == {}
    db.close()
