"""`PUT`/`GET /v1/vms/{ref}/files` and `banger vm cp` in one process: the real daemon app
on its socket, the real client and CLI (a subprocess), the guest's files kept by the
fake agent in a host directory (tests/fake_files.py)."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest

from banger.client.client import ApiError
from banger.client.files import TransferBroken
from tests.fake_files import FakeGuestFiles
from tests.integration.conftest import Daemon

pytestmark = pytest.mark.timeout(60)


def _files(daemon: Daemon) -> FakeGuestFiles:
    return daemon.service.host.agent.files  # type: ignore[attr-defined, no-any-return]


def _running(daemon: Daemon, name: str = "box") -> Path:
    """A running VM; its guest filesystem's root on the host."""
    vm = daemon.client.create({"name": name}, lambda _: None)
    (proc,) = [p for p in daemon.vmm.procs.values() if p.spec.vm_id == vm.id]
    return _files(daemon).root(proc.spec.runtime_dir / "agent.sock")


def _tar(entries: dict[str, bytes | None], mode: int = 0o644) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), mode
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _cli(*args: str, stdin: bytes = b"", cwd: Path | None = None
         ) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "banger.cli.main", *args], input=stdin,
                          capture_output=True, timeout=30, env=os.environ.copy(), cwd=cwd)


def test_put_then_get_round_trip(daemon: Daemon) -> None:
    root = _running(daemon)
    data = _tar({"d": None, "d/run.sh": b"#!/bin/sh\n"}, mode=0o755)
    answer = daemon.client.put_files("box", "/root/in", [data[:700], data[700:]])
    assert answer.path == "/root/in" and answer.bytes == len(data)
    assert (root / "root/in/d/run.sh").read_bytes() == b"#!/bin/sh\n"
    got = b"".join(daemon.client.get_files("box", "/root/in/d"))
    with tarfile.open(fileobj=io.BytesIO(got)) as tar:
        names = {m.name: m for m in tar}
    assert set(names) == {"d", "d/run.sh"} and names["d/run.sh"].mode & 0o777 == 0o755


def test_errors_before_the_stream_are_json_errors(daemon: Daemon) -> None:
    _running(daemon)
    with pytest.raises(ApiError, match="No such file") as e:
        list(daemon.client.get_files("box", "/nope"))
    assert e.value.body.code == "invalid"
    with pytest.raises(ApiError, match="path") as e:
        daemon.client.put_files("box", "rel", [_tar({"a": b"x"})])
    assert e.value.status == 422 and e.value.body.code == "invalid"
    daemon.client.create({"name": "off", "start": False}, lambda _: None)
    with pytest.raises(ApiError, match="not running") as e:
        list(daemon.client.get_files("off", "/root"))
    assert e.value.body.code == "conflict"
    with pytest.raises(ApiError, match="not running"):
        daemon.client.put_files("off", "/root", [b"x" * (1 << 20)] * 4)
    _files(daemon).no_files = True
    with pytest.raises(ApiError, match="restart the VM") as e:
        list(daemon.client.get_files("box", "/root"))
    assert e.value.body.code == "conflict"
    r = daemon.http.put("/v1/vms/box/files", params={"path": "/root"}, content=b"x",
                        headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "application/x-tar" in r.json()["error"]["message"]


def test_a_download_that_breaks_part_way_is_never_whole(daemon: Daemon) -> None:
    root = _running(daemon)
    (root / "big").write_bytes(os.urandom(1 << 20))
    _files(daemon).fail_get_after = 3
    got = bytearray()
    with pytest.raises(TransferBroken, match="the transfer broke"):
        for chunk in daemon.client.get_files("box", "/big"):
            got += chunk
    assert 0 < len(got) < (1 << 20)
    # Raw HTTP sees the same: the chunked response lacks its last chunk.
    import httpx
    with pytest.raises(httpx.RemoteProtocolError):
        daemon.http.get("/v1/vms/box/files", params={"path": "/big"}).read()


def test_the_routes_are_in_the_openapi_document(daemon: Daemon) -> None:
    doc = daemon.http.get("/openapi.json").json()
    put, get = doc["paths"]["/v1/vms/{ref}/files"]["put"], \
        doc["paths"]["/v1/vms/{ref}/files"]["get"]
    assert "application/x-tar" in put["requestBody"]["content"]
    assert "application/x-tar" in get["responses"]["200"]["content"]
    assert {p["name"] for p in get["parameters"]} == {"ref", "path"}


def _files_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("files-")]


