"""The default guest image (Debian bookworm), built locally, and reading images back.

Owns the build recipe (mmdebstrap from the machine's configured Debian mirror, our own
init, banger's microVM kernel (:mod:`banger.host.kernelbuild`, booted with no initramfs),
and as the fallback a kernel cut from Debian's cloud kernel package with a busybox
initramfs carrying its virtio modules), the image
directory layout, and ``manifest.json`` with the sha256 and size of every artifact, which
:func:`load_image` verifies. Works as root and as an unprivileged user: mmdebstrap's
unshare mode gives the customize hook a namespace where it is uid 0, and the ext4 image
is made there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path, PurePosixPath

from banger.host import agentbin, aptsources, bootfiles, kernelbuild
from banger.host.runner import run

IMAGE_NAME = "debian-bookworm"
SUITE = aptsources.SUITE
MANIFEST = "manifest.json"
ROOTFS = "rootfs.ext4"
KERNEL = "vmlinux"
INITRD = "initrd.img"
# banger's own kernel (host/kernelbuild.py): everything built in, boots without INITRD.
MICROVM_KERNEL = "vmlinux-microvm"
ARTIFACTS: tuple[str, ...] = (ROOTFS, KERNEL, INITRD, MICROVM_KERNEL)
GUEST_INIT = "/sbin/banger-init"

# Image variants: "minimal" boots banger-init and then busybox init (the fast default);
# "systemd" runs the same banger-init setup and then hands PID 1 to systemd, for
# workloads that need real units, dbus, systemctl... (about twice the boot time).
MINIMAL = "minimal"
SYSTEMD = "systemd"
VARIANTS: tuple[str, ...] = (MINIMAL, SYSTEMD)
# Image name -> variant, for every image banger knows how to build.
IMAGE_VARIANTS: dict[str, str] = {"debian-bookworm": MINIMAL,
                                  "debian-bookworm-systemd": SYSTEMD}
VARIANT_IMAGES: dict[str, str] = {v: k for k, v in IMAGE_VARIANTS.items()}
# Extra kernel arguments each variant needs, whatever VMM boots it: banger-init is
# always the kernel's init; banger.init= says what it hands PID 1 to.
IMAGE_CMDLINES: dict[str, str] = {
    MINIMAL: f"init={GUEST_INIT}",
    SYSTEMD: f"init={GUEST_INIT} banger.init=systemd",
}
IMAGE_CMDLINE = IMAGE_CMDLINES[MINIMAL]

PACKAGES: tuple[str, ...] = (
    "openssh-server", "git", "ca-certificates", "iproute2", "procps", "less", "curl",
    "make", "python3", "busybox", "kmod",
)
# What a variant installs on top of PACKAGES. dbus: systemctl works without it, but
# hostnamectl, loginctl, busctl, systemd-run and most service software do not.
VARIANT_PACKAGES: dict[str, tuple[str, ...]] = {
    MINIMAL: (),
    SYSTEMD: ("systemd-sysv", "dbus"),
}
# Docs, man pages and translations are a third of a minimal system and nobody reads
# them in a sandbox; copyright files stay.
DPKG_EXCLUDES: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
)
GUEST_FILES: tuple[str, ...] = (
    "banger-init", "banger-poweroff", "customize-hook", "fstab", "initrd-init", "inittab",
    "sshd_config",
)
# Guest files only a variant uses (installed by customize-hook for that variant).
VARIANT_GUEST_FILES: dict[str, tuple[str, ...]] = {
    MINIMAL: (),
    SYSTEMD: ("systemd-tune", "banger-agent.service", "banger-sshd-ready.service",
              "journald-banger.conf", "ssh-banger.conf"),
}
_DATA_FILES = ("fstab", "inittab", "sshd_config")  # installed 0644; everything else is a script


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"unknown image variant {variant!r} (known: {', '.join(VARIANTS)})")
    return variant


def packages(variant: str = MINIMAL) -> tuple[str, ...]:
    return PACKAGES + VARIANT_PACKAGES[_check_variant(variant)]


def guest_files(variant: str = MINIMAL) -> tuple[str, ...]:
    return GUEST_FILES + VARIANT_GUEST_FILES[_check_variant(variant)]


def image_cmdline(variant: str = MINIMAL) -> str:
    return IMAGE_CMDLINES[_check_variant(variant)]


def recipe_digest(variant: str = MINIMAL) -> str:
    """What an image variant is built from: packages, dpkg filters, kernel arguments,
    every guest file it installs, the guest agent's sources (and compiler flags) and the
    microVM kernel's cache key (its config fragment, source version and build recipe).

    Recorded in the manifest; an image whose recipe differs from this banger's (its init,
    sshd config, ...) is stale and is rebuilt rather than booted with a mismatched guest.
    """
    h = hashlib.sha256()
    h.update(repr((SUITE, variant, packages(variant), DPKG_EXCLUDES,
                   image_cmdline(variant))).encode())
    guest = resources.files("banger.host") / "guest"
    for name in guest_files(variant):
        h.update(name.encode() + b"\0" + (guest / name).read_bytes() + b"\0")
    h.update(b"agent\0" + agentbin.source_hash(agentbin.read_sources()).encode())
    h.update(b"kernel\0" + kernelbuild.current_key().encode())
    return h.hexdigest()[:16]


def is_current(dir: Path) -> bool:
    """True when ``dir`` holds an image built from this banger's recipe for the variant
    its manifest records (an image from before variants is the minimal one)."""
    try:
        manifest = json.loads((dir / MANIFEST).read_text())
        variant = str(manifest.get("variant", MINIMAL))
        return variant in VARIANTS and bool(manifest.get("recipe") == recipe_digest(variant))
    except (OSError, ValueError, AttributeError, kernelbuild.KernelBuildError):
        # No linux-source package: not current; build() then names the package.
        return False


class ImageError(Exception):
    """The image could not be built or read."""


class ImageCorrupt(ImageError):
    """An artifact does not match the digest or size its manifest records."""


@dataclass(frozen=True)
class ImageArtifacts:
    dir: Path
    rootfs: Path
    kernel: Path
    initrd: Path
    kernel_version: str
    init: str  # path of the guest init inside the rootfs: "/sbin/banger-init"
    cmdline: str  # extra kernel args the image needs
    variant: str = MINIMAL  # "minimal" | "systemd"
    microvm_kernel: Path | None = None  # banger's kernel (None: an image from before it)
    microvm_kernel_version: str = ""


# --- building ---------------------------------------------------------------------


def build_default_image(out_dir: Path, *, on_progress: Callable[[str], None],
                        mirror: str | None = None, variant: str = MINIMAL,
                        agent_cache: Path | None = None) -> ImageArtifacts:
    """Build the default image, or its ``variant``, into ``out_dir`` (replaced only once
    complete).

    ``agent_cache``: banger's cache directory, where the guest agent and the microVM kernel
    are built once per source version (:func:`banger.host.agentbin.ensure_agent`,
    :func:`banger.host.kernelbuild.ensure_kernel`); None builds them afresh for this image
    only."""
    _check_variant(variant)
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # mmdebstrap's unshare mode runs the hook as a subordinate uid, not as us: it needs a
    # directory it can reach (every parent searchable by "others"; a user's home often
    # is not), so its inputs and outputs live in a temp dir that is. That dir is 0711
    # (others cannot list it, so cannot find the stage); the stage is sticky (nobody else
    # can replace what the hook wrote there).
    tmp_root = _reachable_tmpdir()
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=out_dir.parent))
    hook_dir: Path | None = None
    try:
        hook_dir = Path(tempfile.mkdtemp(prefix="banger-imagebuild-", dir=tmp_root))
        hook_dir.chmod(0o711)
        image = work / "image"
        image.mkdir()
        stage = Path(tempfile.mkdtemp(prefix="stage-", dir=hook_dir))
        stage.chmod(0o1777)
        guest = _stage_guest_files(hook_dir / "guest", variant)
        on_progress("building the guest agent (banger-agent)")
        agent = agentbin.ensure_agent(agent_cache or work / "agent-build")
        shutil.copyfile(agent, guest / agentbin.BINARY)
        (guest / agentbin.BINARY).chmod(0o755)
        try:
            sources = aptsources.debian_sources(mirror)
        except aptsources.AptSourcesError as exc:
            raise ImageError(str(exc)) from exc
        # Built first: a missing build dependency fails before the long bootstrap.
        kernel = kernelbuild.ensure_kernel(agent_cache or work / "kernel-build", on_progress)
        shutil.copyfile(kernel.vmlinux, image / MICROVM_KERNEL)
        started = time.monotonic()
        on_progress(f"bootstrapping Debian {SUITE} (mmdebstrap, {variant} variant)")
        _mmdebstrap(sources, guest, stage, tmp_root, on_progress, variant)
        kver = (stage / "kernel-version").read_text().strip()
        used_mib = int((stage / "rootfs-used-kib").read_text()) // 1024
        on_progress(f"rootfs.ext4 built ({used_mib} MiB of files) after "
                    f"{time.monotonic() - started:.0f} s")
        _copy(stage / "rootfs.ext4", image / ROOTFS)

        on_progress(f"extracting kernel {kver} (vmlinux)")
        bootfiles.extract_vmlinux(stage / "vmlinuz", image / KERNEL)

        on_progress("building initrd.img (busybox + virtio modules)")
        modules = work / "modules"
        _extract_regular_files(stage / "modules.tar", modules)
        bootfiles.build_initramfs(busybox=stage / "busybox",
                                  init_script=guest / "initrd-init",
                                  modules_dir=modules / "lib" / "modules" / kver,
                                  out=image / INITRD)

        on_progress("writing manifest.json")
        write_manifest(image, kernel_version=kver, name=VARIANT_IMAGES[variant],
                       variant=variant, microvm_kernel_version=kernel.release)
        _install(image, out_dir)
        on_progress(f"image ready in {out_dir} ({time.monotonic() - started:.0f} s)")
    finally:
        if hook_dir is not None:
            _rmtree(hook_dir)
        _rmtree(work)
    return load_image(out_dir)


def _reachable_tmpdir() -> Path:
    """A temp directory whose every parent others may search (see build_default_image)."""
    for candidate in (tempfile.gettempdir(), "/var/tmp", "/tmp"):
        path = Path(candidate).absolute()
        if path.is_dir() and all(p.stat().st_mode & stat.S_IXOTH
                                 for p in (path, *path.parents)):
            return path
    raise ImageError("no temp directory that mmdebstrap's user namespace can reach "
                     "(tried $TMPDIR, /var/tmp, /tmp)")


def _stage_guest_files(dest: Path, variant: str = MINIMAL) -> Path:
    """Copy the guest scripts out of the package, executable where they must be."""
    dest.mkdir()
    src = resources.files("banger.host") / "guest"
    for name in guest_files(variant):
        target = dest / name
        target.write_bytes((src / name).read_bytes())
        executable = name not in _DATA_FILES and "." not in name
        target.chmod(0o755 if executable else 0o644)
    # mmdebstrap's namespace root must be able to read these as "other".
    dest.chmod(0o755)
    return dest


def _mmdebstrap(sources: list[str], guest: Path, stage: Path, tmp_root: Path,
                on_progress: Callable[[str], None], variant: str = MINIMAL) -> None:
    hook = str(guest / "customize-hook")
    argv = [
        "mmdebstrap", "--variant=minbase", "--format=null",
        f"--include={','.join(packages(variant))}",
        *aptsources.apt_options(),
        *(f"--dpkgopt={o}" for o in DPKG_EXCLUDES),
        f"--setup-hook={hook}", f"--essential-hook={hook}", f"--customize-hook={hook}",
        SUITE, "/dev/null", *sources,
    ]
    env = {"BANGER_OUT": str(stage), "BANGER_GUEST": str(guest), "TMPDIR": str(tmp_root),
           "BANGER_VARIANT": variant}
    # mmdebstrap runs to completion through the runner in a worker thread; this thread
    # forwards the hook's progress lines so on_progress runs in the caller's thread.
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run(argv, env=env, timeout=1800)
        except BaseException as exc:  # re-raised below in the caller's thread
            errors.append(exc)

    worker = threading.Thread(target=target, name="mmdebstrap", daemon=True)
    worker.start()
    progress = stage / "progress"
    seen = 0
    while True:
        worker.join(0.5)
        lines = progress.read_text().splitlines() if progress.exists() else []
        for line in lines[seen:]:
            on_progress(line)
        seen = len(lines)
        if not worker.is_alive():
            break
    if errors:
        raise ImageError(f"mmdebstrap failed: {errors[0]}") from errors[0]


def _extract_regular_files(archive: Path, dest: Path) -> None:
    """Unpack only the regular files of a tar we made, refusing any path escape."""
    with tarfile.open(archive) as tar:
        for member in tar:
            rel = PurePosixPath(member.name)
            if not member.isfile() or rel.is_absolute() or ".." in rel.parts:
                continue
            target = dest.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is not None:
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out)


def _copy(src: Path, dst: Path) -> None:
    """Move a hook output into our own tree. A rename would keep the subordinate uid
    of unshare mode as owner (and cannot cross filesystems); a copy is ours. Sparse
    regions stay sparse."""
    if os.geteuid() == 0 or src.stat().st_uid == os.geteuid():
        try:
            os.replace(src, dst)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
    run(["cp", "--sparse=always", str(src), str(dst)])
    src.unlink()


def _install(image: Path, out_dir: Path) -> None:
    """Put the finished image at ``out_dir``, replacing an old one only at the end."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(image, out_dir)
    if old is not None:
        _rmtree(old)


