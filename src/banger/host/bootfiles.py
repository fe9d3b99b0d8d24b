"""Boot files cut from Debian packages: the uncompressed vmlinux and the initramfs.

Owns two transformations, both without root: the LZ4 payload of a bzImage becomes the
ELF ``vmlinux`` that QEMU microvm (and Firecracker) boot directly, and a busybox-static
binary plus the virtio modules of that kernel become a tiny newc initramfs. The cpio is
written here rather than by ``cpio`` so every entry is owned by root and ``/dev/console``
exists without ``mknod`` privileges.
"""

from __future__ import annotations

import gzip
import lzma
import os
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from banger.host.runner import run

# Legacy LZ4 frame magic as the kernel's compressor writes it (0x184C2102, little-endian).
LZ4_MAGIC = b"\x02\x21\x4c\x18"
ELF_MAGIC = b"\x7fELF"

# The drivers a microVM guest needs before it can mount its root disk and reach the
# network; the cloud kernel builds them as modules.
INITRD_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
)


class BootFileError(Exception):
    """A kernel or initramfs could not be produced from the given inputs."""


def extract_vmlinux(bzimage: Path, out: Path) -> None:
    """Write the uncompressed ELF kernel found inside ``bzimage`` to ``out``."""
    data = bzimage.read_bytes()
    at = data.find(LZ4_MAGIC)
    if at < 0:
        raise BootFileError(f"{bzimage}: no LZ4 payload (magic 02 21 4c 18) found")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        payload = Path(tmp) / "payload.lz4"
        payload.write_bytes(data[at:])
        # The bzImage carries trailing data after the LZ4 stream, which lz4 reports as
        # an error after it has written the whole kernel: judge by the result instead.
        res = run(["lz4", "-d", "-f", "-q", str(payload), str(out)], check=False)
    with out.open("rb") as f:
        head = f.read(4)
    if head != ELF_MAGIC or out.stat().st_size < 1 << 20:
        raise BootFileError(f"{bzimage}: decompressed kernel is not an ELF image "
                            f"(lz4 exit {res.returncode}: {res.stderr.strip()})")


def module_load_order(modules_dir: Path, wanted: Iterable[str]) -> list[str]:
    """Relative paths of the modules for ``wanted`` and their dependencies, deps first.

    Names missing from modules.dep are skipped: they are built into the kernel.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[_module_name(mod)] = mod
    order: list[str] = []

    def visit(mod: str, trail: tuple[str, ...]) -> None:
        if mod in order or mod in trail:
            return
        for dep in deps.get(mod, []):
            visit(dep, (*trail, mod))
        order.append(mod)

    for name in wanted:
        found = by_name.get(name.replace("-", "_"))
        if found is not None:
            visit(found, ())
    return order


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _module_bytes(path: Path) -> bytes:
    """The plain ELF module: busybox insmod cannot read compressed ones."""
    name = path.name
    if name.endswith(".xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".zst"):
        with tempfile.TemporaryDirectory() as tmp:
            plain = Path(tmp) / "m.ko"
            run(["zstd", "-d", "-q", "-f", str(path), "-o", str(plain)])
            return plain.read_bytes()
    return path.read_bytes()


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def build_initramfs(*, busybox: Path, init_script: Path, modules_dir: Path,
                    out: Path, modules: Sequence[str] = INITRD_MODULES) -> list[str]:
    """Write a newc initramfs to ``out``; returns the module load order it carries."""
    order = module_load_order(modules_dir, modules)
    entries: list[_Entry] = []
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"):
        entries.append(_Entry(d, stat.S_IFDIR | 0o755))
    entries.append(_Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)))
    entries.append(_Entry("dev/null", stat.S_IFCHR | 0o666, rdev=(1, 3)))
    entries.append(_Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
    entries.append(_Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"))
    entries.append(_Entry("init", stat.S_IFREG | 0o755, init_script.read_bytes()))
    flat: list[str] = []
    for rel in order:
        # Flat names inside the initramfs: nothing there walks the modules tree.
        target = _module_name(rel) + ".ko"
        entries.append(_Entry(f"lib/modules/{target}", stat.S_IFREG | 0o644,
                              _module_bytes(modules_dir / rel)))
        flat.append(target)
    entries.append(_Entry("lib/modules/load-order", stat.S_IFREG | 0o644,
                          "".join(f"{m}\n" for m in flat).encode()))
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("wb") as f:
        for chunk in _newc(entries):
            f.write(chunk)
    os.replace(tmp, out)
    return flat


def _newc(entries: Sequence[_Entry]) -> Iterator[bytes]:
    """The SVR4 "newc" cpio format the kernel unpacks, every entry owned by root."""
    for ino, e in enumerate([*entries, _Entry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        fields = (ino if e.name != "TRAILER!!!" else 0, e.mode, 0, 0, 1, 0, len(e.data),
                  0, 0, e.rdev[0], e.rdev[1], len(name), 0)
        header = b"070701" + b"".join(b"%08X" % v for v in fields)
        yield header + name + _pad(len(header) + len(name))
        if e.data:
            yield e.data + _pad(len(e.data))


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)
