"""The guest's files behind ``FakeAgent.put_files`` / ``get_files`` (tests/fakes.py), for
the unit and integration tiers: each VM's guest filesystem is a host directory (guest
``/x`` is ``<root>/x``), a put extracts the tar there and a get tars a path from it, as
the real agent does (names from the path's last component; a symlink at the top is
followed). Knobs: ``fail_get_after`` (a get breaks after that many chunks), ``no_files``
(an agent without the "files" feature), ``puts`` (the bytes each put took)."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from collections.abc import Generator, Iterable, Iterator
from pathlib import Path

from banger.model.errors import ConflictError, InvalidRequest, OperationFailed

CHUNK = 1 << 16


class FakeGuestFiles:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="fake-guestfs-"))
        self.fail_get_after: int | None = None
        self.no_files = False
        self.puts: list[int] = []
        self.gets_closed = 0  # gets that ended, whichever way

    def root(self, channel: Path) -> Path:
        r = self.base / channel.parent.name
        r.mkdir(exist_ok=True)
        return r

    def _check(self) -> None:
        if self.no_files:
            raise ConflictError("the VM's guest agent is older than this banger and cannot "
                                "copy files: restart the VM")

    def put(self, channel: Path, dest: str, source: Iterable[bytes]) -> int:
        self._check()
        data = bytearray()
        for chunk in source:
            data += chunk
        target = self.root(channel) / dest.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:") as tar:
                tar.extractall(target, filter="tar")
        except (tarfile.TarError, OSError) as exc:
            raise InvalidRequest(f"the guest agent refused FILE_PUT to {dest}: {exc}") from exc
        self.puts.append(len(data))
        return len(data)

    def get(self, channel: Path, path: str) -> Generator[bytes, None, None]:
        self._check()
        src = self.root(channel) / path.lstrip("/")
        if not os.path.lexists(src):
            raise InvalidRequest(f"the guest agent refused FILE_GET of {path}: open "
                                 f"{path}: No such file or directory")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:", format=tarfile.PAX_FORMAT) as tar:
            tar.add(src.resolve(), arcname=src.name or "root")
        data = buf.getvalue()
        gen = self._chunks(data)
        first = next(gen)
        return self._rest(first, gen)

    def _chunks(self, data: bytes) -> Iterator[bytes]:
        for n, pos in enumerate(range(0, len(data), CHUNK)):
            if self.fail_get_after is not None and n >= self.fail_get_after:
                raise OperationFailed("copying out through the guest agent failed: the "
                                      "connection to the agent ended")
            yield data[pos:pos + CHUNK]

    def _rest(self, first: bytes, gen: Iterator[bytes]) -> Generator[bytes, None, None]:
        try:
            yield first
            yield from gen
        finally:
            self.gets_closed += 1
