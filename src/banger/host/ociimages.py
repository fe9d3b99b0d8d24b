"""OCI images on this host: pulled or imported with skopeo into the shared layout, their
layers applied into a rootfs, banger's boot path added, an ext4 root disk built, and the
whole image directory renamed into place only once complete.

``<root>/layout`` is the OCI layout (blobs by digest, shared by every image: a pull that
failed half way leaves only whole, verified blobs behind, which the next pull reuses);
``<root>/images/<name>`` is a symlink to one build, ``<root>/builds/<name>-<digest>-<ns>/``,
swapped whole by the next pull of that name while the old build stays (VMs made from it
keep their backing file; removing unused builds is for a prune): ``rootfs.ext4``,
``vmlinux-microvm`` (banger's kernel, copied in so the image stays bootable when the kernel
is rebuilt), and ``manifest.json`` with the source, the OCI digests, the image config (Env,
WorkingDir, Entrypoint, Cmd, User) and every artifact's size and sparse sha256.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from banger.host import agentbin, kernelbuild, ocidisk, ocilayout
from banger.host.ocilayers import BlobMismatch, LayerError, Rootfs
from banger.host.ocilayout import ImageConfig, OciError
from banger.host.runner import CommandError, run
from banger.model.images import IMAGE_NAME_PATTERN, IMAGE_NAME_RULE

KIND = "oci"
MANIFEST = "manifest.json"
ROOTFS = "rootfs.ext4"
KERNEL = "vmlinux-microvm"
_NAME = re.compile(IMAGE_NAME_PATTERN)
log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class OciImage:
    name: str
    dir: Path
    rootfs: Path
    kernel: Path
    kernel_version: str
    cmdline: str
    source: str
    manifest_digest: str
    config: ImageConfig
    size_bytes: int  # on disk (the root disk is sparse)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise OciError(f"image name {name!r}: {IMAGE_NAME_RULE}")
    return name


class OciImages:
    def __init__(self, root: Path, cache_dir: Path, kernel_caches: tuple[Path, ...] = ()) -> None:
        self.root = root
        self.layout = root / "layout"
        self.images = root / "images"  # <name> -> ../builds/<build>, swapped whole
        self.builds = root / "builds"
        self._cache_dir = cache_dir
        # Where a built microVM kernel may already be (the images' cache, a shared one).
        self._kernel_caches = (*kernel_caches, cache_dir)

    def names(self) -> list[str]:
        if not self.images.is_dir():
            return []
        return sorted(p.name for p in self.images.iterdir() if self._dir(p.name) is not None)

    def _dir(self, name: str) -> Path | None:
        """The build ``images/<name>`` points to (never a path outside ``builds/``)."""
        link = self.images / name
        if not _NAME.match(name) or not link.is_symlink():
            return None
        target = os.readlink(link)
        if "/" in target.removeprefix("../builds/") or not target.startswith("../builds/"):
            return None
        d = self.builds / target.removeprefix("../builds/")
        return d if (d / MANIFEST).is_file() else None

    def get(self, name: str, *, verify: bool = False) -> OciImage | None:
        d = self._dir(name)
        if d is None:
            return None
        try:
            m = json.loads((d / MANIFEST).read_text())
            arts = m["artifacts"]
            if verify:
                for fname, meta in arts.items():
                    if sparse_sha256(d / fname) != meta["sparse_sha256"]:
                        raise OciError(f"image {name!r}: {fname} does not match its manifest")
            return OciImage(name=name, dir=d, rootfs=d / ROOTFS, kernel=d / KERNEL,
                            kernel_version=str(m.get("kernel_version", "")),
                            cmdline=str(m.get("cmdline", ocidisk.CMDLINE)),
                            source=str(m.get("source", "")),
                            manifest_digest=str(m.get("manifest_digest", "")),
                            config=ImageConfig.from_json(m.get("config", {})),
                            size_bytes=sum((d / f).stat().st_blocks * 512 for f in arts))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise OciError(f"image {name!r}: unreadable manifest: {exc}") from exc

    def pull(self, ref: str, name: str, on_progress: Progress, *, archive: bool = False
             ) -> OciImage:
        """Fetch ``ref`` (a registry reference, or with ``archive`` a local archive or
        layout) and make image ``name`` from it."""
        check_name(name)
        src, opts = ocilayout.source(ref, archive=archive)
        with self._locked():
            started = time.monotonic()
            on_progress(f"copying {src} into the layer cache (skopeo)")
            ocilayout.copy(src, opts, self.layout, name)
            image = ocilayout.read(self.layout, name)
            on_progress(f"{len(image.layers)} layer(s) verified "
                        f"({sum(la.size for la in image.layers) >> 20} MiB compressed)")
            self.images.mkdir(parents=True, exist_ok=True)
            self.builds.mkdir(parents=True, exist_ok=True)
            for stale in self.builds.glob(".*.build-*"):  # a pull the daemon's death cut
                _rmtree(stale)
            work = Path(tempfile.mkdtemp(prefix=f".{name}.build-", dir=self.builds))
            try:
                built = self._build(work, image, name, src, on_progress)
                # A build is never replaced: VMs made from an earlier pull of this name
                # keep booting from theirs (their root overlays name it as backing file).
                build_id = (f"{name}-{image.manifest_digest.split(':')[-1][:12]}-"
                            f"{time.time_ns()}")
                os.replace(built, self.builds / build_id)
                tmp_link = self.images / f".{name}.link-{os.getpid()}"
                tmp_link.unlink(missing_ok=True)
                tmp_link.symlink_to(f"../builds/{build_id}")
                os.replace(tmp_link, self.images / name)
            finally:
                _rmtree(work)
            on_progress(f"image {name!r} ready ({time.monotonic() - started:.1f} s)")
        found = self.get(name)
        assert found is not None
        return found

    def _build(self, work: Path, image: ocilayout.Image, name: str, src: str,
               on_progress: Progress) -> Path:
        rootfs = Rootfs(work / "rootfs")
        for i, layer in enumerate(image.layers, 1):
            on_progress(f"applying layer {i}/{len(image.layers)} {layer.digest[:19]} "
                        f"({layer.size / (1 << 20):.1f} MiB)")
            blob = ocilayout.blob_path(self.layout, layer.digest)
            try:
                rootfs.apply(blob, layer.media_type, label=layer.digest[:19],
                             digest=layer.digest)
            except BlobMismatch as exc:
                ocilayout.drop_blob(blob)  # under the pull's lock
                raise OciError(f"{exc}; removed from the cache, pull again") from exc
            except LayerError as exc:
                raise OciError(str(exc)) from exc
        rootfs.finish()
        agent = agentbin.ensure_agent(self._cache_dir)
        kernel = self._kernel(on_progress)
        out = work / "image"
        out.mkdir()
        on_progress("adding banger's boot path (/.banger: init, busybox, agent)")
        ocidisk.inject_boot_path(rootfs.root, agent)
        on_progress("building rootfs.ext4 (mke2fs -d)")
        used = ocidisk.build_ext4(rootfs.root, out / ROOTFS, rootfs.owners)
        on_progress(f"rootfs.ext4 built ({used} MiB of files)")
        _rmtree(rootfs.root)
        shutil.copyfile(kernel.vmlinux, out / KERNEL)
        arts = {f: {"sparse_sha256": sparse_sha256(out / f), "size": (out / f).stat().st_size}
                for f in (ROOTFS, KERNEL)}
        manifest = {"kind": KIND, "name": name, "source": src,
                    "manifest_digest": image.manifest_digest,
                    "config_digest": image.config_digest,
                    "layers": [la.digest for la in image.layers],
                    "config": image.config.to_json(), "cmdline": ocidisk.CMDLINE,
                    "kernel_version": kernel.release, "artifacts": arts,
                    "built_at": datetime.now(UTC).isoformat(timespec="seconds")}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return out

    def _kernel(self, on_progress: Progress) -> kernelbuild.Kernel:
        try:
            key = kernelbuild.current_key()
        except kernelbuild.KernelBuildError as exc:
            raise OciError(str(exc)) from exc
        for cache in self._kernel_caches:
            found = kernelbuild.cached(cache, key)
            if found is not None:
                return found
        on_progress("building banger's microVM kernel once (about 9 min on 2 cores)")
        return kernelbuild.ensure_kernel(self._cache_dir, on_progress)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One pull or delete at a time per state directory (across processes too)."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


def sparse_sha256(path: Path) -> str:
    """A digest of a file's content that costs what its data costs, not its size: the
    sha256 of its size and, per MiB, either "zero" (a hole, found with SEEK_DATA without
    reading it, or a chunk of zeros read) or the chunk itself. The same content gives the
    same digest whether its zeros are holes or written out; a 1 GiB root disk holding
    5 MiB of files is hashed in milliseconds, not seconds."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        h.update(b"size %d\n" % size)
        off = 0
        while off < size:
            n = min(_CHUNK, size - off)
            try:
                data_at = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data_at = size  # only a hole from here on
            if data_at >= off + n:
                h.update(b"Z")
                off += n
                continue
            os.lseek(fd, off, os.SEEK_SET)
            chunk = f.read(n)
            if len(chunk) != n:
                raise OSError(errno.EIO, f"{path}: short read at {off}")
            h.update(b"Z" if chunk == _ZEROS[:n] else b"D" + chunk)
            off += n
    return h.hexdigest()


def _rmtree(path: Path) -> None:
    """Remove a build tree however deep or read-only a layer left it (GNU chmod and rm
    walk without recursion limits); a failure is logged, never raised: a tree left behind
    must not stop this pull or the next."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path):  # chmod would follow a link named on its command line
        path.unlink()
        return
    for argv in (["chmod", "-R", "u+rwx", "--", str(path)], ["rm", "-rf", "--", str(path)]):
        try:
            run(argv, timeout=1800, check=argv[0] == "rm")
        except CommandError as exc:
            log.warning("could not remove %s (left for the next pull): %s", path, exc)
