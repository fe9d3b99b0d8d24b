"""First-run image build time: the default image built from scratch into a temp dir.

    uv run python bench/image_build.py
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

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
    out = json.dumps(result, indent=2)
    print(out)
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "image_build.json").write_text(out + "\n")


if __name__ == "__main__":
    main()
