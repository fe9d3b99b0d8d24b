"""The microVM kernel's config fragment, cache key and build recipe (the real build runs in
the e2e tier: tests/e2e/conftest.py builds it once per machine with the images)."""

from __future__ import annotations

import fcntl
import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from banger.host import imagebuild, kernelbuild

FRAGMENT = kernelbuild.CONFIG_FRAGMENT.read_text()

# What banger's guests need built in (issue 10, HOST-FACTS "A microVM-tuned kernel").
NEEDED = (
    "64BIT", "SERIAL_8250", "SERIAL_8250_CONSOLE", "PVH", "KVM_GUEST", "ACPI",
    "VIRTIO_MMIO", "VIRTIO_PCI", "VIRTIO_BLK", "VIRTIO_NET", "VIRTIO_CONSOLE",
    "VSOCKETS", "VIRTIO_VSOCKETS", "EXT4_FS", "PROC_FS", "SYSFS", "DEVTMPFS",
    "DEVTMPFS_MOUNT", "TMPFS", "UNIX98_PTYS", "UNIX", "INET", "IPV6", "FUTEX", "EPOLL",
    "SIGNALFD", "TIMERFD", "EVENTFD", "INOTIFY_USER", "SHMEM", "BINFMT_ELF",
    "BINFMT_SCRIPT", "NO_HZ_IDLE", "HIGH_RES_TIMERS", "POSIX_TIMERS",
    # systemd: cgroup v2, namespaces, handles, autofs, seccomp
    "CGROUPS", "NAMESPACES", "FHANDLE", "AUTOFS_FS", "SECCOMP", "SECCOMP_FILTER",
)
LEFT_OUT = ("MODULES", "LEGACY_PTYS", "KPROBES", "HID", "INPUT", "CPU_FREQ",
            "ACPI_THERMAL", "SYSTEM_TRUSTED_KEYRING", "DEBUG_INFO")


@pytest.mark.parametrize("option", NEEDED)
def test_fragment_builds_in_what_the_guest_needs(option: str) -> None:
    assert kernelbuild.parse_fragment(FRAGMENT).get(f"CONFIG_{option}") == "y"


@pytest.mark.parametrize("option", LEFT_OUT)
def test_fragment_leaves_out_modules_and_boot_time_costs(option: str) -> None:
    wanted = kernelbuild.parse_fragment(FRAGMENT)
    assert f"CONFIG_{option}" in wanted and wanted[f"CONFIG_{option}"] is None


def test_parse_fragment_reads_values_and_unset_lines() -> None:
    text = "# a comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=8\n\nCONFIG_A=n\n"
    assert kernelbuild.parse_fragment(text) == {"CONFIG_A": "n", "CONFIG_B": None,
                                                "CONFIG_C": "8"}


def test_fragment_mismatches_names_dropped_and_unwanted_options() -> None:
    fragment = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=y\n"
    config = "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_C is not set\n"
    assert kernelbuild.fragment_mismatches(fragment, config) == [
        "CONFIG_B=(off) (got y)", "CONFIG_C=y (got (off))"]
    assert kernelbuild.fragment_mismatches(fragment, "CONFIG_A=y\nCONFIG_C=y\n") == []


def test_cache_key_covers_fragment_version_and_recipe() -> None:
    key = kernelbuild.cache_key(b"CONFIG_A=y\n", "6.1.1-1")
    assert key == kernelbuild.cache_key(b"CONFIG_A=y\n", "6.1.1-1")
    assert key != kernelbuild.cache_key(b"CONFIG_A=n\n", "6.1.1-1")
    assert key != kernelbuild.cache_key(b"CONFIG_A=y\n", "6.1.1-2")
    assert key != kernelbuild.cache_key(b"CONFIG_A=y\n", "6.1.1-1", ("other", "recipe"))
    # Length-prefixed: moving bytes between parts changes the key.
    assert kernelbuild.cache_key(b"b", "a", ("x",)) != kernelbuild.cache_key(b"", "ab", ("x",))


@pytest.fixture
def fake_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A linux-source tarball whose Makefile acts out the recipe's targets in seconds."""
    makefile = (
        b"tinyconfig:\n\tprintf 'CONFIG_64BIT=n\\n' > .config\n"
        b"olddefconfig:\n\ttrue\n"
        b"vmlinux:\n\tfor i in 1 2 3; do echo \"  CC      obj$$i.o\"; done\n"
        b"\tprintf '\\177ELF fake kernel' > vmlinux\n"
        b"kernelrelease:\n\t@echo 6.1.999\n"
    )
    tarball = tmp_path / "linux-source-6.1.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        info = tarfile.TarInfo("linux-source-6.1/Makefile")
        info.size = len(makefile)
        tar.addfile(info, io.BytesIO(makefile))
    monkeypatch.setattr(kernelbuild, "SOURCE_TARBALL", tarball)
    monkeypatch.setattr(kernelbuild, "_dpkg_version", lambda: "6.1.999-1")
    monkeypatch.setattr(kernelbuild, "_PROGRESS_EVERY", 0.0)
    return tarball


