"""Real disk images on temp files: the overlay and the work disk."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from banger.host import disks

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("mkfs.ext4",
                       path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None,
                       reason="qemu-utils / e2fsprogs not installed"),
]

SRC = Path(disks.__file__).parents[2]


def sparse_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_overlay_is_o1_in_base_size(tmp_path: Path) -> None:
    times = []
    for size in (1 << 20, 64 << 30):
        base = sparse_file(tmp_path / f"base-{size}.raw", size)
        overlay = tmp_path / f"ov-{size}.qcow2"
        started = time.monotonic()
        disks.create_overlay(base, overlay)
        times.append(time.monotonic() - started)
        info = json.loads(subprocess.run(
            ["qemu-img", "info", "--output=json", str(overlay)],
            check=True, capture_output=True, text=True).stdout)
        assert info["format"] == "qcow2"
        assert info["virtual-size"] == size
        assert info["backing-filename"] == str(base)
        assert info["backing-filename-format"] == "raw"
        assert overlay.stat().st_size < 1 << 20  # metadata only
    assert times[1] < times[0] + 0.5
    assert not list(tmp_path.glob(".*.tmp"))


def test_overlay_refuses_to_overwrite(tmp_path: Path) -> None:
    base = sparse_file(tmp_path / "base.raw", 1 << 20)
    overlay = tmp_path / "ov.qcow2"
    overlay.write_text("precious")
    with pytest.raises(FileExistsError):
        disks.create_overlay(base, overlay)
    assert overlay.read_text() == "precious"
    with pytest.raises(disks.DiskError):
        disks.create_overlay(tmp_path / "missing.raw", tmp_path / "x.qcow2")


FILES = {
    ".ssh/authorized_keys": (b"ssh-ed25519 AAAAC3Nza test\n", 0o600),
    ".banger/hostname": (b"box\n", 0o644),
    "repo/bin/run.sh": (b"#!/bin/sh\necho hi\n", 0o755),
}


def check_work_disk(img: Path, size: int) -> None:
    st = img.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 < size // 2  # sparse
    expect = {
        "/": (0o040700,), "/.ssh": (0o040700,), "/.banger": (0o040700,),
        "/.ssh/authorized_keys": (0o100600,), "/.banger/hostname": (0o100644,),
        "/repo": (0o040755,), "/repo/bin/run.sh": (0o100755,),
    }
    for path, (mode,) in expect.items():
        info = disks.stat_in_image(img, path)
        assert (info.uid, info.gid) == (0, 0), path
        assert info.mode == mode, (path, oct(info.mode))
    assert disks.stat_in_image(img, "/.ssh/authorized_keys").size == len(
        FILES[".ssh/authorized_keys"][0])
    out = subprocess.run([disks.tool("dumpe2fs"), "-h", str(img)], capture_output=True,
                         text=True, check=True).stdout
    assert "Filesystem volume name:   banger-work" in out


def test_work_disk_owned_by_root(tmp_path: Path) -> None:
    img = tmp_path / "work.ext4"
    disks.build_work_disk(img, 256 << 20, FILES)
    check_work_disk(img, 256 << 20)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work.ext4"]  # no staging left
    with pytest.raises(FileExistsError):
        disks.build_work_disk(img, 256 << 20, FILES)


def test_work_disk_rejects_escaping_paths(tmp_path: Path) -> None:
    for bad in ("../x", "/etc/passwd", ""):
        with pytest.raises(disks.DiskError):
            disks.build_work_disk(tmp_path / "w.ext4", 64 << 20, {bad: (b"", 0o644)})
    assert list(tmp_path.iterdir()) == []


TEST_USER = "bangertest"


def _non_root_user() -> str | None:
    """A throwaway unprivileged account for the non-root path (created if we are root)."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        return None
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        if shutil.which("useradd") is None:
            return None
        subprocess.run(["useradd", "--create-home", TEST_USER], check=True)
    return TEST_USER


