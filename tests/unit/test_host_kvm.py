"""The accelerator probe: a real guest, not a /dev/kvm existence check."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from banger.host import kvm

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
