"""qemu_argv and friends: the QEMU command line is data, checked without running QEMU."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger.host import imagebuild, qemu
from banger.host.qemu import QemuConfig, VmmError, qemu_argv


def cfg(tmp: Path = Path("/vm"), **over: object) -> QemuConfig:
    base: dict[str, object] = dict(
        kernel=Path("/img/vmlinux"), initrd=Path("/img/initrd.img"),
        root_disk=tmp / "root.qcow2", work_disk=tmp / "work.ext4", vcpus=1,
        memory_mib=256, ssh_port=2222, serial_log=tmp / "serial.log",
        qmp_socket=tmp / "qmp.sock", accel="tcg", hostname="box",
        cmdline="init=/sbin/banger-init",
    )
    base.update(over)
    return QemuConfig(**base)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_microvm_tcg_command_line() -> None:
    argv = qemu_argv(cfg(), tsc_khz=2_100_000)
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-M") == ["microvm,acpi=on"]
    assert opt(argv, "-cpu") == ["max"]
    assert opt(argv, "-accel") == [f"tcg,tb-size={qemu.DEFAULT_TB_SIZE_MIB}"]
    assert opt(argv, "-m") == ["256M"]
    assert opt(argv, "-smp") == ["1"]
    for flag in ("-nodefaults", "-no-user-config", "-no-reboot"):
        assert flag in argv
    assert opt(argv, "-display") == ["none"]
    assert opt(argv, "-kernel") == ["/img/vmlinux"]
    assert opt(argv, "-initrd") == ["/img/initrd.img"]
    assert opt(argv, "-qmp") == ["unix:/vm/qmp.sock,server=on,wait=off"]
    assert opt(argv, "-chardev") == ["file,id=serial0,path=/vm/serial.log,append=on"]
    assert opt(argv, "-serial") == ["chardev:serial0"]


def test_root_disk_comes_first_so_it_is_vda() -> None:
    argv = qemu_argv(cfg(), tsc_khz=1)
    drives = opt(argv, "-drive")
    assert drives[0].startswith("id=root,file=/vm/root.qcow2,format=qcow2,")
    assert drives[1].startswith("id=work,file=/vm/work.ext4,format=raw,")
    assert opt(argv, "-device")[:2] == ["virtio-blk-device,drive=root",
                                        "virtio-blk-device,drive=work"]


def test_network_is_restricted_and_forward_bound_to_loopback() -> None:
    argv = qemu_argv(cfg(ssh_port=40022), tsc_khz=1)
    (netdev,) = opt(argv, "-netdev")
    assert netdev.startswith("user,id=n0,")
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in netdev
    assert "restrict=on" in netdev.split(",")
    assert "virtio-net-device,netdev=n0" in opt(argv, "-device")
    unrestricted = opt(qemu_argv(cfg(restrict_net=False), tsc_khz=1), "-netdev")[0]
    assert "restrict" not in unrestricted


def test_kernel_cmdline() -> None:
    (append,) = opt(qemu_argv(cfg(), tsc_khz=2_100_000), "-append")
    words = append.split()
    for w in ("console=ttyS0", "root=/dev/vda", "rw", "init=/sbin/banger-init",
              "tsc_early_khz=2100000", "cryptomgr.notests", "banger.net=user",
              "banger.hostname=box", "panic=-1"):
        assert w in words
    assert "tsc=reliable" not in words
    assert words[-1] == "init=/sbin/banger-init"  # the caller's args come last
    (smp2,) = opt(qemu_argv(cfg(vcpus=2), tsc_khz=1), "-append")
    assert "tsc=reliable" in smp2.split()


@pytest.mark.parametrize("variant", imagebuild.VARIANTS)
def test_exactly_one_init_and_it_is_the_images(variant: str) -> None:
    image_args = imagebuild.image_cmdline(variant)
    (append,) = opt(qemu_argv(cfg(cmdline=image_args), tsc_khz=1), "-append")
    words = append.split()
    assert [w for w in words if w.startswith("init=")] == ["init=/sbin/banger-init"]
    assert words[-len(image_args.split()):] == image_args.split()
    assert ("banger.init=systemd" in words) == (variant == imagebuild.SYSTEMD)


def test_no_init_of_its_own() -> None:
    (append,) = opt(qemu_argv(cfg(cmdline=""), tsc_khz=1), "-append")
    assert not any(w.startswith("init=") for w in append.split())


def test_kvm_accel() -> None:
    assert opt(qemu_argv(cfg(accel="kvm"), tsc_khz=1), "-accel") == ["kvm"]
    with pytest.raises(ValueError):
        qemu_argv(cfg(accel="hvf"), tsc_khz=1)


def test_relative_paths_become_absolute_and_commas_are_escaped(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    argv = qemu_argv(cfg(Path("a,b")), tsc_khz=1)
    assert opt(argv, "-drive")[0].startswith(f"id=root,file={tmp_path}/a,,b/root.qcow2,")
    assert opt(argv, "-qmp")[0].startswith(f"unix:{tmp_path}/a,b/qmp.sock")


def test_qmp_socket_path_limit() -> None:
    with pytest.raises(VmmError, match="Unix socket limit"):
        qemu_argv(cfg(Path("/" + "x" * 120)), tsc_khz=1)


def test_host_tsc_khz(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2100.000\n\nprocessor\t: 1\n")
    assert qemu.host_tsc_khz(info) == 2_100_000
    info.write_text("processor\t: 0\n")
    with pytest.raises(VmmError):
        qemu.host_tsc_khz(info)
    assert qemu.host_tsc_khz() > 0  # this machine
