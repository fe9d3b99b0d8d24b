"""OCI layers applied into a rootfs directory (host/ocilayers.py): order, whiteouts, opaque
directories, links and modes kept; hostile entries refused with the entry named."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banger.host import ocilayers
from banger.host.ocilayers import LayerError, Rootfs

Entry = tuple[str, str, object]  # (name, kind, payload)


def _tar(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 1_000_000
            info.mode = 0o755 if kind == "dir" else 0o644
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "sym":
                info.type, info.linkname = tarfile.SYMTYPE, str(payload)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(payload)
            elif kind == "chr":
                info.type = tarfile.CHRTYPE
            else:
                data = payload if isinstance(payload, bytes) else b""
                if isinstance(payload, tuple):
                    data, info.mode, info.uid, info.gid = payload
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            tar.addfile(info)
    return buf.getvalue()


def _apply(root: Path, *layers: bytes) -> Rootfs:
    fs = Rootfs(root)
    for i, layer in enumerate(layers):
        fs.apply_stream(io.BytesIO(layer), f"L{i}")
    fs.finish()
    return fs


def test_layers_apply_in_order_with_whiteouts_and_opaque_dirs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    lower = _tar([("etc", "dir", None), ("etc/a", "file", b"a1"), ("etc/b", "file", b"b1"),
                  ("opt/x/1", "file", b"1"), ("opt/x/2", "file", b"2"),
                  ("bin/busybox", "file", (b"BB", 0o4755, 0, 0)),
                  ("bin/sh", "sym", "busybox"), ("bin/ls", "hard", "bin/busybox"),
                  ("home/u/f", "file", (b"u", 0o600, 1000, 1001))])
    upper = _tar([("etc/.wh.a", "file", b""), ("etc/b", "file", b"b2"),
                  ("opt/x/3", "file", b"3"), ("opt/x/sub/4", "file", b"4"),
                  ("opt/x/.wh..wh..opq", "file", b""),
                  ("etc/a.d", "dir", None)])
    fs = _apply(root, lower, upper)
    assert not (root / "etc/a").exists()
    assert (root / "etc/b").read_bytes() == b"b2"
    assert sorted(os.listdir(root / "opt/x")) == ["3", "sub"]  # the lower's gone, this layer's kept
    assert os.readlink(root / "bin/sh") == "busybox"
    assert os.stat(root / "bin/ls").st_ino == os.stat(root / "bin/busybox").st_ino
    assert stat.S_IMODE(os.stat(root / "bin/busybox").st_mode) == 0o4755
    assert stat.S_IMODE(os.stat(root / "home/u/f").st_mode) == 0o600
    assert os.stat(root / "etc/b").st_mtime == 1_000_000
    assert fs.owners == {"home/u/f": (1000, 1001)}


def test_a_later_layer_replaces_a_dir_with_a_file_and_back(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _apply(root, _tar([("d/f", "file", b"x")]), _tar([("d", "file", b"now a file")]),
           _tar([("d", "dir", None), ("d/g", "file", b"g")]))
    assert os.listdir(root / "d") == ["g"]


def test_gzip_and_zstd_layers(tmp_path: Path) -> None:
    raw = _tar([("a", "file", b"A")])
    gz = tmp_path / "l.gz"
    gz.write_bytes(gzip.compress(raw))
    zst = tmp_path / "l.zst"
    zst.write_bytes(subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True,
                                   check=True).stdout)
    plain = tmp_path / "l.tar"
    plain.write_bytes(raw)
    for blob in (gz, zst, plain):
        root = tmp_path / ("r" + blob.suffix)
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        Rootfs(root).apply(blob, digest=digest)
        assert (root / "a").read_bytes() == b"A"
        with pytest.raises(LayerError, match="does not match its digest"):
            Rootfs(tmp_path / ("bad" + blob.suffix)).apply(blob, digest="sha256:" + "0" * 64)


@pytest.mark.parametrize(("entries", "named"), [
    ([("../evil", "file", b"x")], "../evil"),
    ([("/abs", "file", b"x")], "/abs"),
    ([("a/../../evil", "file", b"x")], "a/../../evil"),
    ([("link", "sym", "/tmp"), ("link/evil", "file", b"x")], "link/evil"),
    ([("link", "sym", ".."), ("link/.wh.x", "file", b"")], "link/.wh.x"),
    ([("h", "hard", "../../etc/passwd")], "h"),
    ([("s", "sym", "/etc"), ("h", "hard", "s/passwd")], "h"),
    ([("dev/sda", "chr", None)], "dev/sda"),
])
def test_hostile_entries_are_refused_by_name(tmp_path: Path, entries: list[Entry],
                                             named: str) -> None:
    with pytest.raises(LayerError) as err:
        _apply(tmp_path / "root", _tar(entries))
    assert repr(named) in str(err.value)
    assert sorted(os.listdir(tmp_path)) == ["root"]


def test_a_huge_pax_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 8 << 30
    blob = header.tobuf(tarfile.GNU_FORMAT)  # no body: reading it would need 8 GiB
    with pytest.raises(LayerError, match="extended header"):
        _apply(tmp_path / "root", blob)


def test_a_truncated_layer_is_refused_naming_the_entry(tmp_path: Path) -> None:
    layer = _tar([("big", "file", b"x" * 100_000)])
    with pytest.raises(LayerError, match=r"'big'.*truncated"):
        _apply(tmp_path / "root", layer[:50_000])


_names = st.one_of(
    st.sampled_from(["a", "a/b", "a/b/c", "b", "a/.wh.b", "a/.wh..wh..opq", "../out/x",
                     "/abs", "./a/../../out"]),
    st.lists(st.sampled_from(["a", "b", "..", ".", "", "/", "out", ".wh.a",
                              ".wh..wh..opq"]), min_size=1, max_size=4).map("/".join))
_entry = st.tuples(_names, st.sampled_from(["file", "dir", "sym", "hard"]),
                   st.sampled_from(["../out", "../../out", "..", "/", "a", "a/b", "b",
                                    "../out/keep"]))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(st.lists(_entry, max_size=6), min_size=1, max_size=3))
def test_no_hostile_tar_writes_outside_the_root(tmp_path: Path,
                                                layers: list[list[Entry]]) -> None:
    base = tmp_path / "case"
    subprocess.run(["rm", "-rf", str(base)], check=True)
    (base / "out").mkdir(parents=True)
    (base / "out" / "keep").write_bytes(b"keep")
    root = base / "root"
    try:
        _apply(root, *(_tar(e) for e in layers))
    except LayerError as exc:
        assert "entry " in str(exc)
    assert sorted(os.listdir(base)) == ["out", "root"]
    assert os.listdir(base / "out") == ["keep"]
    assert (base / "out" / "keep").read_bytes() == b"keep"


_VALID = gzip.compress(_tar([("d", "dir", None), ("d/f", "file", b"x" * 3000),
                             ("d/l", "sym", "f"), ("d/h", "hard", "d/f")]), mtime=0)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=len(_VALID) - 1),
       flip=st.one_of(st.none(), st.tuples(st.integers(0, len(_VALID) - 1),
                                           st.integers(1, 255))))
def test_a_truncated_or_damaged_layer_fails_only_as_a_refusal(
        tmp_path: Path, cut: int, flip: tuple[int, int] | None) -> None:
    data = bytearray(_VALID[:cut] if flip is None else _VALID)
    if flip is not None:
        data[flip[0]] ^= flip[1]
    blob = tmp_path / "layer.gz"
    blob.write_bytes(bytes(data))
    digest = "sha256:" + hashlib.sha256(_VALID).hexdigest()
    root = tmp_path / "root"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    with pytest.raises(LayerError, match=r"^layer L: "):
        Rootfs(root).apply(blob, "application/vnd.oci.image.layer.v1.tar+gzip", "L",
                           digest=digest)


def _old_gnu_sparse(name: str, blocks: int) -> bytes:
    """A GNU 'S' member whose header says "extended" and ``blocks`` extension blocks that
    each say so again: tarfile would read them all into one list."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE
    head = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    head[-512 + 482] = 1
    h = memoryview(head)[-512:]
    h[148:156] = b"        "
    h[148:155] = b"%06o\0" % sum(h)
    ext = bytes(504) + b"\x01" + bytes(7)
    return bytes(head) + ext * blocks + bytes(512) * 2


