"""First-run image build time: the default image built from scratch into a temp dir.

    uv run python bench/image_build.py
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from benchlib import write_result

from banger.host import imagebuild


def main() -> None:
    d = Path(tempfile.mkdtemp(prefix="bgimg-", dir="/var/tmp"))
    stages: list[tuple[float, str]] = []
    started = time.monotonic()
    try:
        a = imagebuild.build_default_image(
            d / "debian-bookworm",
            on_progress=lambda s: stages.append((time.monotonic() - started, s)))
        total = time.monotonic() - started
        sizes = {p.name: p.stat().st_size for p in (a.rootfs, a.kernel, a.initrd)}
        used = {p.name: p.stat().st_blocks * 512 for p in (a.rootfs, a.kernel, a.initrd)}
    finally:
        shutil.rmtree(d, ignore_errors=True)
    result = {"image_build_s": total, "stages": stages, "apparent_bytes": sizes,
              "allocated_bytes": used}
    write_result("image_build", result)


if __name__ == "__main__":
    main()
