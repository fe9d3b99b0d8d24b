"""`image pull` of an OCI image from a registry on loopback to a bootable image (skopeo
copy into the layer cache, digests checked, layers applied, boot path added, ext4 built,
kernel copied, manifest written), against `skopeo copy` of the same image to a directory,
in the same run. The image: the static busybox plus a layer of SIZE_MB incompressible
bytes (so the registry serves SIZE_MB and every step handles them).

    uv run python bench/oci_pull.py [SIZE_MB] [RUNS]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests import ocimake

from banger.host.ociimages import OciImages

KERNEL_CACHE = Path.home() / ".cache" / "banger-test"  # the e2e prebuild's kernel


def main() -> None:
    size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    tmp = Path(tempfile.mkdtemp(prefix="bgoci-bench-", dir="/var/tmp"))
    registry = ocimake.Registry(tmp / "registry")
    try:
        big = ocimake.tar_layer([("data", "dir", b"", 0o755),
                                 ("data/blob", "file", os.urandom(size_mb << 20), 0o644)])
        ref = registry.push([ocimake.busybox_layer(), big], "big", tmp)
        skopeo, banger = [], []
        for i in range(runs):
            dest = tmp / f"dir-{i}"
            t = time.monotonic()
            subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                            f"docker://{ref}", f"dir:{dest}"], check=True)
            skopeo.append(time.monotonic() - t)
            shutil.rmtree(dest)
            images = OciImages(tmp / f"oci-{i}", KERNEL_CACHE, kernel_caches=(KERNEL_CACHE,))
            t = time.monotonic()
            images.pull(ref, "big", lambda _: None)
            banger.append(time.monotonic() - t)
            shutil.rmtree(tmp / f"oci-{i}")
        result = {"size_mb": size_mb, "runs": runs, "skopeo_copy_dir_s": skopeo,
                  "banger_pull_s": banger,
                  "skopeo_median_s": statistics.median(skopeo),
                  "banger_median_s": statistics.median(banger),
                  "ratio": statistics.median(banger) / statistics.median(skopeo)}
        write_result("oci_pull", result)
    finally:
        registry.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
