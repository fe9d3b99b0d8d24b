"""`banger vm cp` on a real VM, through the daemon's files API and the guest agent: a
tree with exec bits, symlinks (one inside, one pointing out: kept as links), an empty
directory and a 20 MB file, in and back out with identical bytes, modes and links; a
file to a new name; `-` both ways; and the errors (a missing source, a directory without
-r, a stopped VM)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.e2e.conftest import Banger

pytestmark = pytest.mark.e2e


def _tree(tmp: Path) -> Path:
    src = tmp / "tree"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "run.sh").write_bytes(b"#!/bin/sh\necho ran\n")
    (src / "run.sh").chmod(0o755)
    (src / "sub" / "secret").write_bytes(b"only me\n")
    (src / "sub" / "secret").chmod(0o600)
    (src / "sub" / "deep" / "big").write_bytes(os.urandom(20 << 20))
    (src / "inside").symlink_to("sub/secret")
    (src / "outside").symlink_to("/etc/hostname")
    return src


def _same(a: Path, b: Path) -> None:
    names_a = sorted(str(p.relative_to(a)) for p in a.rglob("*"))
    names_b = sorted(str(p.relative_to(b)) for p in b.rglob("*"))
    assert names_a == names_b
    for name in names_a:
        p, q = a / name, b / name
        sa, sb = p.lstat(), q.lstat()
        assert stat.S_IFMT(sa.st_mode) == stat.S_IFMT(sb.st_mode), name
        if p.is_symlink():
            assert os.readlink(p) == os.readlink(q), name
            continue
        assert stat.S_IMODE(sa.st_mode) == stat.S_IMODE(sb.st_mode), name
        if p.is_file():
            assert p.read_bytes() == q.read_bytes(), name
            assert int(sa.st_mtime) == int(sb.st_mtime), name


def test_cp_round_trip_streams_and_errors(banger: Banger, tmp_path: Path) -> None:
    banger.run("vm", "run", "-d", "--name", "cp")
    src = _tree(tmp_path)
    banger.run("vm", "cp", "-r", str(src), "cp:/root/tree")
    # In the guest: the modes, the links as links, the big file's bytes.
    out = banger.run("vm", "exec", "cp", "--", "stat", "-c", "%n %a %F",
                     "/root/tree/run.sh", "/root/tree/sub/secret", "/root/tree/empty",
                     "/root/tree/outside").stdout.splitlines()
    assert out == ["/root/tree/run.sh 755 regular file",
                   "/root/tree/sub/secret 600 regular file",
                   "/root/tree/empty 755 directory",
                   "/root/tree/outside 777 symbolic link"]
    assert banger.run("vm", "exec", "cp", "--", "readlink", "/root/tree/outside"
                      ).stdout == "/etc/hostname\n"
    size = banger.run("vm", "exec", "cp", "--", "wc", "-c", "/root/tree/sub/deep/big")
    assert size.stdout.split()[0] == str(20 << 20)
    # Out again, to a new name: identical.
    back = tmp_path / "back"
    banger.run("vm", "cp", "-r", "cp:/root/tree", str(back))
    _same(src, back)
    # Into an existing directory: inside it, under its own name.
    into = tmp_path / "into"
    into.mkdir()
    banger.run("vm", "cp", "-r", "cp:tree", str(into))
    _same(src, into / "tree")
    # A file to a new name, both ways.
    banger.run("vm", "cp", str(src / "run.sh"), "cp:/root/renamed.sh")
    assert banger.run("vm", "exec", "cp", "--", "/root/renamed.sh").stdout == "ran\n"
    banger.run("vm", "cp", "cp:/root/renamed.sh", str(tmp_path / "again.sh"))
    assert (tmp_path / "again.sh").read_bytes() == b"#!/bin/sh\necho ran\n"
    assert (tmp_path / "again.sh").stat().st_mode & 0o777 == 0o755
    # `-` both ways: a tar on stdin, a tar on stdout.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("piped/x")
        info.size, info.mode = 5, 0o640
        tar.addfile(info, io.BytesIO(b"hello"))
    proc = subprocess.run(banger.argv("vm", "cp", "-", "cp:/root/st"), env=banger.env,
                          input=buf.getvalue(), capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(banger.argv("vm", "cp", "cp:/root/st/piped", "-"), env=banger.env,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        members = {m.name: m for m in tar}
        assert set(members) == {"piped", "piped/x"}
        assert members["piped/x"].mode & 0o777 == 0o640
        f = tar.extractfile(members["piped/x"])
        assert f is not None and f.read() == b"hello"
    # Errors: a missing source (either side), a directory without -r, a stopped VM.
    r = banger.run("vm", "cp", str(tmp_path / "nope"), "cp:/root", check=False)
    assert r.returncode == 1 and "no such file" in r.stderr, r.stderr
    r = banger.run("vm", "cp", "cp:/root/nope", str(tmp_path / "n"), check=False)
    assert r.returncode == 1 and "No such file" in r.stderr, r.stderr
    r = banger.run("vm", "cp", str(src), "cp:/root/x", check=False)
    assert r.returncode == 1 and "copy it with -r" in r.stderr, r.stderr
    r = banger.run("vm", "cp", "cp:/root/tree", str(tmp_path / "x"), check=False)
    assert r.returncode == 1 and "copy it with -r" in r.stderr, r.stderr
    assert not (tmp_path / "x").exists()
    banger.run("vm", "stop", "cp")
    r = banger.run("vm", "cp", str(src / "run.sh"), "cp:/root/y", check=False)
    assert r.returncode == 1 and "not running" in r.stderr, r.stderr