def test_work_disk_owned_by_root_when_built_by_a_user() -> None:
    user = _non_root_user()
    if user is None:
        pytest.skip("needs root to switch to an unprivileged test user")
    if subprocess.run(["runuser", "-u", user, "--", "unshare", "-r", "true"],
                      capture_output=True).returncode != 0:
        pytest.skip("unprivileged user namespaces are disabled here")
    if not os.access(SRC / "banger", os.R_OK) or any(
            not os.stat(p).st_mode & 0o005 for p in (SRC, *SRC.parents) if str(p) != "/"):
        pytest.skip(f"{SRC} is not readable by other users")
    out = Path(tempfile.mkdtemp(prefix="banger-userdisk-"))
    try:
        uid = pwd.getpwnam(user).pw_uid
        os.chown(out, uid, -1)
        img = out / "work.ext4"
        code = ("import sys; from pathlib import Path; from banger.host import disks; "
                f"disks.build_work_disk(Path({str(img)!r}), {256 << 20}, {FILES!r})")
        # The system interpreter: the project's venv may live where the user cannot read.
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        res = subprocess.run(["runuser", "-u", user, "--", "env", f"PYTHONPATH={SRC}",
                              python, "-c", code], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert img.stat().st_uid == uid
        check_work_disk(img, 256 << 20)
    finally:
        shutil.rmtree(out)


@pytest.fixture
def full_tmpfs() -> Iterator[Path]:
    """A small tmpfs (root only) filled to the last block: a host disk that is full."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = Path(tempfile.mkdtemp(prefix="bfull-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True)
    try:
        with (mnt / "filler").open("wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
        mnt.rmdir()


def test_full_host_disk_is_said_for_the_work_disk(full_tmpfs: Path) -> None:
    vm_dir = full_tmpfs / "vm"
    vm_dir.mkdir()
    with pytest.raises(disks.HostDiskFull) as err:
        disks.build_work_disk(vm_dir / "work.ext4", 64 << 20,
                              {"big": (b"x" * (2 << 20), 0o644)})
    msg = str(err.value)
    assert msg.startswith(f"the host disk holding {vm_dir} is full (0 MiB free)"), msg
    assert "move BANGER_HOME" in msg and "too small" not in msg
    assert list(vm_dir.iterdir()) == []  # no image, no staging left behind


def test_full_host_disk_is_said_for_the_overlay(full_tmpfs: Path, tmp_path: Path) -> None:
    base = sparse_file(tmp_path / "base.raw", 1 << 30)
    with pytest.raises(disks.HostDiskFull, match=r"host disk holding .* is full"):
        disks.create_overlay(base, full_tmpfs / "root.qcow2")
    assert sorted(p.name for p in full_tmpfs.iterdir()) == ["filler"]


def test_a_too_small_work_disk_is_still_said_as_such(tmp_path: Path) -> None:
    with pytest.raises(disks.DiskError, match="too small") as err:
        disks.build_work_disk(tmp_path / "work.ext4", 8 << 20,
                              {"big": (os.urandom(12 << 20), 0o644)})
    assert not isinstance(err.value, disks.HostDiskFull)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dies_in", ["mkfs.ext4", "debugfs"])
def test_a_build_killed_midway_leaves_no_work_disk(tmp_path: Path, dies_in: str) -> None:
    """A SIGKILL during the build (mkfs half written, or the image made but not yet
    finished) never leaves a file under the work disk's name: a start takes one that
    exists as complete, with the repo in it. The next build starts over and succeeds."""
    fakes = tmp_path / "bin"
    fakes.mkdir()
    tool = fakes / dies_in
    # The tool writes part of an image, then the builder dies as a daemon SIGKILLed here.
    tool.write_text('#!/bin/sh\nfor a; do last="$a"; done\n'
                    'printf partial >> "$last"\nkill -9 "$PPID"\nsleep 60\n')
    tool.chmod(0o755)
    img = tmp_path / "vm" / "work.ext4"
    code = ("from pathlib import Path; from banger.host import disks; "
            f"disks.build_work_disk(Path({str(img)!r}), {64 << 20}, {FILES!r})")
    env = {**os.environ, "PATH": f"{fakes}:{os.environ.get('PATH', '')}"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         timeout=60)
    assert res.returncode == -9, res.stderr
    assert not img.exists(), "a killed build left a file under the work disk's name"
    assert any(p.name.startswith(".work.ext4") for p in img.parent.iterdir()), \
        "the build was not killed midway (nothing half made)"
    disks.build_work_disk(img, 64 << 20, FILES)
    check_work_disk(img, 64 << 20)