def test_a_client_gone_mid_upload_leaves_no_thread_and_no_file(daemon: Daemon) -> None:
    root = _running(daemon)
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(daemon.layout.daemon_socket))
    s.sendall(b"PUT /v1/vms/box/files?path=/root/up HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/x-tar\r\nTransfer-Encoding: chunked\r\n\r\n")
    part = _tar({"f": b"y" * 100_000})[:50_000]
    s.sendall(b"%x\r\n%b\r\n" % (len(part), part))
    deadline = time.monotonic() + 5
    while not _files_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _files_threads(), "the upload never started"
    s.close()
    deadline = time.monotonic() + 10
    while _files_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _files_threads() == []
    assert _files(daemon).puts == [] and not (root / "root/up/f").exists()


def test_a_client_gone_mid_download_cancels_it(daemon: Daemon) -> None:
    root = _running(daemon)
    (root / "big").write_bytes(b"z" * (4 << 20))
    chunks = daemon.client.get_files("box", "/big")
    next(chunks)
    chunks.close()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while (_files_threads() or _files(daemon).gets_closed < 1) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _files_threads() == [] and _files(daemon).gets_closed == 1


def _tree(tmp: Path) -> Path:
    src = tmp / "tree"
    (src / "sub").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    (src / "sub" / "data").write_bytes(os.urandom(300_000))
    (src / "in").symlink_to("run.sh")
    (src / "out").symlink_to("/etc/hostname")
    return src


def _same(a: Path, b: Path) -> None:
    for p in sorted(a.rglob("*")):
        q = b / p.relative_to(a)
        sa, sb = p.lstat(), q.lstat()
        assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), p
        if p.is_symlink():
            assert os.readlink(p) == os.readlink(q)
            continue
        assert stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode), p
        if p.is_file():
            assert p.read_bytes() == q.read_bytes() and int(sa.st_mtime) == int(sb.st_mtime)


def test_cli_cp_both_ways_with_cp_semantics(daemon: Daemon, tmp_path: Path) -> None:
    root = _running(daemon)
    src = _tree(tmp_path)
    r = _cli("vm", "cp", str(src), "box:/root/x")
    assert r.returncode == 1 and b"is a directory: copy it with -r" in r.stderr
    assert _cli("vm", "cp", "-r", str(src), "box:/root/copy").returncode == 0  # new name
    _same(src, root / "root/copy")
    (root / "root/existing").mkdir()
    assert _cli("vm", "cp", "-r", str(src), "box:existing").returncode == 0  # inside
    _same(src, root / "root/existing/tree")
    assert _cli("vm", "cp", str(src / "run.sh"), "box:/root/renamed.sh").returncode == 0
    assert (root / "root/renamed.sh").stat().st_mode & 0o777 == 0o755
    # Out: to a new name, then into an existing directory.
    back = tmp_path / "back"
    r = _cli("vm", "cp", "box:/root/copy", str(back))
    assert r.returncode == 1 and b"is a directory: copy it with -r" in r.stderr
    assert not back.exists()
    r = _cli("vm", "cp", "-r", "--json", "box:/root/copy", str(back))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] > 300_000
    _same(src, back)
    into = tmp_path / "into"
    into.mkdir()
    assert _cli("vm", "cp", "-r", "box:copy", str(into)).returncode == 0
    _same(src, into / "copy")
    assert _cli("vm", "cp", "box:/root/renamed.sh", str(tmp_path / "one")).returncode == 0
    assert (tmp_path / "one").read_bytes() == b"#!/bin/sh\necho hi\n"


def test_cli_cp_streams_and_errors(daemon: Daemon, tmp_path: Path) -> None:
    root = _running(daemon)
    data = _tar({"s": None, "s/f": b"streamed"})
    assert _cli("vm", "cp", "-", "box:/root/st", stdin=data).returncode == 0
    assert (root / "root/st/s/f").read_bytes() == b"streamed"
    r = _cli("vm", "cp", "box:/root/st/s", "-")
    assert r.returncode == 0
    with tarfile.open(fileobj=io.BytesIO(r.stdout)) as tar:
        assert sorted(tar.getnames()) == ["s", "s/f"]
    r = _cli("vm", "cp", str(tmp_path / "missing"), "box:/root")
    assert r.returncode == 1 and b"no such file" in r.stderr
    r = _cli("vm", "cp", "box:/root/missing", str(tmp_path / "m"))
    assert r.returncode == 1 and b"No such file" in r.stderr
    r = _cli("vm", "cp", "a", "b")
    assert r.returncode == 2 and b"neither operand is in a VM" in r.stderr
    (root / "big").write_bytes(os.urandom(1 << 20))
    _files(daemon).fail_get_after = 3
    r = _cli("vm", "cp", "box:/big", str(tmp_path / "big"))
    assert r.returncode == 1 and b"the transfer broke" in r.stderr, r.stderr
    assert not (tmp_path / "big").exists()
    # A local path with a colon, written ./a:b.
    (tmp_path / "a:b").write_bytes(b"colon")
    assert _cli("vm", "cp", "./a:b", "box:/root/c", cwd=tmp_path).returncode == 0
    assert (root / "root/c").read_bytes() == b"colon"
