"""The one writer of host files as a tar stream (local/tarwrite.py), behind the workspace
push, `[[file_sync]]` and `vm cp` uploads: whatever the tree, the tar holds it as it is
(hypothesis), links stay links and are never read through, specials are refused or left
out, a file swapped under the writer is an error, and the reader leaving stops it."""

from __future__ import annotations

import io
import os
import socket
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from banger.local.tarwrite import CHUNK, QUEUED, TarItem, tar_stream, walk


def _members(chunks: Iterator[bytes]) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r:") as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isreg() else None
            out.append((m, f.read() if f else None))
    return out


def _names(items: Iterator[TarItem]) -> list[str]:
    return [i.name for i in items]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "b" / "c").mkdir(parents=True)
    (root / "a.txt").write_text("a")
    (root / "b" / "c" / "run").write_bytes(b"#!")
    (root / "b" / "c" / "run").chmod(0o751)
    (root / "b" / "in").symlink_to("c/run")
    (root / "out").symlink_to(tmp_path)  # a link to a directory outside: not entered
    (tmp_path / "secret").write_text("not in the tar")
    os.mkfifo(root / "b" / "fifo")
    return root


def test_walk_lists_parents_first_by_name_and_never_enters_a_link(tree: Path) -> None:
    assert _names(walk(tree)) == ["a.txt", "b", "b/c", "b/c/run", "b/fifo", "b/in", "out"]
    assert _names(walk(tree, "t", skip_special=True)) == [
        "t", "t/a.txt", "t/b", "t/b/c", "t/b/c/run", "t/b/in", "t/out"]
    assert _names(walk(tree / "a.txt", "one")) == ["one"]
    assert _names(walk(tree / "out", "link")) == ["link"], "a top link is not entered"


def test_the_tar_keeps_modes_links_and_bytes_and_says_the_owner(tree: Path) -> None:
    (tree / "b" / "fifo").unlink()
    got = {m.name: (m, data) for m, data in _members(
        tar_stream(walk(tree, "t"), root_owned=False, hard_links=True))}
    run, data = got["t/b/c/run"]
    assert data == b"#!" and stat.S_IMODE(run.mode) == 0o751 and run.uid == os.getuid()
    assert got["t/b/in"][0].issym() and got["t/b/in"][0].linkname == "c/run"
    out = got["t/out"][0]
    assert out.issym() and out.linkname == str(tree.parent), "kept as a link, not read"
    assert all(m.uid == 0 and m.gid == 0 and m.uname == "root" for m, _ in _members(
        tar_stream(walk(tree), root_owned=True, hard_links=True)))


def test_an_items_mode_wins(tree: Path) -> None:
    [(m, data)] = _members(tar_stream([TarItem(tree / "a.txt", "etc/x", 0o600)],
                                      root_owned=True, hard_links=True))
    assert (m.name, stat.S_IMODE(m.mode), data) == ("etc/x", 0o600, b"a")


def test_hard_links_stay_links_or_go_in_as_files(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"same inode")
    (tmp_path / "y").hardlink_to(tmp_path / "x")
    linked = _members(tar_stream(walk(tmp_path), root_owned=True, hard_links=True))
    assert [(m.name, m.islnk(), m.linkname) for m, _ in linked] == [
        ("x", False, ""), ("y", True, "x")]
    copied = _members(tar_stream(walk(tmp_path), root_owned=False, hard_links=False))
    assert [(m.name, m.isreg(), d) for m, d in copied] == [
        ("x", True, b"same inode"), ("y", True, b"same inode")]


def test_fifos_sockets_and_devices_are_refused_naming_them(tree: Path) -> None:
    with pytest.raises(OSError, match=r"fifo.*device or fifo"):
        b"".join(tar_stream(walk(tree), root_owned=True, hard_links=True))
    with pytest.raises(OSError, match=r"null.*device or fifo"):
        b"".join(tar_stream([TarItem(Path("/dev/null"), "null")], root_owned=True,
                            hard_links=True))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tree / "zz.sock"))
        with pytest.raises(OSError, match=r"zz\.sock is not a file"):
            b"".join(tar_stream([TarItem(tree / "zz.sock", "zz")], root_owned=False,
                                hard_links=False))
        skipped = _members(tar_stream(walk(tree, "t", skip_special=True),
                                      root_owned=False, hard_links=False))
        assert {"t/b/fifo", "t/zz.sock"}.isdisjoint(m.name for m, _ in skipped)


def _swapped_after_lstat(monkeypatch: pytest.MonkeyPatch, path: Path,
                         swap: Callable[[], None]) -> None:
    """``path`` is swapped just after the writer's lstat of it: the race's window."""
    real = os.lstat

    def lstat(p: Any, *args: Any, **kw: Any) -> os.stat_result:
        got = real(p, *args, **kw)
        if Path(p) == path:
            monkeypatch.setattr(os, "lstat", real)
            swap()
        return got

    monkeypatch.setattr(os, "lstat", lstat)