def _pax_sparse(name: str, version: str, n: int) -> bytes:
    info = tarfile.TarInfo(name)
    body = b""
    if version == "0.0":
        info.pax_headers = {"GNU.sparse.size": str(n),
                            "GNU.sparse.numblocks": str(n)}
    elif version == "0.1":
        info.pax_headers = {"GNU.sparse.name": name, "GNU.sparse.realsize": str(n),
                            "GNU.sparse.map": ",".join(["0", "1"] * n)}
    else:
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": name, "GNU.sparse.realsize": str(n)}
        body = f"{n}\n".encode() + b"0\n1\n" * n
        body += bytes(-len(body) % 512)
    info.size = len(body)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(["s", "a/s", "usr/lib/x.so"]),
       kind=st.sampled_from(["S", "0.0", "0.1", "1.0"]), n=st.integers(1, 300))
def test_a_sparse_member_is_refused_before_tarfile_maps_it(
        tmp_path: Path, name: str, kind: str, n: int) -> None:
    layer = _old_gnu_sparse(name, n) if kind == "S" else _pax_sparse(name, kind, n)
    root = tmp_path / "root"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    with pytest.raises(LayerError, match="refused: a sparse member") as err:
        _apply(root, layer)
    assert repr(name) in str(err.value)


@pytest.mark.parametrize("mtime", ["nan", "inf"])
def test_a_header_tarfile_cannot_make_sense_of_is_a_refusal(tmp_path: Path,
                                                             mtime: str) -> None:
    info = tarfile.TarInfo("d")
    info.type, info.pax_headers = tarfile.DIRTYPE, {"mtime": mtime}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info)
    with pytest.raises(LayerError, match="damaged tar header"):
        _apply(tmp_path / "root", buf.getvalue())


