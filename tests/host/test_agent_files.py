"""Files as tar streams through the real ``banger-agent`` (FILE_PUT, FILE_GET) driven by
banger's AgentConnection over a socketpair: round trips that keep modes, symlinks, empty
directories, long names and big files; hostile tars refused with nothing written outside
the destination; a host that goes away part way."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentconn import running_agent

from banger.host.agent_client import AgentConnection
from banger.host.agent_records import AgentError, AgentRequestError

pytestmark = pytest.mark.host
LONG = "d" * 120 + "/" + "f" * 130  # over ustar's 100 and 155: a pax path


@pytest.fixture
def conn() -> Iterator[AgentConnection]:
    with running_agent("files") as c:
        yield c


def make_tree(root: Path) -> Path:
    top = root / "tree"
    (top / "bin").mkdir(parents=True)
    (top / "empty" / "deeper").mkdir(parents=True)
    (top / "bin" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(top / "bin" / "run.sh", 0o750)
    (top / "ro.txt").write_text("read only")
    os.chmod(top / "ro.txt", 0o444)
    (top / "big.bin").write_bytes(os.urandom(20 << 20))
    os.symlink("bin/run.sh", top / "inside")
    os.symlink("/etc/passwd", top / "outside")  # kept as a link, never followed
    (top / LONG).parent.mkdir(parents=True)
    (top / LONG).write_bytes(b"long name")
    os.link(top / "ro.txt", top / "hard")
    os.utime(top / "bin" / "run.sh", (1_600_000_000, 1_600_000_000))
    return top


def snapshot(top: Path) -> dict[str, tuple[str, int, str]]:
    """name -> (kind, mode, content digest or link target); mtimes of files too."""
    out: dict[str, tuple[str, int, str]] = {}
    for path in sorted([top, *top.rglob("*")]):
        rel = str(path.relative_to(top))
        st = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", 0, os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", st.st_mode & 0o7777, "")
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[rel] = ("file", st.st_mode & 0o7777, f"{digest}@{int(st.st_mtime)}")
    return out


def tar_of(top: Path, fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        tf.add(top, arcname=top.name)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_put_then_get_round_trips_a_tree(conn: AgentConnection, tmp_path: Path,
                                         fmt: int) -> None:
    top = make_tree(tmp_path / "src")
    dest = tmp_path / "new" / "dest"  # missing: made, like mkdir -p
    conn.put_tar(str(dest), io.BytesIO(tar_of(top, fmt)), timeout=30)
    assert snapshot(dest / "tree") == snapshot(top)
    assert os.readlink(dest / "tree" / "outside") == "/etc/passwd"
    assert (dest / "tree" / "hard").stat().st_ino == (dest / "tree" / "ro.txt").stat().st_ino
    # Back out: Python's tarfile reads what the agent writes, pax long names included.
    chunks = list(conn.get_tar(str(dest / "tree"), timeout=30))
    assert max(len(c) for c in chunks) <= 65536
    back = tmp_path / "back"
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks))) as tf:
        names = tf.getnames()
        tf.extractall(back, filter="tar")
    assert names[0] == "tree" and f"tree/{LONG}" in names
    assert snapshot(back / "tree") == snapshot(top)


def test_get_of_one_file_and_of_a_missing_path(conn: AgentConnection, tmp_path: Path) -> None:
    (tmp_path / "one").write_bytes(b"x" * 1000)
    with tarfile.open(fileobj=io.BytesIO(b"".join(conn.get_tar(str(tmp_path / "one"), 10)))
                      ) as tf:
        [member] = tf.getmembers()
        assert (member.name, member.size) == ("one", 1000)
    with pytest.raises(AgentRequestError, match="No such file or directory"):
        list(conn.get_tar(str(tmp_path / "nothing"), 10))
    assert conn.ping(5) < 5


def hostile(*entries: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in entries:
            info.size = len(data or b"")
            tf.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


HOSTILE = {
    "dotdot": (hostile((entry("../x"), b"evil")), "'..' component"),
    "deep dotdot": (hostile((entry("a/../../x"), b"evil")), "'..' component"),
    "absolute": (hostile((entry("/tmp/x"), b"evil")), "an absolute name"),
    "through a symlink": (hostile((entry("link", tarfile.SYMTYPE, ".."), None),
                                  (entry("link/x"), b"evil")),
                          "a parent is a symlink"),
    "device": (hostile((entry("dev", tarfile.CHRTYPE), None)), "device node or fifo"),
    "fifo": (hostile((entry("fifo", tarfile.FIFOTYPE), None)), "device node or fifo"),
    "hard link out": (hostile((entry("h", tarfile.LNKTYPE, "../x"), None)), "'..' component"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tars_are_refused(conn: AgentConnection, tmp_path: Path, case: str) -> None:
    data, message = HOSTILE[case]
    dest = tmp_path / "in" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(AgentRequestError, match=message):
        conn.put_tar(str(dest), [data], timeout=10)
    outside = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert [p for p in outside if not p.startswith("in/dest")] == ["in"]
    assert not any(p.name.startswith(".banger-put") for p in dest.rglob("*"))
    assert conn.ping(5) < 5, "the connection serves on"


def test_a_huge_size_or_a_truncated_stream_leaves_no_file(conn: AgentConnection,
                                                          tmp_path: Path) -> None:
    data = hostile((entry("f"), os.urandom(10_000)))
    header = bytearray(data[:512])  # the file's ustar header
    cut = data[:1024 + 3000]
    with pytest.raises(AgentRequestError, match="truncated"):
        conn.put_tar(str(tmp_path), [cut], timeout=10)
    # A header claiming 8 GiB - 1, followed by nothing: refused as truncated too.
    info = entry("huge")
    info.size = 0o77777777777
    huge = info.tobuf(tarfile.USTAR_FORMAT)
    with pytest.raises(AgentRequestError, match="truncated"):
        conn.put_tar(str(tmp_path), [huge, b"x" * 100], timeout=10)
    header[10] ^= 0xFF  # a corrupt checksum
    with pytest.raises(AgentRequestError, match="checksum"):
        conn.put_tar(str(tmp_path), [bytes(header)], timeout=10)
    # GNU base-256 lets a header claim 2^60 bytes: refused before anything is made.
    info = entry("vast")
    info.size = 1 << 60
    with pytest.raises(AgentRequestError, match="a size over 2\\^50"):
        conn.put_tar(str(tmp_path), [info.tobuf(tarfile.GNU_FORMAT)], timeout=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_host_that_leaves_mid_put_or_mid_get(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 << 20))
    dest = tmp_path / "dest"
    with running_agent("leaving") as c:
        it = c.get_tar(str(big), timeout=10)
        next(it)  # the get is under way, and the guest waits for credit
        seen: list[str] = []

        def source() -> Iterator[bytes]:
            data = tar_of(big, tarfile.PAX_FORMAT)
            yield data[:300_000]
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                seen.extend(p.name for p in dest.iterdir() if p.name.startswith(".banger-put"))
                time.sleep(0.05)
            c.close()  # the host goes away with the file half written
            yield data[300_000:]

        with pytest.raises(AgentError):
            c.put_tar(str(dest), source(), timeout=10)
    assert seen, "the half file was there under a temporary name"
    assert sorted(p.name for p in dest.iterdir()) == [], \
        "the agent removes the half file when the host goes away; no final name"


def test_mutated_tars_end_in_done_or_a_clear_error(conn: AgentConnection,
                                                   tmp_path: Path) -> None:
    # The agent's tar reader fuzzed: random bytes of a valid archive flipped, cut or
    # repeated. Each put ends in DONE or ERROR, the agent lives, and nothing is written
    # outside the destination.
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / ("n" * 120)).write_bytes(b"x" * 3000)
    os.symlink("/etc", src / "d" / "link")
    (src / "d" / "f").write_text("f")
    valid = [tar_of(src / "d", fmt) for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT)]
    rng = random.Random(4321)
    outcomes = set()
    for i in range(300):
        data = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.6:
                data[pos] = rng.randrange(256)
            elif choice < 0.8:
                data[pos:pos + 8] = rng.choice([b"../../x\0", b"/abs\0\0\0\0", b"7777777\0",
                                                b"\x80" + bytes(7), b"link/esc"])
            else:
                del data[pos:]
        dest = tmp_path / "out" / str(i)
        try:
            conn.put_tar(str(dest), [bytes(data)], timeout=10)
            outcomes.add("done")
        except AgentRequestError as exc:
            assert "refused FILE_PUT" in str(exc)
            outcomes.add("error")
    assert outcomes == {"done", "error"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        str(i) for i in range(300))
    assert conn.ping(5) < 5


def test_numeric_owners_come_from_the_tar_as_root(conn: AgentConnection,
                                                  tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the host tests run as root here, like the agent in a guest"
    info = entry("owned")
    info.uid, info.gid, info.uname, info.gname = 1234, 5678, "nobody-here", "nogroup-here"
    info.mtime = 1_500_000_000
    conn.put_tar(str(tmp_path), [hostile((info, b"mine"))], timeout=10)
    st = (tmp_path / "owned").stat()
    assert (st.st_uid, st.st_gid, int(st.st_mtime)) == (1234, 5678, 1_500_000_000)


def _agent_pid() -> int:
    """The pid of this test's banger-agent (a child of this process)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_bytes()  # a name is any bytes
        except OSError:
            continue
        comm, rest = stat[stat.index(b"(") + 1:stat.rindex(b")")], stat[stat.rindex(b")") + 2:]
        if comm == b"banger-agent" and int(rest.split()[1]) == os.getpid():
            return int(d.name)
    raise AssertionError("no banger-agent child")


