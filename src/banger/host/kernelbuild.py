"""Builds banger's microVM guest kernel from Debian's ``linux-source-6.1`` package.

The recipe: unpack ``/usr/src/linux-source-6.1.tar.xz``, ``make tinyconfig``, append the
fragment kept in this package (``guest/kernel/microvm.config``), ``make olddefconfig``,
check that every option the fragment asks for survived (a dropped dependency would
otherwise give a kernel that cannot find its disk), then ``make -j$(nproc) vmlinux``. The
result is an uncompressed ELF ``vmlinux`` with a PVH entry point: QEMU's microvm loads it
with ``-kernel`` and so would Firecracker. Everything the guest needs is built in (no
modules, no initramfs).

Built once per machine (~9 min on 2 cores) and cached like the agent
(:mod:`banger.host.agentbin`): ``<cache_dir>/kernel/<key>/`` where the key is the sha256
of the fragment, the source package's version and :data:`RECIPE`; the build runs in a
temporary directory renamed into place whole, so a killed build leaves nothing behind
that looks finished. That directory (a ~1 GiB kernel tree) is locked while its build
works in it, by make too (which outlives a killed daemon); the next build removes the
ones nobody holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from banger.host import runner

CONFIG_FRAGMENT: Traversable = (resources.files("banger.host") / "guest" / "kernel"
                                / "microvm.config")
SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
# Bump when the steps below change: it is part of the cache key.
RECIPE = ("tinyconfig", "append-fragment", "olddefconfig", "check-fragment",
          "make vmlinux", "v1")
VMLINUX = "vmlinux"
CONFIG = "config"        # the full .config the kernel was built with
RELEASE = "release"      # `make kernelrelease`, e.g. 6.1.192
# The objects a build compiles (counted on this recipe): progress says "n of ~N".
EXPECTED_OBJECTS = 1370
# Reproducible banner: the same inputs give the same /proc/version on every machine.
_BUILD_ENV = {"KBUILD_BUILD_USER": "banger", "KBUILD_BUILD_HOST": "banger",
              "KBUILD_BUILD_TIMESTAMP": "1970-01-01", "LC_ALL": "C"}
_INSTALL = ("apt install linux-source-6.1 make gcc bc flex bison libelf-dev xz-utils "
            "(or run scripts/setup)")
# Tools the recipe runs -> the Debian package that provides them.
_TOOLS: dict[str, str] = {"make": "make", "gcc": "gcc", "bc": "bc", "flex": "flex",
                          "bison": "bison", "tar": "tar", "xz": "xz-utils",
                          "perl": "perl-base"}
# Headers the host tools need (objtool reads ELF) -> their package.
_HEADERS: dict[str, str] = {"/usr/include/gelf.h": "libelf-dev"}
_STEP_TIMEOUT = 600.0
_BUILD_TIMEOUT = 3 * 3600.0
_PROGRESS_EVERY = 10.0  # seconds between "n objects compiled" lines
_OBJECT_LINE = re.compile(rb"^\s+(CC|AS)\s")
_BUILD_PREFIX = ".build-"
# A build directory younger than this may not be locked by its builder yet.
_STALE_AFTER = 60.0


class KernelBuildError(RuntimeError):
    """The kernel could not be built; the message names what is missing and the fix."""


@dataclass(frozen=True)
class Kernel:
    vmlinux: Path
    release: str  # e.g. "6.1.192"
    key: str      # the cache key it was built under


def parse_fragment(text: str) -> dict[str, str | None]:
    """``CONFIG_X=value`` lines as {name: value}; ``# CONFIG_X is not set`` as None."""
    wanted: dict[str, str | None] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line):
            wanted[m[1]] = m[2]
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line):
            wanted[m[1]] = None
    return wanted


def fragment_mismatches(fragment: str, config: str) -> list[str]:
    """The fragment's options that the resolved ``.config`` does not carry as asked."""
    have = {k: v for k, v in parse_fragment(config).items() if v is not None}
    return [f"{k}={'(off)' if v is None else v} (got {have.get(k, '(off)')})"
            for k, v in parse_fragment(fragment).items() if have.get(k) != v]


