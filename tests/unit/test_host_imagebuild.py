"""Image manifests, apt source discovery and the initramfs writer."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import pytest

from banger.host import aptsources, bootfiles, imagebuild
from banger.host.imagebuild import ImageCorrupt, ImageError, load_image, write_manifest


@pytest.fixture
def image(tmp_path: Path) -> Path:
    d = tmp_path / "img"
    d.mkdir()
    (d / "rootfs.ext4").write_bytes(b"root" * 1000)
    (d / "vmlinux").write_bytes(b"\x7fELF" + b"k" * 100)
    (d / "initrd.img").write_bytes(b"070701" + b"i" * 50)
    write_manifest(d, kernel_version="6.1.0-test")
    return d


def test_manifest_round_trip(image: Path) -> None:
    art = load_image(image)
    assert art.rootfs == image / "rootfs.ext4"
    assert art.kernel_version == "6.1.0-test"
    assert art.init == "/sbin/banger-init"
    assert "init=/sbin/banger-init" in art.cmdline


def test_variants_differ_in_digest_cmdline_and_packages() -> None:
    assert imagebuild.IMAGE_VARIANTS == {"debian-bookworm": "minimal",
                                         "debian-bookworm-systemd": "systemd"}
    minimal, systemd = imagebuild.recipe_digest("minimal"), imagebuild.recipe_digest("systemd")
    assert minimal != systemd
    assert imagebuild.recipe_digest() == minimal
    assert imagebuild.image_cmdline("minimal") == "init=/sbin/banger-init"
    assert imagebuild.image_cmdline("systemd") == "init=/sbin/banger-init banger.init=systemd"
    assert "systemd-sysv" in imagebuild.packages("systemd")
    assert "systemd-sysv" not in imagebuild.packages("minimal")
    assert "banger-sshd-ready.service" in imagebuild.guest_files("systemd")
    with pytest.raises(ValueError, match="unknown image variant"):
        imagebuild.recipe_digest("openrc")


@pytest.mark.parametrize("variant", ["minimal", "systemd"])
def test_manifest_records_variant_and_is_current_checks_its_digest(
        tmp_path: Path, variant: str) -> None:
    d = tmp_path / variant
    d.mkdir()
    for name in ("rootfs.ext4", "vmlinux", "initrd.img"):
        (d / name).write_bytes(name.encode())
    write_manifest(d, kernel_version="6.1.0-test", variant=variant)
    art = load_image(d)
    assert art.variant == variant
    assert art.cmdline == imagebuild.image_cmdline(variant)
    assert imagebuild.is_current(d)
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["variant"] == variant
    assert manifest["recipe"] == imagebuild.recipe_digest(variant)
    # A manifest claiming the other variant's name with this recipe is stale.
    other = "systemd" if variant == "minimal" else "minimal"
    manifest["variant"] = other
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert not imagebuild.is_current(d)
    manifest["variant"] = "openrc"
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert not imagebuild.is_current(d)


def test_manifest_without_variant_is_a_minimal_image(image: Path) -> None:
    manifest = json.loads((image / "manifest.json").read_text())
    del manifest["variant"]
    (image / "manifest.json").write_text(json.dumps(manifest))
    assert imagebuild.is_current(image)
    assert load_image(image).variant == "minimal"


def test_guest_files_are_staged_with_the_right_modes(tmp_path: Path) -> None:
    staged = imagebuild._stage_guest_files(tmp_path / "g", "systemd")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in staged.iterdir()}
    assert set(modes) == set(imagebuild.guest_files("systemd"))
    assert modes["banger-init"] == modes["systemd-tune"] == 0o755
    assert modes["banger-sshd-ready.service"] == modes["sshd_config"] == 0o644


def test_corrupt_byte_is_detected_with_both_digests(image: Path) -> None:
    load_image(image)
    kernel = image / "vmlinux"
    want = imagebuild.sha256_file(kernel)
    data = bytearray(kernel.read_bytes())
    data[10] ^= 0xFF
    kernel.write_bytes(bytes(data))
    with pytest.raises(ImageCorrupt) as err:
        load_image(image)
    msg = str(err.value)
    assert "vmlinux" in msg and want in msg and imagebuild.sha256_file(kernel) in msg


def test_size_change_and_missing_file(image: Path) -> None:
    with (image / "initrd.img").open("ab") as f:
        f.write(b"x")
    with pytest.raises(ImageCorrupt, match=r"initrd\.img: size"):
        load_image(image)
    (image / "initrd.img").unlink()
    with pytest.raises(ImageCorrupt, match="missing"):
        load_image(image)
    load_image(image, verify=False)  # without verification only the manifest is read


def test_second_load_is_free(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_image(image)
    calls: list[Path] = []
    real = imagebuild.sha256_file
    monkeypatch.setattr(imagebuild, "sha256_file", lambda p: calls.append(p) or real(p))
    load_image(image)
    assert calls == []
    os.utime(image / "rootfs.ext4", ns=(1, 1))  # rewritten: hashed again
    load_image(image)
    assert calls == [image / "rootfs.ext4"]


def test_bad_manifest(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="manifest"):
        load_image(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ImageError, match="unreadable manifest"):
        load_image(tmp_path)


def test_sources_parsing() -> None:
    deb822 = """Types: deb