def test_a_put_is_not_refused_by_the_temporary_files_of_a_killed_agent(
        conn: AgentConnection, tmp_path: Path) -> None:
    # A VM killed during a put leaves the agent's temporary files; the agent starts early
    # at every boot, so with the same pid, and its names count from 0 again: the same
    # copy, tried again, must not fail on them ("File exists").
    pid = _agent_pid()
    dest = tmp_path / "dest"
    dest.mkdir()
    top = tmp_path / "src" / "t"
    top.mkdir(parents=True)
    (top / "file").write_text("data")
    os.symlink("file", top / "link")
    os.link(top / "file", top / "hard")
    (dest / "t").mkdir()
    for n in range(8):
        (dest / "t" / f".banger-put.{pid}.{n}").write_bytes(b"left by a killed agent")
    conn.put_tar(str(dest), [tar_of(top, tarfile.PAX_FORMAT)], timeout=10)
    assert (dest / "t" / "file").read_text() == "data"
    assert os.readlink(dest / "t" / "link") == "file"
    assert (dest / "t" / "hard").read_text() == "data"


def test_a_long_error_cut_inside_a_character_is_still_an_error(conn: AgentConnection,
                                                               tmp_path: Path) -> None:
    # An ERROR's message is cut at the agent's buffer (~511 bytes); a path of non-ASCII
    # characters in it must not be cut inside one: the host would take the answer as a
    # broken protocol and drop the connection (and every exec on it).
    (tmp_path / "file").write_text("not a directory")
    for pad in ("", "a"):
        dest = str(tmp_path / "file" / (pad + "é" * 300))
        with pytest.raises(AgentRequestError, match="refused FILE_PUT"):
            conn.put_tar(dest, [b"\0" * 1024], timeout=10)
        assert conn.failure is None