def source_version() -> str:
    """The installed ``linux-source-6.1`` package version (part of the cache key)."""
    try:
        st = SOURCE_TARBALL.stat()
    except OSError:
        st = None
    # Asked once per tarball identity: image lookups compute the key on every read.
    ident = None if st is None else (str(SOURCE_TARBALL), st.st_size, st.st_mtime_ns)
    if ident is not None and _version_cache.get(ident) is not None:
        return _version_cache[ident]
    version = _dpkg_version()
    if ident is not None:
        _version_cache[ident] = version
    return version


_version_cache: dict[tuple[str, int, int], str] = {}


def _dpkg_version() -> str:
    try:
        res = runner.run(["dpkg-query", "-W", "-f=${Version}", SOURCE_PACKAGE],
                         check=False, timeout=30)
    except runner.CommandError as exc:
        raise KernelBuildError(f"cannot ask dpkg for {SOURCE_PACKAGE}: {exc}") from exc
    if res.returncode != 0 or not res.stdout.strip() or not SOURCE_TARBALL.is_file():
        raise KernelBuildError(f"building the microVM kernel needs Debian's "
                               f"{SOURCE_PACKAGE} package ({SOURCE_TARBALL} is missing): "
                               f"{_INSTALL}")
    return res.stdout.strip()


def cache_key(fragment: bytes, version: str, recipe: tuple[str, ...] = RECIPE) -> str:
    """sha256 over the recipe, the source version and the fragment (length-prefixed)."""
    h = hashlib.sha256()
    parts: list[bytes] = [p.encode() for p in (*recipe, version)] + [fragment]
    for data in parts:
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def current_key() -> str:
    """The key the kernel this banger would build is cached under."""
    return cache_key(CONFIG_FRAGMENT.read_bytes(), source_version())


def missing_build_deps() -> list[str]:
    """Debian packages the build needs that are not installed (by tool or header)."""
    missing = [pkg for tool, pkg in _TOOLS.items() if shutil.which(tool) is None]
    missing += [pkg for header, pkg in _HEADERS.items() if not Path(header).is_file()]
    return sorted(set(missing))


def cached(cache_dir: Path, key: str) -> Kernel | None:
    d = cache_dir / "kernel" / key
    if (d / VMLINUX).is_file() and (d / RELEASE).is_file():
        return Kernel(vmlinux=d / VMLINUX, release=(d / RELEASE).read_text().strip(), key=key)
    return None


def ensure_kernel(cache_dir: Path, on_progress: Callable[[str], None]) -> Kernel:
    """The cached microVM kernel, built first if this fragment/source/recipe is new."""
    fragment = CONFIG_FRAGMENT.read_bytes()
    key = cache_key(fragment, source_version())
    found = cached(cache_dir, key)
    if found is not None:
        return found
    missing = missing_build_deps()
    if missing:
        raise KernelBuildError(f"building the microVM kernel needs {', '.join(missing)}, "
                               f"not installed: apt install {' '.join(missing)}")
    final = cache_dir / "kernel" / key
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_BUILD_PREFIX, dir=final.parent))
    held = _hold(tmp)
    try:
        out = tmp / "out"
        out.mkdir()
        _build(tmp, out, fragment.decode(), on_progress)
        try:
            os.rename(out, final)
        except OSError:
            # Another build of the same inputs won the race: theirs is identical.
            if cached(cache_dir, key) is None:
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
        os.close(held)
    kernel = cached(cache_dir, key)
    assert kernel is not None
    return kernel