def _rmtree(path: Path) -> None:
    """Remove a build tree; packages leave read-only directories a non-root user must
    open up first."""
    if not path.exists():
        return
    for parent, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(parent, d)
            if not os.path.islink(p):
                with contextlib.suppress(OSError):
                    os.chmod(p, stat.S_IRWXU)
    shutil.rmtree(path, ignore_errors=True)


# --- manifest and verification -------------------------------------------------------


def write_manifest(image: Path, *, kernel_version: str, name: str = IMAGE_NAME,
                   variant: str = MINIMAL, microvm_kernel_version: str = "") -> None:
    artifacts = {}
    for fname in ARTIFACTS:
        p = image / fname
        if fname == MICROVM_KERNEL and not p.exists():
            continue
        artifacts[fname] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest = {
        "name": name,
        "kernel_version": kernel_version,
        "microvm_kernel_version": microvm_kernel_version,
        "variant": _check_variant(variant),
        "init": GUEST_INIT,
        "cmdline": image_cmdline(variant),
        "recipe": recipe_digest(variant),
        "artifacts": artifacts,
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    tmp = image / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, image / MANIFEST)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# Verified artifacts, keyed by what would change if the file did: a file is hashed once
# per process unless it is rewritten.
_verified: dict[tuple[str, int, int], str] = {}
_verified_lock = threading.Lock()


