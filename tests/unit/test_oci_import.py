"""OCI images imported with the real skopeo, layer application and mke2fs (no VM): an OCI
layout directory, an OCI archive and a `docker save` archive each become an image whose
root disk holds the layers' files, banger's boot path and the owners the layers gave."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from banger.host import kernelbuild
from banger.host.images import LocalImages
from banger.host.ociimages import OciImages
from banger.host.ocilayout import OciError
from banger.model.errors import OperationFailed
from tests import ocimake

pytestmark = pytest.mark.host

KERNEL_CACHE = Path.home() / ".cache" / "banger-test"


def _debugfs(disk: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-R", cmd, str(disk)], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture
def src(tmp_path: Path) -> Path:
    layer = ocimake.tar_layer([("home", "dir", b"", 0o755),
                               ("home/app", "file", b"app\n", 0o640)])
    layout = ocimake.write_layout(tmp_path / "layout", [ocimake.busybox_layer(), layer],
                                  env=["PATH=/bin", "A=1"], workdir="/home")
    return layout


@pytest.fixture
def images(tmp_path: Path) -> OciImages:
    try:
        if kernelbuild.cached(KERNEL_CACHE, kernelbuild.current_key()) is None:
            pytest.fail(f"no microVM kernel cached in {KERNEL_CACHE} (the e2e prebuild "
                        "makes it)")
    except kernelbuild.KernelBuildError as exc:
        pytest.fail(str(exc))
    return OciImages(tmp_path / "oci", KERNEL_CACHE, kernel_caches=(KERNEL_CACHE,))


@pytest.mark.parametrize("kind", ["layout", "oci-archive", "docker-archive"])
def test_each_archive_kind_imports(tmp_path: Path, src: Path, images: OciImages,
                                   kind: str) -> None:
    path = src
    if kind != "layout":
        path = tmp_path / f"{kind}.tar"
        dest = f"{kind}:{path}" + (":app:1" if kind == "docker-archive" else "")
        subprocess.run(["skopeo", "copy", "--quiet", f"oci:{src}:latest", dest], check=True,
                       timeout=120)
    lines: list[str] = []
    img = images.pull(str(path), "app", lines.append, archive=True)
    assert img.source.startswith("oci:" if kind == "layout" else kind + ":")
    assert img.config.env == ("PATH=/bin", "A=1") and img.config.working_dir == "/home"
    assert any("applying layer 2/2" in line for line in lines)
    assert "app" in _debugfs(img.rootfs, "cat /home/app")
    assert "banger-agent" in _debugfs(img.rootfs, "ls /.banger")
    assert "banger-agent" in _debugfs(img.rootfs, "cat /etc/inittab")
    assert img.kernel.is_file() and img.cmdline == "init=/.banger/init"


def test_a_missing_path_is_refused_and_leaves_nothing(tmp_path: Path,
                                                      images: OciImages) -> None:
    with pytest.raises(OciError, match="no such file"):
        images.pull(str(tmp_path / "nope.tar"), "app", lambda _: None, archive=True)
    assert images.names() == []


def test_the_port_boots_it_microvm_only_and_refuses_it_damaged(
        tmp_path: Path, src: Path, images: OciImages) -> None:
    images.pull(str(src), "app", lambda _: None, archive=True)
    port = LocalImages(tmp_path / "builtin", KERNEL_CACHE, oci_root=images.root)
    assert "app" in port.known()
    info = port.get("app")
    assert info is not None and not info.cloud_kernel and info.microvm_kernel == info.kernel
    record = port.describe("app")
    assert record is not None and record.kind == "oci" and record.workdir == "/home"
    with info.rootfs.open("r+b") as f:  # a byte changed in a hole of the sparse disk
        f.seek(900 << 20)
        f.write(b"x")
    with pytest.raises(OperationFailed, match="damaged"):
        LocalImages(tmp_path / "builtin", KERNEL_CACHE, oci_root=images.root).get("app")


def test_a_new_pull_of_a_name_leaves_the_old_build_for_the_vms_made_from_it(
        tmp_path: Path, src: Path, images: OciImages) -> None:
    first = images.pull(str(src), "app", lambda _: None, archive=True)
    second = images.pull(str(src), "app", lambda _: None, archive=True)
    assert first.rootfs.is_file() and second.rootfs.is_file()
    assert first.dir != second.dir and images.get("app") == second
    assert images.names() == ["app"]
    (images.images / "evil").symlink_to("/etc")  # only links into builds/ are images
    assert images.get("evil") is None and images.names() == ["app"]


def test_a_stale_build_too_deep_for_python_is_removed_and_never_blocks(
        tmp_path: Path) -> None:
    from banger.host import ociimages
    stale = tmp_path / ".x.build-1"
    stale.mkdir()
    fd = os.open(stale, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):  # deeper than os.walk / shutil.rmtree can recurse
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    os.chmod(stale, 0o500)  # a layer's read-only directory
    try:
        ociimages._rmtree(stale)
        assert not os.path.lexists(stale)
    finally:  # pytest's own cleanup could not remove it either
        subprocess.run(["rm", "-rf", "--", str(stale)], check=True)


def test_a_damaged_cached_layer_is_dropped_so_the_next_pull_fetches_it(
        src: Path, images: OciImages) -> None:
    first = images.pull(str(src), "app", lambda _: None, archive=True)
    import json
    digest = json.loads((first.dir / "manifest.json").read_text())["layers"][-1]
    blob = images.layout / "blobs" / "sha256" / digest.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1  # same size: skopeo would reuse it as it is
    blob.write_bytes(bytes(data))
    with pytest.raises(OciError, match=r"does not match its digest.*pull again"):
        images.pull(str(src), "app", lambda _: None, archive=True)
    assert not blob.exists()
    again = images.pull(str(src), "app", lambda _: None, archive=True)
    assert "app" in _debugfs(again.rootfs, "cat /home/app")