def _hold(build_dir: Path) -> int:
    """A shared lock on ``build_dir`` for as long as the returned fd (or a copy a child
    inherited) is open: the directory is in use."""
    fd = os.open(build_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _remove_stale_builds(parent: Path) -> None:
    """Build directories nobody holds (a daemon killed part way, and its make done):
    each is a kernel tree of ~1 GiB that nothing else would ever remove."""
    for d in parent.glob(_BUILD_PREFIX + "*"):
        try:
            if time.time() - d.lstat().st_mtime < _STALE_AFTER:
                continue
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a build works in it (or the make of a killed one still does)
        finally:
            os.close(fd)
        shutil.rmtree(d, ignore_errors=True)


def _build(tmp: Path, out: Path, fragment: str, on_progress: Callable[[str], None]) -> None:
    started = time.monotonic()
    on_progress(f"microVM kernel: unpacking {SOURCE_TARBALL.name} (built once per machine, "
                f"about 9 min on 2 cores)")
    _step(["tar", "-xJf", str(SOURCE_TARBALL), "-C", str(tmp)], tmp)
    src = tmp / SOURCE_TARBALL.name.removesuffix(".tar.xz")
    if not (src / "Makefile").is_file():
        raise KernelBuildError(f"{SOURCE_TARBALL} did not unpack to {src.name}/: "
                               f"reinstall it (apt install --reinstall {SOURCE_PACKAGE})")
    on_progress("microVM kernel: configuring (tinyconfig + microvm.config)")
    _step(["make", "-s", "tinyconfig"], src)
    with (src / ".config").open("a") as f:
        f.write("\n" + fragment)
    _step(["make", "-s", "olddefconfig"], src)
    config = (src / ".config").read_text()
    bad = fragment_mismatches(fragment, config)
    if bad:
        raise KernelBuildError("the microVM kernel config lost options the fragment asks "
                               f"for (a dependency is missing from microvm.config): "
                               f"{', '.join(bad)}")
    jobs = os.cpu_count() or 1
    on_progress(f"microVM kernel: compiling (make -j{jobs} vmlinux)")
    _make_vmlinux(src, jobs, on_progress)
    release = _step(["make", "-s", "kernelrelease"], src).strip()
    shutil.copyfile(src / VMLINUX, out / VMLINUX)
    (out / VMLINUX).chmod(0o644)  # QEMU's user re-opens it through /proc/self/fd
    (out / CONFIG).write_text(config)
    (out / RELEASE).write_text(release + "\n")
    on_progress(f"microVM kernel {release} built in {time.monotonic() - started:.0f} s")


def _step(argv: list[str], cwd: Path) -> str:
    try:
        return runner.run(argv, cwd=cwd, env=_BUILD_ENV, timeout=_STEP_TIMEOUT).stdout
    except runner.CommandError as exc:
        raise KernelBuildError(f"microVM kernel: {' '.join(argv)} failed (build deps: "
                               f"{_INSTALL}): {exc}") from exc


def _make_vmlinux(src: Path, jobs: int, on_progress: Callable[[str], None]) -> None:
    """``make vmlinux``, reporting how many objects are compiled every few seconds."""
    env = {**os.environ, **_BUILD_ENV}
    log = src / "build.log"
    # make holds the build directory too: if the daemon is killed, make (a session of its
    # own) runs on, and its tree must not be removed under it.
    held = _hold(src.parent)
    with log.open("wb") as log_file, contextlib.closing(_Fd(held)):
        proc = subprocess.Popen(["make", f"-j{jobs}", VMLINUX], cwd=src, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                pass_fds=(held,))
        assert proc.stdout is not None
        deadline = time.monotonic() + _BUILD_TIMEOUT
        objects, last = 0, time.monotonic()
        try:
            for line in proc.stdout:
                log_file.write(line)
                if _OBJECT_LINE.match(line):
                    objects += 1
                now = time.monotonic()
                if now - last >= _PROGRESS_EVERY:
                    on_progress(f"microVM kernel: {objects} of ~{EXPECTED_OBJECTS} "
                                f"objects compiled")
                    last = now
                if now > deadline:
                    raise KernelBuildError(f"microVM kernel: make vmlinux took over "
                                           f"{_BUILD_TIMEOUT / 3600:.0f} h; gave up")
            rc = proc.wait()
        finally:
            if proc.poll() is None:
                # A cancelled build (the client went away): make and every compiler it
                # started, so nothing writes into the tree about to be removed.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if rc != 0:
        tail = log.read_bytes()[-2000:].decode(errors="replace")
        raise KernelBuildError(f"microVM kernel: make vmlinux failed (exit {rc}; build "
                               f"deps: {_INSTALL}):\n{tail}")


class _Fd:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)