def load_image(dir: Path, *, verify: bool = True) -> ImageArtifacts:
    """Read an image directory back; with ``verify``, check every artifact's digest."""
    dir = dir.absolute()
    try:
        manifest = json.loads((dir / MANIFEST).read_text())
        artifacts: dict[str, dict[str, object]] = manifest["artifacts"]
        kernel_version = str(manifest["kernel_version"])
        init = str(manifest["init"])
        cmdline = str(manifest.get("cmdline", ""))
        variant = str(manifest.get("variant", MINIMAL))
        microvm_version = str(manifest.get("microvm_kernel_version", ""))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{dir / MANIFEST}: unreadable manifest: {exc}") from exc
    for fname in (ROOTFS, KERNEL, INITRD):
        if fname not in artifacts:
            raise ImageError(f"{dir / MANIFEST}: no entry for {fname}")
    if verify:
        for fname, meta in artifacts.items():
            _verify(dir / fname, str(meta.get("sha256")), meta.get("size"))
    microvm = dir / MICROVM_KERNEL if MICROVM_KERNEL in artifacts else None
    return ImageArtifacts(dir=dir, rootfs=dir / ROOTFS, kernel=dir / KERNEL,
                          initrd=dir / INITRD, kernel_version=kernel_version, init=init,
                          cmdline=cmdline, variant=variant, microvm_kernel=microvm,
                          microvm_kernel_version=microvm_version)


def _verify(path: Path, want_sha: str, want_size: object) -> None:
    try:
        st = path.stat()
    except OSError as exc:
        raise ImageCorrupt(f"{path}: missing ({exc.strerror})") from exc
    if st.st_size != want_size:
        raise ImageCorrupt(f"{path}: size {st.st_size} bytes, manifest says {want_size}")
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _verified_lock:
        if _verified.get(key) == want_sha:
            return
    got = sha256_file(path)
    if got != want_sha:
        raise ImageCorrupt(f"{path}: sha256 {got}, manifest says {want_sha}")
    with _verified_lock:
        _verified[key] = got