def _zstd(raw: bytes) -> bytes:
    return subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True,
                          check=True).stdout


def test_a_zstd_layer_is_streamed_never_written_to_a_scratch_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-scratch-here"))
    blob = tmp_path / "l.zst"
    blob.write_bytes(_zstd(_tar([("a", "file", b"A" * 5000)])))
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    Rootfs(tmp_path / "root").apply(blob, digest=digest)
    assert (tmp_path / "root/a").read_bytes() == b"A" * 5000
    assert not (tmp_path / "no-scratch-here").exists()


def test_the_bytes_all_layers_write_are_capped(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocilayers, "MAX_TOTAL", 10_000)
    first = tmp_path / "1.zst"
    first.write_bytes(_zstd(_tar([("a", "file", b"A" * 6000)])))
    bomb = tmp_path / "2.zst"  # a few hundred bytes that would unpack to 256 MiB
    bomb.write_bytes(_zstd(_tar([("b", "file", bytes(256 << 20))])))
    fs = Rootfs(tmp_path / "root")
    fs.apply(first)
    with pytest.raises(LayerError, match=r"entry 'b' refused: the layers write more than "
                                         r"10000 bytes"):
        fs.apply(bomb)
    assert not (tmp_path / "root/b").exists()


def test_a_member_the_disk_has_no_room_for_is_refused(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ocilayers, "MIN_FREE", 1 << 60)
    with pytest.raises(LayerError, match=r"entry 'a' refused: it needs \d+ MiB free"):
        _apply(tmp_path / "root", _tar([("a", "file", b"A")]))


@pytest.mark.parametrize("cut", [0.3, 0.9])
def test_a_damaged_zstd_layer_is_a_refusal(tmp_path: Path, cut: float) -> None:
    data = _zstd(_tar([("a", "file", os.urandom(300_000))]))
    blob = tmp_path / "l.zst"
    blob.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(LayerError, match=r"^layer L: "):
        Rootfs(tmp_path / "root").apply(blob, "application/vnd.oci.image.layer.v1.tar+zstd",
                                        "L", digest="sha256:" + "0" * 64)


@pytest.mark.parametrize(("name", "why"), [
    ("/".join(["d"] * 129), "129 levels deep"),
    ("a/" + "x" * 256, "component over 255 bytes"),
])
def test_a_name_too_deep_or_long_to_walk_is_refused_by_name(tmp_path: Path, name: str,
                                                            why: str) -> None:
    with pytest.raises(LayerError, match=why) as err:
        _apply(tmp_path / "root", _tar([(name, "file", b"x")]))
    assert repr(name) in str(err.value)
    assert os.listdir(tmp_path / "root") == []


def test_owners_of_removed_paths_are_forgotten(tmp_path: Path) -> None:
    owned = (b"x", 0o644, 1000, 1000)
    lower = _tar([("home/u/.cache/a/f", "file", owned), ("home/u/keep", "file", owned),
                  ("opt/x/sub/f", "file", owned), ("d/f", "file", owned),
                  ("x/shadow", "file", owned)])
    upper = _tar([("home/u/.wh..cache", "file", b""), ("opt/x/.wh..wh..opq", "file", b""),
                  ("d", "file", b"now a file"), ("x", "sym", "/etc")])
    fs = _apply(tmp_path / "root", lower, upper)
    assert fs.owners == {"home/u/keep": (1000, 1000)}


_small = st.lists(st.sampled_from(["a", "b", ".wh.a", ".wh.b", ".wh..wh..opq"]),
                  min_size=1, max_size=3).map("/".join)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layers=st.lists(st.lists(st.tuples(_small, st.sampled_from(["file", "dir", "sym"]),
                                          st.booleans()), max_size=6), min_size=1,
                       max_size=3))
def test_every_recorded_owner_is_a_path_that_is_there(
        tmp_path: Path, layers: list[list[tuple[str, str, bool]]]) -> None:
    root = tmp_path / "root"
    subprocess.run(["rm", "-rf", str(root)], check=True)
    tars = [_tar([(n, k, (b"x", 0o644, 1000 if own else 0, 1000 if own else 0))
                  if k == "file" else (n, k, "a") for n, k, own in layer])
            for layer in layers]
    try:
        fs = _apply(root, *tars)
    except LayerError:
        return
    for rel in fs.owners:
        assert os.path.lexists(root / rel), rel