def test_build_runs_the_recipe_caches_and_reports_progress(fake_source: Path,
                                                           tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    lines: list[str] = []
    kernel = kernelbuild.ensure_kernel(cache, lines.append)
    assert kernel.release == "6.1.999"
    assert kernel.vmlinux.read_bytes() == b"\x7fELF fake kernel"
    assert kernel.vmlinux.parent == cache / "kernel" / kernelbuild.current_key()
    # The fragment was applied over tinyconfig (its CONFIG_64BIT=y wins) and kept.
    config = (kernel.vmlinux.parent / kernelbuild.CONFIG).read_text()
    assert kernelbuild.fragment_mismatches(FRAGMENT, config) == []
    assert any("unpacking" in line for line in lines)
    assert any("3 of ~" in line and "objects compiled" in line for line in lines)
    assert any("6.1.999 built" in line for line in lines)
    # Nothing but the finished kernel is left in the cache.
    assert [p.name for p in (cache / "kernel").iterdir()] == [kernel.key]
    # Cached: the second call does not build.
    again: list[str] = []
    assert kernelbuild.ensure_kernel(cache, again.append) == kernel
    assert again == []


def test_a_failed_build_leaves_nothing_behind(fake_source: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def dies(tmp: Path, out: Path, fragment: str, on_progress: object) -> None:
        (out / kernelbuild.VMLINUX).write_bytes(b"half")
        raise KeyboardInterrupt  # as a killed build would stop
    monkeypatch.setattr(kernelbuild, "_build", dies)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        kernelbuild.ensure_kernel(cache, lambda _: None)
    assert list((cache / "kernel").iterdir()) == []


def test_a_dropped_option_fails_the_build_by_name(fake_source: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    fragment = tmp_path / "microvm.config"
    fragment.write_text(FRAGMENT)
    monkeypatch.setattr(kernelbuild, "CONFIG_FRAGMENT", fragment)
    real_step = kernelbuild._step

    def step(argv: list[str], cwd: Path) -> str:
        out = real_step(argv, cwd)
        if argv[-1] == "olddefconfig":  # as if a dependency were missing
            config = (cwd / ".config").read_text()
            (cwd / ".config").write_text(config.replace("CONFIG_VIRTIO_BLK=y",
                                                        "# CONFIG_VIRTIO_BLK is not set"))
        return out
    monkeypatch.setattr(kernelbuild, "_step", step)
    with pytest.raises(kernelbuild.KernelBuildError, match="CONFIG_VIRTIO_BLK=y"):
        kernelbuild.ensure_kernel(tmp_path / "cache", lambda _: None)


def test_a_missing_build_tool_is_named_with_its_package(fake_source: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = kernelbuild.shutil.which
    monkeypatch.setattr(kernelbuild.shutil, "which",
                        lambda tool: None if tool == "bison" else real_which(tool))
    with pytest.raises(kernelbuild.KernelBuildError, match="apt install bison"):
        kernelbuild.ensure_kernel(tmp_path / "cache", lambda _: None)


def test_no_source_package_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernelbuild, "SOURCE_TARBALL", tmp_path / "missing.tar.xz")
    with pytest.raises(kernelbuild.KernelBuildError, match=r"linux-source-6\.1"):
        kernelbuild.source_version()


def test_image_recipe_changes_with_the_kernel_config(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernelbuild, "_dpkg_version", lambda: "6.1.999-1")
    kernelbuild._version_cache.clear()
    before = imagebuild.recipe_digest()
    fragment = tmp_path / "microvm.config"
    fragment.write_text(FRAGMENT + "CONFIG_NEW_THING=y\n")
    monkeypatch.setattr(kernelbuild, "CONFIG_FRAGMENT", fragment)
    assert imagebuild.recipe_digest() != before
    kernelbuild._version_cache.clear()


def test_a_cancelled_compile_stops_make_and_its_children(fake_source: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    pidfile = tmp_path / "child.pid"
    makefile = (f"vmlinux:\n\t@sleep 60 & echo $$! > {pidfile}; "
                f"echo '  CC      a.o'; wait\n").encode()
    src = tmp_path / "src"
    src.mkdir()
    (src / "Makefile").write_bytes(makefile)

    def progress(line: str) -> None:
        raise KeyboardInterrupt  # the operation was cancelled while compiling

    with pytest.raises(KeyboardInterrupt):
        kernelbuild._make_vmlinux(src, 1, progress)
    child = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # killed at once; reaped by init shortly after
            os.kill(child, 0)
            time.sleep(0.05)


def test_a_build_removes_the_trees_of_killed_builds_but_not_of_live_ones(
        fake_source: Path, tmp_path: Path) -> None:
    # A daemon killed while it built left its ~1 GiB tree; another build (or the make of
    # a killed one, which holds its directory) is still at work in its own.
    parent = tmp_path / "cache" / "kernel"
    dead, live = parent / ".build-dead", parent / ".build-live"
    for d in (dead, live):
        (d / "linux-source-6.1").mkdir(parents=True)
        (d / "linux-source-6.1" / "Makefile").write_text("x")
        os.utime(d, (0, 0))
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        kernel = kernelbuild.ensure_kernel(tmp_path / "cache", lambda _: None)
        assert sorted(p.name for p in parent.iterdir()) == sorted([".build-live",
                                                                   kernel.key])
    finally:
        os.close(fd)


def test_make_holds_its_build_directory(tmp_path: Path) -> None:
    # Its parent's (the daemon's) death leaves make running: make keeps the directory held.
    src = tmp_path / "build" / "src"
    src.mkdir(parents=True)
    (src / "Makefile").write_text(
        f"vmlinux:\n\t@for f in /proc/$$PPID/fd/*; do readlink $$f; done > {tmp_path}/fds\n")
    kernelbuild._make_vmlinux(src, 1, lambda _: None)
    assert str(src.parent) in (tmp_path / "fds").read_text().splitlines()