# comment
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://mirror.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main contrib
Enabled: no
"""
    assert aptsources.parse_deb822_sources(deb822) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
    ]
    one = ("deb [signed-by=/k.gpg arch=amd64] http://m/debian bookworm main contrib\n"
           "# deb http://m/debian sid main\ndeb-src http://m/debian bookworm main\n")
    assert aptsources.parse_one_line_sources(one) == [
        "deb http://m/debian bookworm main contrib"]
    assert aptsources.debian_sources("http://x/debian") == ["deb http://x/debian bookworm main"]


def test_module_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    (tmp_path / "modules.dep").write_text(
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/net/virtio_net.ko: kernel/net/core/failover.ko "
        "kernel/drivers/net/net_failover.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/fs/fuse/fuse.ko.xz:\n")
    order = bootfiles.module_load_order(tmp_path, ["virtio_blk", "virtio_net", "virtio"])
    names = [p.rsplit("/", 1)[1] for p in order]
    assert names == ["virtio_ring.ko", "virtio_blk.ko", "failover.ko", "net_failover.ko",
                     "virtio_net.ko"]
    assert bootfiles._module_name("kernel/fs/fuse/fuse.ko.xz") == "fuse"


def parse_newc(data: bytes) -> dict[str, tuple[int, int, int, int, bytes]]:
    """name -> (mode, uid, gid, rdevmajor, data)"""
    out = {}
    pos = 0
    while True:
        h = data[pos:pos + 110]
        assert h[:6] == b"070701"
        f = [int(h[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (f[1], f[2], f[3], f[9], body)


def test_initramfs_is_root_owned_with_console(tmp_path: Path) -> None:
    mods = tmp_path / "mods"
    (mods / "kernel").mkdir(parents=True)
    (mods / "modules.dep").write_text("kernel/virtio_blk.ko: kernel/virtio_ring.ko\n"
                                      "kernel/virtio_ring.ko:\n")
    (mods / "kernel" / "virtio_blk.ko").write_bytes(b"BLK")
    (mods / "kernel" / "virtio_ring.ko").write_bytes(b"RING!")
    bb = tmp_path / "busybox"
    bb.write_bytes(b"\x7fELFbusybox")
    init = tmp_path / "init"
    init.write_text("#!/bin/busybox sh\n")
    out = tmp_path / "initrd.img"
    order = bootfiles.build_initramfs(busybox=bb, init_script=init, modules_dir=mods,
                                      out=out)
    assert order == ["virtio_ring.ko", "virtio_blk.ko"]
    files = parse_newc(out.read_bytes())
    assert all(uid == 0 and gid == 0 for _, uid, gid, _, _ in files.values())
    mode, _, _, major, _ = files["dev/console"]
    assert stat.S_ISCHR(mode) and major == 5
    assert stat.S_IMODE(files["init"][0]) == 0o755
    assert files["lib/modules/load-order"][4] == b"virtio_ring.ko\nvirtio_blk.ko\n"
    assert files["lib/modules/virtio_ring.ko"][4] == b"RING!"


def test_extract_vmlinux_finds_the_lz4_payload(tmp_path: Path) -> None:
    import shutil
    import subprocess
    if shutil.which("lz4") is None:
        pytest.skip("lz4 not installed")
    kernel = b"\x7fELF" + struct.pack("<I", 7) * (1 << 19)  # 2 MiB "kernel"
    raw = tmp_path / "k"
    raw.write_bytes(kernel)
    # The kernel build uses the legacy LZ4 frame (-l), magic 02 21 4c 18.
    subprocess.run(["lz4", "-l", "-q", "-f", str(raw), str(tmp_path / "k.lz4")], check=True)
    bz = tmp_path / "bzImage"
    bz.write_bytes(b"MZ setup code" * 100 + (tmp_path / "k.lz4").read_bytes() + b"trailer")
    bootfiles.extract_vmlinux(bz, tmp_path / "vmlinux")
    assert (tmp_path / "vmlinux").read_bytes() == kernel
    (tmp_path / "nolz4").write_bytes(b"MZ" * 100)
    with pytest.raises(bootfiles.BootFileError, match="LZ4"):
        bootfiles.extract_vmlinux(tmp_path / "nolz4", tmp_path / "x")


@pytest.mark.parametrize("variant", ["minimal", "systemd"])
def test_recipe_digest_covers_the_guest_agent(monkeypatch: pytest.MonkeyPatch,
                                              variant: str) -> None:
    # An edited agent source makes every image stale: images rebuild with the new agent.
    before = imagebuild.recipe_digest(variant)
    sources = imagebuild.agentbin.read_sources()
    edited = {name: data + b"/* edited */\n" for name, data in sources.items()}
    monkeypatch.setattr(imagebuild.agentbin, "read_sources", lambda *a: edited)
    assert imagebuild.recipe_digest(variant) != before


def test_both_variants_start_the_agent() -> None:
    guest = imagebuild.resources.files("banger.host") / "guest"
    inittab = [line for line in (guest / "inittab").read_text().splitlines()
               if line and not line.startswith("#")]
    # busybox init: the agent is respawned, and started before sshd.
    assert inittab[0] == "::respawn:/usr/local/sbin/banger-agent"
    assert inittab[1] == "::respawn:/sbin/banger-init sshd"
    hook = (guest / "customize-hook").read_text()
    assert '"$root/usr/local/sbin/banger-agent"' in hook
    # systemd: a unit of its own, started early (sysinit), restarted whenever it dies.
    assert "banger-agent.service" in imagebuild.guest_files("systemd")
    unit = (guest / "banger-agent.service").read_text()
    for line in ("ExecStart=/usr/local/sbin/banger-agent", "Restart=always",
                 "DefaultDependencies=no", "WantedBy=sysinit.target"):
        assert line in unit.splitlines()
    assert "sysinit.target.wants/banger-agent.service" in (guest / "systemd-tune").read_text()
