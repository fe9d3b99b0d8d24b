"""The image port on this host: the built-in images, built locally on first use
(banger.host.imagebuild), and OCI images pulled or imported (banger.host.ociimages); both
content-addressed and verified when read back."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

from banger.host import imagebuild, kernelbuild
from banger.host.bootid import boot_id
from banger.host.ociimages import OciImage, OciImages, check_name
from banger.host.ocilayout import OciError
from banger.model.errors import InvalidRequest, OperationFailed
from banger.ports import ImageInfo, ImageRecord


class LocalImages:
    """Images built locally on first use, content-addressed and verified when read back."""

    def __init__(self, root: Path, cache_dir: Path | None = None,
                 oci_root: Path | None = None) -> None:
        self.root = root
        self._cache_dir = cache_dir  # where the guest agent is built (None: per image)
        self._lock = threading.Lock()  # concurrent first uses coalesce into one build
        # OCI images live with the user's state (the built-in images' dir may be shared);
        # a kernel already built beside the built-in images is reused.
        self.oci = None if oci_root is None else OciImages(
            oci_root, cache_dir or oci_root / "cache", kernel_caches=(root.parent,))

    def known(self) -> list[str]:
        return list(imagebuild.IMAGE_VARIANTS) + (self.oci.names() if self.oci else [])

    def _oci(self, name: str) -> OciImage | None:
        if self.oci is None or name in imagebuild.IMAGE_VARIANTS:
            return None
        try:
            return self.oci.get(name)
        except OciError as exc:
            raise OperationFailed(str(exc)) from exc

    def _verified_oci(self, o: OciImage) -> OciImage:
        """Checked against its manifest once per host boot and file identity, like the
        built-in images (cheap: the digest skips the root disk's holes)."""
        assert self.oci is not None
        stamp = o.dir / ".verified.json"
        key = _identity(o.dir, ["manifest.json", o.rootfs.name, o.kernel.name])
        try:
            if json.loads(stamp.read_text()) == key:
                return o
        except (OSError, ValueError):
            pass
        try:
            checked = self.oci.get(o.name, verify=True)
        except (OciError, OSError) as exc:
            raise OperationFailed(f"image {o.name!r} is damaged: {exc}; pull or import it "
                                  "again") from exc
        assert checked is not None
        with contextlib.suppress(OSError):
            stamp.write_text(json.dumps(key))
        return checked

    def describe(self, name: str) -> ImageRecord | None:
        if name in imagebuild.IMAGE_VARIANTS:
            d = self.root / name
            # Cheap (every exec asks): a stale build is replaced at the next start anyway.
            return ImageRecord(name=name, kind="built-in", built=(d / "manifest.json").exists(),
                               source=f"mmdebstrap {imagebuild.SUITE} "
                                      f"({imagebuild.IMAGE_VARIANTS[name]})")
        o = self._oci(name)
        if o is None:
            return None
        c = o.config
        return ImageRecord(name=name, kind="oci", built=True, source=o.source,
                           digest=o.manifest_digest, size_bytes=o.size_bytes, env=c.env,
                           workdir=c.working_dir, entrypoint=c.entrypoint, cmd=c.cmd,
                           user=c.user)

    def records(self) -> list[ImageRecord]:
        return [r for n in self.known() if (r := self.describe(n)) is not None]

    def pull(self, ref: str, name: str, *, archive: bool,
             on_progress: Callable[[str], None]) -> ImageRecord:
        if self.oci is None:
            raise OperationFailed("this daemon keeps no OCI images")
        if name in imagebuild.IMAGE_VARIANTS:
            raise InvalidRequest(f"image name {name!r} is banger's built-in image: "
                                 "choose another --name")
        try:
            check_name(name)
        except OciError as exc:
            raise InvalidRequest(str(exc)) from exc
        try:
            self.oci.pull(ref, name, on_progress, archive=archive)
        except OciError as exc:
            raise OperationFailed(str(exc)) from exc
        found = self.describe(name)
        assert found is not None
        return found

    def _info(self, a: imagebuild.ImageArtifacts, name: str) -> ImageInfo:
        return ImageInfo(name=name, rootfs=a.rootfs, kernel=a.kernel, initrd=a.initrd,
                         cmdline=a.cmdline, kernel_version=a.kernel_version,
                         microvm_kernel=a.microvm_kernel,
                         microvm_kernel_version=a.microvm_kernel_version)

    def get(self, name: str) -> ImageInfo | None:
        o = self._oci(name)
        if o is not None:
            o = self._verified_oci(o)
            return ImageInfo(name=name, rootfs=o.rootfs, kernel=o.kernel, initrd=o.kernel,
                             cmdline=o.cmdline, microvm_kernel=o.kernel,
                             microvm_kernel_version=o.kernel_version, cloud_kernel=False)
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
