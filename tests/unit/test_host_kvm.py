"""The accelerator probe: a real guest, not a /dev/kvm existence check."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from banger.host import kvm, qemu_cmdline
from banger.host.vmmuser import RunAs

needs_qemu = pytest.mark.skipif(shutil.which(kvm.QEMU) is None, reason="QEMU not installed")


def test_forced_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for accel in ("tcg", "kvm"):
        monkeypatch.setenv("BANGER_ACCEL", accel)
        choice = kvm.probe_accel()
        assert choice.accel == accel and "forced" in choice.reason


def test_no_dev_kvm_means_tcg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANGER_ACCEL", raising=False)
    choice = kvm._probe(Path("/nonexistent/kvm"))
    assert choice.accel == "tcg" and "does not exist" in choice.reason


def test_dev_kvm_qemus_user_cannot_open_means_tcg(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    dev.chmod(0o600)  # root's alone, as on a host without a kvm group
    runas = RunAs("banger-qemu", uid=os.getuid() + 4242, gid=os.getgid() + 4242)
    choice = kvm._probe(dev, runas=runas)
    assert choice.accel == "tcg" and "not accessible to QEMU's user 'banger-qemu'" in choice.reason


def test_run_as_checks_permission_bits_like_the_kernel(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    st = f.stat()
    owner = RunAs("o", st.st_uid, st.st_gid + 1)
    group = RunAs("g", st.st_uid + 1, st.st_gid + 1, groups=(st.st_gid,))
    other = RunAs("x", st.st_uid + 1, st.st_gid + 1)
    f.chmod(0o640)
    assert owner.can_access(f, os.R_OK | os.W_OK)
    assert group.can_access(f, os.R_OK) and not group.can_access(f, os.W_OK)
    assert not other.can_access(f, os.R_OK)
    f.chmod(0o004)  # the owner class decides for the owner, even when others may read
    assert not owner.can_access(f, os.R_OK) and other.can_access(f, os.R_OK)
    assert not other.can_access(tmp_path / "missing", os.R_OK)


def test_probe_runs_sandboxed_like_the_vmm(tmp_path: Path) -> None:
    argv = kvm.probe_argv(tmp_path / "p.elf", "tcg")
    assert argv[argv.index("-sandbox") + 1] == qemu_cmdline.SANDBOX


def test_probe_elf_is_a_pvh_kernel() -> None:
    elf = kvm.probe_elf()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # ELF64, like vmlinux
    assert b"Xen\0" in elf  # the PVH entry note QEMU looks for


@needs_qemu
def test_probe_guest_reaches_its_exit_under_tcg() -> None:
    # Proves the probe itself is sound: a failure under KVM is KVM's, not the probe's.
    ok, detail = kvm.run_probe_guest("tcg")
    assert ok, detail


@needs_qemu
def test_probe_accel_gives_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANGER_ACCEL", raising=False)
    kvm.reset_cache()
    choice = kvm.probe_accel()
    assert choice.accel in ("kvm", "tcg")
    if choice.accel == "tcg":
        assert "TCG" in choice.reason
    assert kvm.probe_accel() is choice  # cached


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("ld") is None,
                    reason="binutils not installed")
def test_probe_bytes_match_their_source(tmp_path: Path) -> None:
    src = Path(kvm.__file__).with_name("guest") / "kvm-probe.S"
    subprocess.run(["as", "--64", "-o", str(tmp_path / "p.o"), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x100100", "--oformat", "binary",
                    "-o", str(tmp_path / "p.bin"), str(tmp_path / "p.o")],
                   check=True, capture_output=True)
    assert (tmp_path / "p.bin").read_bytes() == bytes.fromhex(kvm._PROBE_CODE_HEX)
