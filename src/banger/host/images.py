"""The image port on this host: images built locally on first use (banger.host.imagebuild),
content-addressed and verified when read back."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

from banger.host import imagebuild, kernelbuild
from banger.host.bootid import boot_id
from banger.ports import ImageInfo


class LocalImages:
    """Images built locally on first use, content-addressed and verified when read back."""

    def __init__(self, root: Path, cache_dir: Path | None = None) -> None:
        self.root = root
        self._cache_dir = cache_dir  # where the guest agent is built (None: per image)
        self._lock = threading.Lock()  # concurrent first uses coalesce into one build

    def known(self) -> list[str]:
        return list(imagebuild.IMAGE_VARIANTS)

    def _info(self, a: imagebuild.ImageArtifacts, name: str) -> ImageInfo:
        return ImageInfo(name=name, rootfs=a.rootfs, kernel=a.kernel, initrd=a.initrd,
                         cmdline=a.cmdline, kernel_version=a.kernel_version,
                         microvm_kernel=a.microvm_kernel,
                         microvm_kernel_version=a.microvm_kernel_version)

    def get(self, name: str) -> ImageInfo | None:
        d = self.root / name
        if not (d / "manifest.json").exists() or not imagebuild.is_current(d):
            return None  # not built, or built from an older recipe: build() replaces it
        # Hashing the 2 GiB rootfs costs ~2 s: verify once per host boot and file identity,
        # recorded next to the image, instead of at every daemon start.
        stamp = d / ".verified.json"
        key = _identity(d, ["manifest.json", *(n for n in imagebuild.ARTIFACTS
                                               if (d / n).exists())])
        try:
            trusted = json.loads(stamp.read_text()) == key
        except (OSError, ValueError):
            trusted = False
        artifacts = imagebuild.load_image(d, verify=not trusted)
        if not trusted:
            with contextlib.suppress(OSError):  # a read-only shared image dir is fine
                stamp.write_text(json.dumps(key))
        return self._info(artifacts, name)

    def build(self, name: str, on_progress: Callable[[str], None]) -> ImageInfo:
        with self._lock:
            found = self.get(name)
            if found is not None:
                return found
            stale = (self.root / name / "manifest.json").exists()
            on_progress(f"image {name!r} " + ("was built from an older recipe: rebuilding it"
                                             if stale else "is not built yet: building it once")
                        + " (about a minute" + self._kernel_note() + ")")
            self.root.mkdir(parents=True, exist_ok=True)
            return self._info(imagebuild.build_default_image(
                self.root / name, on_progress=on_progress,
                variant=imagebuild.IMAGE_VARIANTS[name], agent_cache=self._cache_dir), name)

    def _kernel_note(self) -> str:
        cache = self._cache_dir
        try:
            if cache is not None and kernelbuild.cached(cache, kernelbuild.current_key()):
                return ""
        except kernelbuild.KernelBuildError:
            pass  # the build itself names the missing package
        return ", plus about 9 min on 2 cores to build the microVM kernel once"


def _identity(d: Path, names: list[str]) -> dict[str, object]:
    files = {}
    for n in names:
        st = (d / n).stat()
        files[n] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return {"boot_id": boot_id(), "files": files}
