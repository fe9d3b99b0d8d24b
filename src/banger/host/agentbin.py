"""Builds the guest agent (``banger-agent``) from the C source shipped in this package.

The binary is static (it runs in images with no libc of their own) and built with the host's
gcc once per source version: ``<cache_dir>/agent/<sha256>/banger-agent``, where the hash
covers the sources and the compiler flags, so an edited source or flag gets a fresh build
and an unchanged one never runs gcc again. The build happens in a temporary directory that
is renamed into place whole: a killed build leaves no half-written binary behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from banger.host import runner

AGENT_DIR: Traversable = resources.files("banger.host") / "guest" / "agent"
# Every *.c and *.h in AGENT_DIR (a unit test checks the list is complete).
AGENT_SOURCES: tuple[str, ...] = ("banger-agent.c", "agent.h", "exec.c", "exec.h", "files.c",
                                 "files.h", "get.c", "listening.c", "put.c", "tar.c", "tar.h",
                                 "wire.c")
CFLAGS: tuple[str, ...] = ("-std=c11", "-static", "-Os", "-Wall", "-Wextra", "-Werror",
                           "-pedantic", "-s")
BINARY = "banger-agent"
_INSTALL_HINT = "apt install gcc libc6-dev"
_BUILD_TIMEOUT = 300.0


class AgentBuildError(RuntimeError):
    """The agent could not be built; the message names what is missing."""


def read_sources(src_dir: Traversable = AGENT_DIR) -> dict[str, bytes]:
    return {name: (src_dir / name).read_bytes() for name in AGENT_SOURCES}


def source_hash(sources: dict[str, bytes], cflags: tuple[str, ...] = CFLAGS) -> str:
    """sha256 over the flags and each source's name and bytes (length-prefixed, so no two
    different inputs hash alike)."""
    h = hashlib.sha256()
    for part in (*cflags, *(x for name in sorted(sources) for x in (name, sources[name]))):
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big") + data)
    return h.hexdigest()


def ensure_agent(cache_dir: Path, src_dir: Traversable = AGENT_DIR) -> Path:
    """The path of the built agent, compiling it first if this version is not cached."""
    sources = read_sources(src_dir)
    final = cache_dir / "agent" / source_hash(sources)
    binary = final / BINARY
    if binary.is_file():
        return binary
    if shutil.which("gcc") is None:
        raise AgentBuildError(f"building {BINARY} needs gcc, which is not installed: "
                              f"{_INSTALL_HINT}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        for name, data in sources.items():
            (tmp / name).write_bytes(data)
        c_files = [name for name in sorted(sources) if name.endswith(".c")]
        try:
            runner.run(["gcc", *CFLAGS, "-o", BINARY, *c_files], cwd=tmp,
                       timeout=_BUILD_TIMEOUT)
        except runner.CommandError as exc:
            raise AgentBuildError(f"building {BINARY} failed (it needs gcc and a static "
                                  f"libc: {_INSTALL_HINT}): {exc}") from exc
        try:
            os.rename(tmp, final)
        except OSError:
            # Another build of the same sources won the race: theirs is identical.
            if not binary.is_file():
                raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return binary
