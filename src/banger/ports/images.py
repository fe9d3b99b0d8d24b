"""The image port: built-in and OCI images as the start pipeline and the image use
cases see them (re-exported by :mod:`banger.ports`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol


@dataclass(frozen=True)
class ImageInfo:
    name: str
    rootfs: Path
    kernel: Path
    initrd: Path
    cmdline: str
    kernel_version: str = ""
    # banger's microVM kernel (built in drivers, no initramfs); None: an image without it.
    microvm_kernel: Path | None = None
    microvm_kernel_version: str = ""
    cloud_kernel: bool = True  # False: an OCI image, which boots the microVM kernel only


@dataclass(frozen=True)
class ImageRecord:
    """An image as listed: a built-in one (built on first use) or one pulled/imported from
    OCI, with what its config asks of a command (Env, WorkingDir, Entrypoint, Cmd, User)."""

    name: str
    kind: Literal["built-in", "oci"]
    built: bool
    source: str = ""
    digest: str = ""
    size_bytes: int = 0
    env: tuple[str, ...] = ()
    workdir: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""


class ImagePort(Protocol):
    def known(self) -> list[str]: ...

    def get(self, name: str) -> ImageInfo | None:
        """The built and verified image, or None when it is not built yet."""

    def build(self, name: str, on_progress: Callable[[str], None]) -> ImageInfo: ...

    def describe(self, name: str) -> ImageRecord | None:
        """The image's record without verifying it (cheap: for every exec)."""

    def records(self) -> list[ImageRecord]: ...

    def pull(self, ref: str, name: str, *, archive: bool,
             on_progress: Callable[[str], None]) -> ImageRecord:
        """Fetch an OCI image (a registry ref; with ``archive`` a local archive or layout)
        and make image ``name`` from it, replacing one of that name only once complete."""
