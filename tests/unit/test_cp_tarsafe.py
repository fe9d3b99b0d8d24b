"""The host's extraction of a tar from a guest (cli/tarsafe.py): hostile tars never write
outside the destination (hypothesis), links stay links, exec bits stay, setuid goes, and
each refusal names its entry."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banger.cli.tarsafe import MAX_HEADER, UnsafeTar, extract
from banger.local.tarwrite import tar_stream, walk


def _member(name: str, kind: str = "file", data: bytes = b"x", mode: int = 0o644,
            link: str = "") -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.mode, info.mtime = mode, 1_000_000
    if kind == "file":
        info.size = len(data)
        return info, data
    info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
                 "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}[kind]
    info.linkname = link
    return info, None


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _extract(data: bytes, dest: Path, top: str | None = None) -> None:
    extract(io.BytesIO(data), dest, top=top)


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    d = tmp_path / "dest"
    d.mkdir()
    return d


def test_modes_links_and_dirs_are_kept(dest: Path) -> None:
    _extract(_tar([_member("t", "dir", mode=0o750), _member("t/run", data=b"#!", mode=0o755),
                   _member("t/suid", mode=0o4755), _member("t/in", "sym", link="run"),
                   _member("t/out", "sym", link="/etc/passwd"),
                   _member("t/up", "sym", link="../../x")]), dest)
    t = dest / "t"
    assert stat.S_IMODE(t.stat().st_mode) == 0o750 and t.stat().st_mtime == 1_000_000
    assert stat.S_IMODE((t / "run").stat().st_mode) == 0o755
    assert stat.S_IMODE((t / "suid").stat().st_mode) == 0o755  # setuid dropped
    assert os.readlink(t / "in") == "run" and os.readlink(t / "out") == "/etc/passwd"
    assert os.readlink(t / "up") == "../../x"


def test_top_renames_the_copy(dest: Path) -> None:
    _extract(_tar([_member("a", "dir"), _member("a/f", data=b"1")]), dest, top="b")
    assert (dest / "b" / "f").read_bytes() == b"1" and not (dest / "a").exists()
    with pytest.raises(UnsafeTar, match="entry c: outside the copied tree a"):
        _extract(_tar([_member("a", "dir"), _member("c")]), dest, top="b")


@pytest.mark.parametrize(("members", "message"), [
    ([_member("/etc/x")], "entry /etc/x: an absolute name"),
    ([_member("a/../../x")], "entry a/../../x: a '..' component"),
    ([_member("l", "sym", link="/tmp"), _member("l/x")],
     "entry l/x: l on its path is a symlink"),
    ([_member("h", "hard", link="etc/passwd")], "entry h: a hard link"),
    ([_member("dev", "chr")], "entry dev: a device node"),
    ([_member("p", "fifo")], "entry p: a fifo"),
    ([_member("\x1b[2J/../x")], r"entry \\x1b\[2J/\.\./x: a '\.\.' component"),
])
def test_refusals_name_the_entry(dest: Path, members: list[tuple[tarfile.TarInfo, bytes]],
                                 message: str) -> None:
    with pytest.raises(UnsafeTar, match=message):
        _extract(_tar(members), dest)


def test_an_existing_symlink_is_replaced_not_followed(dest: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (dest / "f").symlink_to(victim)
    _extract(_tar([_member("f", data=b"new")]), dest)
    assert victim.read_bytes() == b"keep" and (dest / "f").read_bytes() == b"new"
    assert not (dest / "f").is_symlink()
    (dest / "d").symlink_to(tmp_path)
    with pytest.raises(UnsafeTar, match="entry d: a non-directory is in the way"):
        _extract(_tar([_member("d", "dir")]), dest)


def test_a_huge_extension_header_is_refused_unread(dest: Path) -> None:
    info = tarfile.TarInfo("x")
    info.pax_headers = {"comment": "c" * (MAX_HEADER + 10)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(UnsafeTar, match="extension header"):
        _extract(buf.getvalue(), dest)


def test_a_truncated_tar_is_an_error(dest: Path) -> None:
    data = _tar([_member("f", data=b"y" * 5000)])
    with pytest.raises(UnsafeTar, match="not valid"):
        _extract(data[:2048], dest)


def test_what_vm_cp_sends_extracts_back_the_same(tmp_path: Path, dest: Path) -> None:
    src = tmp_path / "src"
    (src / "e").mkdir(parents=True)
    (src / "x").write_bytes(b"exe")
    (src / "x").chmod(0o751)
    (src / "h").hardlink_to(src / "x")
    (src / "l").symlink_to("/nowhere")
    _extract(b"".join(tar_stream(walk(src, "copy", skip_special=True), root_owned=False,
                                 hard_links=False)), dest)
    c = dest / "copy"
    assert (c / "e").is_dir() and (c / "h").read_bytes() == b"exe"
    assert stat.S_IMODE((c / "x").stat().st_mode) == 0o751
    assert os.readlink(c / "l") == "/nowhere"


# --- hypothesis: whatever the tar, nothing outside dest changes ---------------------------

_comp = st.sampled_from(["a", "b", "..", ".", "", "l", "d", "/"])
_names = st.lists(_comp, min_size=1, max_size=4).map("/".join)
_links = st.sampled_from(["..", "../..", "/", "/tmp", "a", "../outside", "l", ".", "d/.."])
_kinds = st.sampled_from(["file", "dir", "sym", "hard", "chr", "fifo"])
_modes = st.sampled_from([0o644, 0o755, 0o4755, 0o2777, 0o1777, 0o000])
_members = st.lists(st.tuples(_names, _kinds, _links, _modes), min_size=1, max_size=8)


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, bytes | str | None]]:
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p == skip or skip in p.parents:
                continue
            s = p.lstat()
            body: bytes | str | None = None
            if stat.S_ISREG(s.st_mode):
                body = p.read_bytes()
            elif stat.S_ISLNK(s.st_mode):
                body = os.readlink(p)
            out[str(p.relative_to(root))] = (s.st_mode, body)
    return out


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="tarsafe-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(members=_members, top=st.sampled_from([None, "new"]))
def test_hostile_tars_never_write_outside_dest(
        sandbox: Path, members: list[tuple[str, str, str, int]], top: str | None) -> None:
    for p in sandbox.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    (sandbox / "outside").mkdir()
    (sandbox / "outside" / "a").write_bytes(b"keep")
    (sandbox / "sibling").write_bytes(b"keep")
    dest = sandbox / "dest"
    dest.mkdir()
    (dest / "l").symlink_to(sandbox / "outside")  # a user's own link, already there
    before = _snapshot(sandbox, dest)
    tar = _tar([_member(n, k, data=b"payload", mode=m, link=ln)
                for n, k, ln, m in members])
    with contextlib.suppress(UnsafeTar):
        _extract(tar, dest, top=top)
    assert _snapshot(sandbox, dest) == before
    for dirpath, dirnames, filenames in os.walk(dest):
        for n in dirnames + filenames:
            s = (Path(dirpath) / n).lstat()
            assert stat.S_IFMT(s.st_mode) in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK)
            assert not s.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
