"""The OCI layout read back (host/ocilayout.py), the image made from it (host/ociimages.py,
host/ocidisk.py): the platform chosen from a manifest list, every blob's digest checked,
the image config kept; owners set on the ext4 without root; names and loopback refs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from banger.host import ocidisk, ocilayout
from banger.host.ocilayout import OciError
from banger.model.images import image_name_from_ref as name_from_ref
from tests import ocimake


def _layout(tmp_path: Path) -> Path:
    return ocimake.write_layout(tmp_path / "layout", [ocimake.tar_layer(
        [("a", "file", b"A", 0o644)])], env=["PATH=/bin", "X=1"], workdir="/w", cmd=["top"])


def test_read_checks_every_blob_and_keeps_the_config(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    image = ocilayout.read(layout, "latest")
    assert len(image.layers) == 1
    assert image.config.env == ("PATH=/bin", "X=1")
    assert (image.config.working_dir, image.config.cmd) == ("/w", ("top",))
    config = ocilayout.blob_path(layout, image.config_digest)
    data = config.read_bytes()
    config.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(OciError, match=r"does not match its digest.*removed from the cache, "
                                       "pull again"):
        ocilayout.read(layout, "latest")
    assert not config.exists()  # so the next pull fetches it again
    config.write_bytes(data)
    layer = ocilayout.blob_path(layout, image.layers[0].digest)
    layer.write_bytes(layer.read_bytes() + b"x")
    with pytest.raises(OciError, match=r"manifest says.*pull again"):
        ocilayout.read(layout, "latest")
    assert not layer.exists()


def test_a_manifest_list_gives_the_linux_amd64_image(tmp_path: Path) -> None:
    layout = _layout(tmp_path)
    index = json.loads((layout / "index.json").read_text())
    amd64 = index["manifests"][0]
    arm = {**amd64, "digest": "sha256:" + "0" * 64}
    entries = [{**arm, "platform": {"os": "linux", "architecture": "arm64"}},
               {**amd64, "platform": {"os": "linux", "architecture": "amd64"}}]
    for e in entries:
        e.pop("annotations", None)
    data = json.dumps({"schemaVersion": 2, "manifests": entries}).encode()
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    index["manifests"] = [{"mediaType": ocilayout.INDEX_TYPES[0], "digest": "sha256:" + digest,
                           "size": len(data),
                           "annotations": {"org.opencontainers.image.ref.name": "multi"}}]
    (layout / "index.json").write_text(json.dumps(index))
    assert ocilayout.read(layout, "multi").manifest_digest == amd64["digest"]


def test_a_config_with_a_bad_env_is_refused() -> None:
    with pytest.raises(OciError, match="NAME=VALUE"):
        ocilayout.parse_config({"config": {"Env": ["NOEQUALS"]}})


@pytest.mark.parametrize(("ref", "loopback"), [
    ("127.0.0.1:5000/busybox:1", True), ("localhost:5000/x", True), ("[::1]:5000/x", True),
    ("docker.io/library/python:3.12", False), ("python:3.12", False),
    ("10.0.0.1:5000/x", False), ("127.0.0.1.example.com/x", False),
])
def test_only_loopback_registries_skip_tls_verification(ref: str, loopback: bool) -> None:
    assert ocilayout.is_loopback_ref(ref) is loopback
    _, opts = ocilayout.source(ref, archive=False)
    assert ("--src-tls-verify=false" in opts) is loopback


def test_names_from_refs() -> None:
    assert name_from_ref("docker.io/library/python:3.12-slim") == "python-3.12-slim"
    assert name_from_ref("127.0.0.1:5000/Two_Layer@sha256:ab") == "two_layer"
    assert name_from_ref("./dist/app.tar") == "app"


def test_the_root_disk_keeps_owners_without_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "home/u").mkdir(parents=True)
    (root / "home/u/f").write_text("x")
    out = tmp_path / "disk.ext4"
    ocidisk.build_ext4(root, out, {"home/u/f": (1000, 1001), "home/u": (1000, 1000)})
    stat = subprocess.run(["debugfs", "-R", "stat /home/u/f", str(out)], capture_output=True,
                          text=True, check=True).stdout
    assert "User:  1000" in stat and "Group:  1001" in stat


def test_owners_that_debugfs_cannot_set_fail_the_build(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ocidisk.DiskError, match="nope"):
        ocidisk.build_ext4(root, tmp_path / "disk.ext4", {"nope": (1, 1)})
    assert not (tmp_path / "disk.ext4").exists()


def test_the_sparse_digest_is_the_contents_not_the_holes(tmp_path: Path) -> None:
    from banger.host.ociimages import sparse_sha256
    sparse, dense, other = tmp_path / "s", tmp_path / "d", tmp_path / "o"
    with sparse.open("wb") as f:
        f.truncate(5 << 20)
        f.seek(3 << 20)
        f.write(b"data")
    dense.write_bytes(bytes(3 << 20) + b"data" + bytes((2 << 20) - 4))
    other.write_bytes(bytes(3 << 20) + b"dat!" + bytes((2 << 20) - 4))
    assert sparse_sha256(sparse) == sparse_sha256(dense) != sparse_sha256(other)
    grown = tmp_path / "g"
    grown.write_bytes(dense.read_bytes() + bytes(1))
    assert sparse_sha256(grown) != sparse_sha256(dense)


def test_the_backing_file_is_read_from_the_overlays_header(tmp_path: Path) -> None:
    from banger.host import disks
    base = tmp_path / "base with space.ext4"
    base.write_bytes(b"\0" * 4096)
    overlay = tmp_path / "root.qcow2"
    disks.create_overlay(base, overlay)
    assert disks.backing_of(overlay) == base
    assert disks.backing_of(tmp_path / "none") is None
    assert disks.backing_of(base) is None  # raw: no qcow2 header


def _owner_of(disk: Path, path: bytes) -> str:
    out = subprocess.run([b"debugfs", b"-R", b'stat "' + path + b'"', bytes(disk)],
                         capture_output=True, check=True).stdout.decode(errors="replace")
    return " ".join(out.split()[out.split().index("User:"):][:4])


def test_an_owner_behind_a_symlink_is_not_set_through_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/shadow").write_text("root:x")
    (root / "x").symlink_to("/etc")  # a later layer made x a link; x/shadow was 1000's
    (root / "real").mkdir()
    (root / "real/f").write_text("f")
    out = tmp_path / "disk.ext4"
    ocidisk.build_ext4(root, out, {"x/shadow": (1000, 1000), "real/f": (5, 6)})
    assert _owner_of(out, b"/etc/shadow") == "User: 0 Group: 0"
    assert _owner_of(out, b"/real/f") == "User: 5 Group: 6"


def test_an_owner_of_a_name_that_is_not_utf8_is_set(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    name = b"caf\xe9"
    (Path(os.fsdecode(bytes(root) + b"/" + name))).write_text("x")
    out = tmp_path / "disk.ext4"
    ocidisk.build_ext4(root, out, {os.fsdecode(name): (1000, 1001)})
    assert _owner_of(out, b"/" + name) == "User: 1000 Group: 1001"


def test_a_tree_of_many_empty_files_gets_the_inodes_it_needs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    for d in range(70):  # 70,000 empty files: more than a 1 GiB ext4's default inodes
        sub = root / f"d{d}"
        sub.mkdir(parents=True)
        for i in range(1000):
            (sub / str(i)).touch()
    out = tmp_path / "disk.ext4"
    ocidisk.build_ext4(root, out, {})
    listing = subprocess.run(["debugfs", "-R", "ls /d69", str(out)], capture_output=True,
                             text=True, check=True).stdout
    assert "999" in listing.split()


def test_an_import_path_with_a_colon_is_refused_clearly(tmp_path: Path) -> None:
    odd = tmp_path / "a:b.tar"
    odd.write_bytes(b"")
    with pytest.raises(OciError, match="with ':' in it cannot be imported"):
        ocilayout.source(str(odd), archive=True)
    plain = tmp_path / "layout"
    plain.mkdir()
    assert ocilayout.source(str(plain), archive=True) == (f"oci:{plain}", [])
