"""The disk port on this host: qcow2 overlays and work disks built without mounting
(banger.host.disks), their errors said as the use cases' own."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from banger.host import disks
from banger.model.errors import InvalidRequest


class LocalDisks:
    def create_overlay(self, base: Path, overlay: Path) -> None:
        disks.create_overlay(base, overlay)

    def backing_of(self, overlay: Path) -> Path | None:
        return disks.backing_of(overlay)

    def build_work_disk(self, path: Path, size_bytes: int,
                        files: Mapping[str, tuple[bytes, int]],
                        trees: Mapping[str, Path] | None = None) -> None:
        try:
            disks.build_work_disk(path, size_bytes, files, trees)
        except disks.DiskError as exc:
            raise InvalidRequest(str(exc)) from exc