def test_a_file_swapped_for_a_link_is_not_read_through(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tree / "b" / "c" / "run"

    def swap() -> None:
        run.unlink()
        run.symlink_to(tree.parent / "secret")

    _swapped_after_lstat(monkeypatch, run, swap)
    chunks: list[bytes] = []
    with pytest.raises(OSError, match="run changed while it was being read"):
        chunks.extend(tar_stream([TarItem(run, "run")], root_owned=True, hard_links=True))
    assert b"not in the tar" not in b"".join(chunks)


def test_a_file_replaced_by_another_is_an_error(
        tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tree / "b" / "c" / "run"
    (tree / "new").write_text("another inode")
    _swapped_after_lstat(monkeypatch, run, lambda: (tree / "new").rename(run))
    with pytest.raises(OSError, match="run changed while it was being read"):
        b"".join(tar_stream([TarItem(run, "run")], root_owned=True, hard_links=True))


def test_a_file_swapped_between_listing_and_writing_goes_in_as_it_is_now(
        tree: Path) -> None:
    items = list(walk(tree / "b" / "c"))
    run = tree / "b" / "c" / "run"
    run.unlink()
    run.symlink_to(tree.parent / "secret")
    [(m, data)] = _members(tar_stream(items, root_owned=True, hard_links=True))
    assert m.issym() and data is None, "a link, as links go"


def test_an_error_reaches_the_reader_after_what_was_made_before(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(b"z" * (3 * CHUNK))

    def items() -> Iterator[TarItem]:
        yield TarItem(big, "big")
        raise RuntimeError("listing failed")

    got: list[bytes] = []
    with pytest.raises(RuntimeError, match="listing failed"):
        got.extend(tar_stream(items(), root_owned=True, hard_links=True))
    assert len(got) >= 3 and all(len(c) == CHUNK for c in got)


def _writers() -> int:
    return sum(t.name == "banger-tar-writer" for t in threading.enumerate())


def test_leaving_early_stops_the_writer_which_never_runs_far_ahead(tmp_path: Path) -> None:
    one = tmp_path / "one"
    one.write_bytes(b"o" * CHUNK)
    pulled = 0

    def items() -> Iterator[TarItem]:
        nonlocal pulled
        for i in range(64):
            pulled += 1
            yield TarItem(one, f"f{i}")

    before = _writers()
    stream = tar_stream(items(), root_owned=True, hard_links=False)
    assert len(next(stream)) == CHUNK
    time.sleep(0.3)
    assert _writers() == before + 1
    assert pulled <= QUEUED + 3, "held by the bounded queue, a few chunks ahead"
    stream.close()
    assert _writers() == before


# --- hypothesis: any tree comes back as it is -----------------------------------------

_comp = st.sampled_from(["a", "b", "c", "d é", ".hidden"])
_sizes = st.sampled_from([0, 1, 511, 512, 513, CHUNK + 7])
_node = st.tuples(st.lists(_comp, min_size=1, max_size=3), st.sampled_from(
    ["file", "dir", "sym", "hard"]), _sizes, st.sampled_from([0o644, 0o755, 0o600, 0o4755]),
    st.sampled_from(["a", "../..", "/etc/passwd", "nowhere", "b/c"]))


def _make(root: Path, nodes: list[tuple[list[str], str, int, int, str]]) -> None:
    first_file: Path | None = None
    for comps, kind, size, mode, link in nodes:
        p = root.joinpath(*comps)
        parents = [root.joinpath(*comps[:i]) for i in range(1, len(comps))]
        if os.path.lexists(p) or any(q.is_symlink() or (q.exists() and not q.is_dir())
                                     for q in parents):
            continue  # never made through a link (one may point out of the sandbox)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            if kind == "dir":
                p.mkdir()
            elif kind == "sym":
                p.symlink_to(link)
            elif kind == "hard" and first_file is not None:
                p.hardlink_to(first_file)
            else:
                p.write_bytes(bytes(i % 251 for i in range(size)))
                first_file = first_file or p
            if not p.is_symlink():
                p.chmod(mode if kind != "dir" else 0o755)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            continue


@settings(max_examples=60, deadline=None)
@given(nodes=st.lists(_node, max_size=10), root_owned=st.booleans(),
       hard_links=st.booleans())
def test_any_tree_comes_back_as_it_is(nodes: list[tuple[list[str], str, int, int, str]],
                                      root_owned: bool, hard_links: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "t"
        root.mkdir()
        _make(root, nodes)
        members = _members(tar_stream(walk(root, "t"), root_owned=root_owned,
                                      hard_links=hard_links))
        names = [m.name for m, _ in members]
        expected = ["t", *(str(p.relative_to(Path(d))) for p in root.rglob("*"))]
        assert sorted(names) == sorted(expected)
        seen: set[str] = set()
        for m, data in members:
            assert m.name == "t" or os.path.dirname(m.name) in seen, "parents first"
            seen.add(m.name)
            p = Path(d) / m.name
            s = p.lstat()
            assert m.uid == (0 if root_owned else s.st_uid)
            if m.issym():
                assert stat.S_ISLNK(s.st_mode) and m.linkname == os.readlink(p)
            elif m.isdir():
                assert stat.S_ISDIR(s.st_mode)
            elif m.islnk():
                assert hard_links and (Path(d) / m.linkname).samefile(p)
            else:
                assert m.isreg() and data == p.read_bytes()
                assert stat.S_IMODE(m.mode) == stat.S_IMODE(s.st_mode)
