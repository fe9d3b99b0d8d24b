"""A guest whose agent breaks the protocol on purpose, on real VMs under one daemon.

In VM ``bad`` the real agent is replaced by a hostile speaker (tests/e2e/hostile_agent.c,
built static here and copied in with `vm cp`): it is installed over
/usr/local/sbin/banger-agent and the agent is killed, so the guest's init (busybox,
``::respawn:``) starts the hostile one on the agent's virtio-serial port. An exec of
`hostile-mode MODE` picks how it answers everything else: an absurd frame length, bytes
that are no frame, terminal escapes in a well-formed error, output for a chan that does
not exist, a field longer than its frame, a HELLO of another protocol, a HELLO with a
field that claims 2 GiB, and a frame cut short followed by silence.

For each: `vm exec bad -- true`, `vm stats bad` and `vm cp` both ways end within a bound with a
clear error that names the VM (exit 1, no traceback, no byte of the guest's escapes on
the terminal), while `vm exec good -- echo ok` keeps answering the whole time (a thread
runs it over and over), the daemon keeps no thread of the hostile VM, and `vm list` /
`vm delete bad` work at the end.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import Banger

pytestmark = pytest.mark.e2e

SOURCE = Path(__file__).with_name("hostile_agent.c")


@pytest.fixture(scope="module")
def hostile_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc is not None, "gcc builds the guest agent too: it must be installed"
    out = tmp_path_factory.mktemp("hostile") / "hostile-agent"
    subprocess.run([gcc, "-static", "-O1", "-Wall", "-Werror", "-o", str(out), str(SOURCE)],
                   check=True, capture_output=True, timeout=120)
    return out


@dataclass
class Result:
    rc: int
    out: bytes
    err: bytes
    took: float


def run(banger: Banger, *args: str, timeout: float = 120) -> Result:
    started = time.monotonic()
    proc = subprocess.run(banger.argv(*args), env=banger.env, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=timeout, cwd="/")
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)


def clean(data: bytes) -> str:
    """``data`` as text, asserting it holds nothing a terminal would act on: printable
    ASCII, newlines and tabs only (the hostile guest sends escapes, BEL, CR, bad UTF-8)."""
    bad = sorted({b for b in data if not (32 <= b < 127 or b in b"\n\t")})
    assert not bad, f"unsanitised bytes {bad} reached the terminal: {data!r}"
    return data.decode()


def fails_clearly(r: Result, within: float, *words: str) -> str:
    """``r`` failed (exit 1) within ``within`` s with an error naming VM ``bad`` and
    holding each of ``words``; its stderr."""
    err = clean(r.err)
    clean(r.out)
    assert r.rc == 1, (r.rc, err)
    assert r.took < within, f"took {r.took:.1f} s (bound {within} s): {err}"
    assert "Traceback" not in err, err
    assert "'bad'" in err, f"the error does not name the VM: {err}"
    for w in words:
        assert w in err, f"{w!r} not in: {err}"
    return err


class Neighbour(threading.Thread):
    """`vm exec good -- echo ok`, over and over until stopped: every answer, and the
    slowest."""

    def __init__(self, banger: Banger) -> None:
        super().__init__(daemon=True)
        self.banger = banger
        self.stop = threading.Event()
        self.results: list[Result] = []

    def run(self) -> None:
        while not self.stop.is_set():
            self.results.append(run(self.banger, "vm", "exec", "good", "--", "echo", "ok",
                                    timeout=60))

    def check(self) -> None:
        self.stop.set()
        self.join(90)
        assert self.results, "the neighbour never ran"
        for r in self.results:
            assert (r.rc, r.out) == (0, b"ok\n"), (r.rc, r.out, r.err)
        slowest = max(r.took for r in self.results)
        assert slowest < 10, f"an exec in the other VM took {slowest:.1f} s"
        print(f"neighbour: {len(self.results)} execs, slowest {slowest:.2f} s")


def set_mode(banger: Banger, mode: str, *extra: str) -> None:
    r = run(banger, "vm", "exec", "bad", "--", "hostile-mode", mode, *extra)
    assert r.rc == 0, (mode, r.rc, r.err)
    assert r.took < 10, f"the VM's next command took {r.took:.1f} s after a hostile one"


def test_a_hostile_agent_costs_the_daemon_nothing(banger: Banger, hostile_agent: Path,
                                                  tmp_path: Path) -> None:
    banger.run("vm", "run", "-d", "--name", "bad")
    banger.run("vm", "run", "-d", "--name", "good")
    banger.run("vm", "cp", str(hostile_agent), "bad:/root/")
    # Over the agent's binary (a rename: the running one stays intact), then the agent
    # killed under this very exec: init respawns the hostile one, whose HELLO ends it.
    r = run(banger, "vm", "exec", "bad", "--", "sh", "-c",
            "mv /root/hostile-agent /usr/local/sbin/banger-agent && kill -KILL $PPID")
    assert r.rc == 1 and b"guest agent restarted" in r.err, r.err
    set_mode(banger, "honest")
    r = run(banger, "vm", "exec", "bad", "--", "true")
    assert r.rc == 1 and b"honest mode" in r.err, r.err  # the hostile speaker answers

    daemon = banger.daemon_pid()
    assert daemon is not None
    threads = threads_of(daemon)
    payload = tmp_path / "payload"
    payload.write_bytes(b"x" * 1000)
    neighbour = Neighbour(banger)
    neighbour.start()
    try:
        for mode, words in CASES:
            hello = mode.startswith("hello-")
            # A lying HELLO lasts LIE seconds, then the speaker is honest again.
            set_mode(banger, mode, *([str(LIE)] if hello else []))
            since = time.monotonic()
            print(mode, fails_clearly(run(banger, "vm", "exec", "bad", "--", "true"),
                                      20, *words))
            print(mode, fails_clearly(run(banger, "vm", "stats", "bad"), 20, *words))
            print(mode, fails_clearly(run(banger, "vm", "cp", str(payload), "bad:/root/"),
                                      20, *words))
            print(mode, fails_clearly(run(banger, "vm", "cp", "bad:/etc/hostname",
                                          str(tmp_path / "out")), 20, *words))
            if hello:
                assert time.monotonic() - since < LIE, "too slow: the lie was over"
                time.sleep(max(0.0, LIE + 1 - (time.monotonic() - since)))
        # A connection broken, then no HELLO on the next one: that wait holds only this
        # VM's channel (the neighbour goes on meanwhile).
        set_mode(banger, "mute", str(MUTE))
        since = time.monotonic()
        print("mute", fails_clearly(run(banger, "vm", "stats", "bad"), 20,
                                    "broke the protocol"))
        print("mute", fails_clearly(run(banger, "vm", "exec", "bad", "--", "true"), 25,
                                    "did not answer", "no HELLO"))
        assert time.monotonic() - since < MUTE, "too slow: the silence was over"
        time.sleep(max(0.0, MUTE + 1 - (time.monotonic() - since)))
        # Last: a frame cut short, then silence. Each wait ends at its timeout.
        set_mode(banger, "stall")
        print("stall", fails_clearly(run(banger, "vm", "exec", "bad", "--", "true"), 25,
                                     "not started within"))
        print("stall", fails_clearly(run(banger, "vm", "stats", "bad"), 25, "within"))
        listed = banger.json("vm", "list")
        assert isinstance(listed, list) and {v["name"] for v in listed} == {"bad", "good"}
        r = run(banger, "vm", "delete", "bad", timeout=120)
        assert r.rc == 0, r.err
        print(f"delete of the stalled VM: {r.took:.1f} s")
    finally:
        neighbour.check()
    assert run(banger, "vm", "exec", "good", "--", "echo", "ok").out == b"ok\n"
    # Every broken connection's reader (and whatever else served the hostile VM) ended.
    deadline = time.monotonic() + 10
    while threads_of(daemon) > threads and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"daemon threads: {threads} before the hostile cases, {threads_of(daemon)} after")
    assert threads_of(daemon) <= threads, "the daemon kept threads of the hostile VM"


def threads_of(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


LIE = 12  # seconds
MUTE = 20  # seconds: the exec waits 15 s for a HELLO

# (mode, what the error must say)
CASES = [
    ("absurd", ["broke the protocol", "frame of 4294967280 bytes (cap 65541)"]),
    ("garbage", ["broke the protocol", "(cap 65541)"]),
    # A well-formed refusal: said, with the guest's escapes escaped.
    ("badmsg", ["\\x1b[2J", "pwned"]),
    ("nochan", ["broke the protocol", "which has no exec or request open"]),
    ("badfields", ["broke the protocol"]),
    ("hello-proto", ["protocol 2"]),
    ("hello-huge", ["claims 2147483632 bytes"]),
]
