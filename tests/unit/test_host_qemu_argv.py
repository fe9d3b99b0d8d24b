"""qemu_argv and friends: the QEMU command line is data, checked without running QEMU."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from banger.host import imagebuild, vmmproc
from banger.host import qemu_cmdline as qemu
from banger.host.qemu_cmdline import VmmError, VmmFds
from banger.host.qemu_cmdline import qemu_argv as _qemu_argv
from banger.ports import Drive, LaunchSpec, Snapshot, TapNet, UserNet
from tests.vmspec import user_spec

TAP = TapNet(tap="bt0123", mac="52:54:00:00:00:01", address=IPv4Interface("172.30.0.7/24"),
             gateway=IPv4Address("172.30.0.1"), resolver=IPv4Address("172.30.0.1"))


def cfg(tmp: Path = Path("/vm"), *, backing: Path | None = None, **over: object) -> LaunchSpec:
    spec = user_spec(tmp, kernel=Path("/img/vmlinux"), initrd=Path("/img/initrd.img"),
                     ssh_port=2222, cmdline="init=/sbin/banger-init", backing=backing)
    return dataclasses.replace(spec, **over)  # type: ignore[arg-type]


FDS = VmmFds(root=10, work=11, serial=12, kernel=13, initrd=14, qmp=15, qmp_tag=16, agent=18,
             base=17)


def qemu_argv(c: LaunchSpec, *, tsc_khz: int, accel: str = "tcg") -> list[str]:
    return _qemu_argv(c, FDS, accel=accel, tsc_khz=tsc_khz)


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
    # The files are handed over open: QEMU (maybe another user) opens nothing by name.
    assert opt(argv, "-kernel") == ["/proc/self/fd/13"]
    assert opt(argv, "-initrd") == ["/proc/self/fd/14"]
    assert opt(argv, "-chardev") == ["file,id=serial0,path=/dev/fdset/4,append=on",
                                     "socket,id=qmp,fd=15,server=on,wait=off",
                                     "socket,id=agent,fd=18,server=on,wait=off"]
    assert opt(argv, "-mon") == ["chardev=qmp,mode=control"]
    assert opt(argv, "-serial") == ["chardev:serial0"]
    assert "-qmp" not in argv and "-drive" not in argv
    assert opt(argv, "-add-fd") == ["fd=10,set=1,opaque=/vm/root.qcow2",
                                    "fd=11,set=3,opaque=/vm/work.ext4",
                                    "fd=12,set=4,opaque=/vm/serial.log",
                                    "fd=16,set=5,opaque=qmp:/vm/qmp.sock"]


def test_qemu_is_seccomp_sandboxed() -> None:
    argv = qemu_argv(cfg(), tsc_khz=1)
    (sandbox,) = opt(argv, "-sandbox")
    assert sandbox.split(",") == ["on", "obsolete=deny", "elevateprivileges=deny",
                                  "spawn=deny", "resourcecontrol=deny"]


def test_root_disk_comes_first_so_it_is_vda() -> None:
    argv = qemu_argv(cfg(), tsc_khz=1)
    blockdevs = opt(argv, "-blockdev")
    assert blockdevs == [
        "driver=file,node-name=root-file,filename=/dev/fdset/1,discard=unmap",
        "driver=qcow2,node-name=root,file=root-file,discard=unmap",
        "driver=file,node-name=work-file,filename=/dev/fdset/3,discard=unmap",
        "driver=raw,node-name=work,file=work-file,discard=unmap"]
    assert opt(argv, "-device")[:2] == ["virtio-blk-device,drive=root",
                                        "virtio-blk-device,drive=work"]


def test_base_image_is_the_given_one_read_only() -> None:
    # The daemon names the backing file; the overlay's header (QEMU-writable) is not read.
    argv = qemu_argv(cfg(backing=Path("/img/rootfs.ext4")), tsc_khz=1)
    assert "fd=17,set=2,opaque=/img/rootfs.ext4" in opt(argv, "-add-fd")
    blockdevs = opt(argv, "-blockdev")
    assert blockdevs[:3] == [
        "driver=file,node-name=base-file,filename=/dev/fdset/2,read-only=on",
        "driver=raw,node-name=base,file=base-file,read-only=on",
        "driver=file,node-name=root-file,filename=/dev/fdset/1,discard=unmap"]
    assert "driver=qcow2,node-name=root,file=root-file,backing=base,discard=unmap" in blockdevs
    with pytest.raises(ValueError, match="descriptor"):
        _qemu_argv(cfg(backing=Path("/img/rootfs.ext4")),
                   VmmFds(root=1, work=2, serial=3, kernel=4, initrd=5, qmp=6, qmp_tag=7,
                          agent=9),
                   accel="tcg", tsc_khz=1)


def test_network_is_restricted_and_forward_bound_to_loopback() -> None:
    argv = qemu_argv(cfg(net=UserNet(40022)), tsc_khz=1)
    (netdev,) = opt(argv, "-netdev")
    assert netdev.startswith("user,id=n0,")
    assert "hostfwd=tcp:127.0.0.1:40022-:22" in netdev
    assert "restrict=on" in netdev.split(",")
    assert "virtio-net-device,netdev=n0" in opt(argv, "-device")
    unrestricted = opt(qemu_argv(cfg(net=UserNet(40022, outbound=True)), tsc_khz=1),
                       "-netdev")[0]
    assert "restrict" not in unrestricted


def test_tap_is_handed_over_attached() -> None:
    c = cfg(net=TAP)
    argv = _qemu_argv(c, VmmFds(root=1, work=2, serial=3, kernel=4, initrd=5, qmp=6,
                                qmp_tag=7, agent=9, tap=8), accel="tcg", tsc_khz=1)
    assert opt(argv, "-netdev") == ["tap,id=n0,fd=8"]  # QEMU opens no /dev/net/tun
    assert "virtio-net-device,netdev=n0,mac=52:54:00:00:00:01" in opt(argv, "-device")
    with pytest.raises(ValueError, match="descriptor"):
        qemu_argv(c, tsc_khz=1)


def test_a_kernel_without_initramfs_gets_no_initrd_argument() -> None:
    fds = dataclasses.replace(FDS, initrd=None)
    argv = _qemu_argv(cfg(), fds, accel="tcg", tsc_khz=1)
    assert opt(argv, "-kernel") == ["/proc/self/fd/13"]
    assert "-initrd" not in argv
    assert 14 not in fds.all() and None not in fds.all()
    (append,) = opt(argv, "-append")
    assert {"root=/dev/vda", "rootfstype=ext4"} <= set(append.split())


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
    spec = cfg()
    spec = dataclasses.replace(spec, boot=dataclasses.replace(spec.boot, cmdline=image_args))
    (append,) = opt(qemu_argv(spec, tsc_khz=1), "-append")
    words = append.split()
    assert [w for w in words if w.startswith("init=")] == ["init=/sbin/banger-init"]
    assert words[-len(image_args.split()):] == image_args.split()
    assert ("banger.init=systemd" in words) == (variant == imagebuild.SYSTEMD)


def test_no_init_of_its_own() -> None:
    spec = cfg()
    spec = dataclasses.replace(spec, boot=dataclasses.replace(spec.boot, cmdline=""))
    (append,) = opt(qemu_argv(spec, tsc_khz=1), "-append")
    assert not any(w.startswith("init=") for w in append.split())


def test_kvm_accel() -> None:
    assert opt(qemu_argv(cfg(), accel="kvm", tsc_khz=1), "-accel") == ["kvm"]
    with pytest.raises(ValueError):
        qemu_argv(cfg(), accel="hvf", tsc_khz=1)


def test_relative_paths_become_absolute_and_commas_are_escaped(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    d = Path("a,b")
    spec = cfg(d, backing=d / "base,id=x")
    spec = dataclasses.replace(spec, guest=dataclasses.replace(spec.guest, hostname="h,x"))
    argv = qemu_argv(spec, tsc_khz=1)
    fdsets = opt(argv, "-add-fd")
    assert f"fd=10,set=1,opaque={tmp_path}/a,,b/root.qcow2" in fdsets
    assert f"fd=16,set=5,opaque=qmp:{tmp_path}/a,,b/qmp.sock" in fdsets
    assert f"fd=17,set=2,opaque={tmp_path}/a,,b/base,,id=x" in fdsets
    assert opt(argv, "-name") == ["banger-h,,x"]
    # Un-escaped, every option value gives back the path whole: nothing was injected.
    for value in fdsets:
        opts = vmmproc.split_opts(value)
        assert set(opts) == {"fd", "set", "opaque"}
        assert "a,b" in opts["opaque"]
    # No other option value carries a path at all.
    for flag in ("-blockdev", "-chardev", "-kernel", "-initrd"):
        assert all("a,b" not in v and "a,,b" not in v for v in opt(argv, flag)), flag


def test_split_opts_undoes_the_escape() -> None:
    assert vmmproc.split_opts("fd=3,opaque=/x,,y,,z=1") == {"fd": "3", "opaque": "/x,y,z=1"}


def test_control_socket_path_limit() -> None:
    with pytest.raises(VmmError, match="Unix socket limit"):
        qemu_argv(cfg(Path("/" + "x" * 120)), tsc_khz=1)


def test_guest_agent_channel_is_a_named_virtio_serial_port() -> None:
    # microvm has no PCI: the virtio-mmio flavour of virtio-serial, one port named as
    # banger-agent looks for it, its host end the socket the daemon bound (fd 18).
    argv = qemu_argv(cfg(), tsc_khz=1)
    devices = opt(argv, "-device")
    assert devices[-2:] == ["virtio-serial-device",
                            "virtserialport,chardev=agent,name=banger.agent"]
    assert "socket,id=agent,fd=18,server=on,wait=off" in opt(argv, "-chardev")
    assert 18 in FDS.all()
    assert qemu.agent_socket(cfg()) == Path("/vm/agent.sock")


def test_agent_socket_path_limit() -> None:
    # 98 bytes of directory: qmp.sock fits in 107 bytes, agent.sock does not.
    d = Path("/" + "x" * 97)
    assert len(str(d / "qmp.sock")) <= qemu.UNIX_PATH_MAX < len(str(d / "agent.sock"))
    with pytest.raises(VmmError, match=r"guest agent socket path .* Unix socket limit"):
        qemu_argv(cfg(d), tsc_khz=1)


def test_host_tsc_khz(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu MHz\t\t: 2100.000\n\nprocessor\t: 1\n")
    assert qemu.host_tsc_khz(info) == 2_100_000
    info.write_text("processor\t: 0\n")
    with pytest.raises(VmmError):
        qemu.host_tsc_khz(info)
    assert qemu.host_tsc_khz() > 0  # this machine


def test_user_network_kernel_args() -> None:
    # The guest init's contract (host/guest/banger-init): banger.net, banger.hostname.
    spec = cfg()
    assert qemu.guest_net_args(spec.net) == "banger.net=user"
    assert qemu.kernel_cmdline(spec, 2_100_000) == (
        "console=ttyS0 root=/dev/vda rootfstype=ext4 rw tsc_early_khz=2100000 quiet "
        "cryptomgr.notests 8250.nr_uarts=1 random.trust_cpu=on panic=-1 banger.net=user "
        "banger.hostname=box init=/sbin/banger-init")
    # Outbound access is the VMM's (restrict=on), not the guest's business.
    assert qemu.guest_net_args(UserNet(2222, outbound=True)) == "banger.net=user"


def test_tap_network_kernel_args() -> None:
    # The words banger-init reads to set eth0 up statically (the kernel has no IP
    # autoconfig): address/prefix, gateway, resolver.
    assert qemu.guest_net_args(TAP) == (
        "banger.net=tap banger.ip=172.30.0.7/24 banger.gw=172.30.0.1 banger.dns=172.30.0.1")
    other = dataclasses.replace(TAP, resolver=IPv4Address("172.30.0.53"))
    assert "banger.dns=172.30.0.53" in qemu.guest_net_args(other).split()
    words = qemu.kernel_cmdline(cfg(net=TAP, vcpus=2), 1).split()
    assert words[words.index("panic=-1") + 1:] == [
        "banger.net=tap", "banger.ip=172.30.0.7/24", "banger.gw=172.30.0.1",
        "banger.dns=172.30.0.1", "banger.hostname=box", "tsc=reliable",
        "init=/sbin/banger-init"]


def test_no_snapshot_restore_and_no_work_disk_backing() -> None:
    snap = Snapshot(state=Path("/snap/state"), memory=Path("/snap/mem"))
    with pytest.raises(VmmError, match="cannot restore a snapshot"):
        qemu_argv(cfg(restore=snap), tsc_khz=1)
    with pytest.raises(ValueError, match="work disk"):
        qemu_argv(cfg(work=Drive(Path("/vm/work.ext4"), backing=Path("/img/x"))), tsc_khz=1)
