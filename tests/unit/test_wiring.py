"""The host adapters: verification stamps and the per-boot accel probe cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from banger.daemon import wiring
from banger.host import imagebuild, kvm
from banger.host.images import LocalImages
from banger.host.vmm_qemu import QemuVmm
from banger.model.layout import Layout


def _image(d: Path) -> None:
    d.mkdir(parents=True)
    for name in (imagebuild.ROOTFS, imagebuild.KERNEL, imagebuild.INITRD):
        (d / name).write_bytes(name.encode() * 100)
    imagebuild.write_manifest(d, kernel_version="6.1-test")


def test_image_verified_once_then_trusted_until_a_file_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path / "debian-bookworm")
    hashed: list[str] = []
    real = imagebuild.sha256_file
    monkeypatch.setattr(imagebuild, "sha256_file", lambda p: hashed.append(p.name) or real(p))
    imagebuild._verified.clear()
    images = LocalImages(tmp_path)
    assert images.get("debian-bookworm") is not None
    assert sorted(hashed) == sorted([imagebuild.ROOTFS, imagebuild.KERNEL, imagebuild.INITRD])
    hashed.clear()
    imagebuild._verified.clear()  # a new daemon process
    assert images.get("debian-bookworm") is not None
    assert hashed == []
    # A rewritten artifact is hashed again, and corruption is caught.
    (tmp_path / "debian-bookworm" / imagebuild.KERNEL).write_bytes(b"tampered")
    with pytest.raises(imagebuild.ImageError):
        images.get("debian-bookworm")


def test_image_from_an_older_recipe_is_not_used(tmp_path: Path) -> None:
    d = tmp_path / "debian-bookworm"
    _image(d)
    images = LocalImages(tmp_path)
    assert images.get("debian-bookworm") is not None
    manifest = json.loads((d / imagebuild.MANIFEST).read_text())
    manifest["recipe"] = "older"
    (d / imagebuild.MANIFEST).write_text(json.dumps(manifest))
    assert images.get("debian-bookworm") is None


def test_accel_probed_once_per_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANGER_ACCEL", raising=False)
    calls: list[int] = []

    def probe(runas: object = None) -> kvm.AccelChoice:
        calls.append(1)
        return kvm.AccelChoice("tcg", "test reason")

    monkeypatch.setattr(kvm, "probe_accel", probe)
    cache = tmp_path / "accel.json"
    assert QemuVmm(cache).accel().reason == "test reason"
    assert QemuVmm(cache).accel().accel == "tcg"
    assert len(calls) == 1
    cache.write_text("{broken")
    QemuVmm(cache).accel()
    assert len(calls) == 2


def test_free_port_never_hands_one_port_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    from banger.host import vmmproc
    ports = iter([40001, 40001, 40001, 40002])
    monkeypatch.setattr(vmmproc, "free_port", lambda: next(ports))
    vmm = QemuVmm(None)
    assert [vmm.free_port(), vmm.free_port()] == [40001, 40002]


def test_the_daemon_composes_the_host_adapters(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "s", tmp_path / "c", tmp_path / "cfg", tmp_path / "r")
    ports = wiring.host_ports(layout)
    assert isinstance(ports.images, LocalImages) and ports.images.root == layout.images_dir
    assert isinstance(ports.vmm, QemuVmm) and ports.vmm.name == "qemu"
