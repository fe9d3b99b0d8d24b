"""ensure_agent: one gcc run per source version, keyed by a hash of the sources and flags;
a clear error when gcc is missing. gcc itself is replaced by a fake that writes the -o file
(tests/host/test_agent_binary.py builds the real one)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from banger.host import agentbin, runner


class FakeGcc:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], *, cwd: Path, **_: object) -> runner.Completed:
        self.calls.append(list(argv))
        assert argv[0] == "gcc" and "-static" in argv
        out = Path(cwd) / argv[list(argv).index("-o") + 1]
        out.write_bytes(b"\x7fELF fake")
        return runner.Completed(tuple(argv), 0, "", "")


@pytest.fixture
def gcc(monkeypatch: pytest.MonkeyPatch) -> FakeGcc:
    fake = FakeGcc()
    monkeypatch.setattr(agentbin.runner, "run", fake)
    monkeypatch.setattr(agentbin.shutil, "which", lambda name: f"/usr/bin/{name}")
    return fake


def copy_sources(dest: Path) -> Path:
    dest.mkdir()
    for name in agentbin.AGENT_SOURCES:
        (dest / name).write_bytes((agentbin.AGENT_DIR / name).read_bytes())
    return dest


def test_agent_sources_lists_every_c_and_h_file() -> None:
    shipped = sorted(p.name for p in agentbin.AGENT_DIR.iterdir()
                     if p.name.endswith((".c", ".h")))
    assert sorted(agentbin.AGENT_SOURCES) == shipped


def test_the_build_is_cached(gcc: FakeGcc, tmp_path: Path) -> None:
    first = agentbin.ensure_agent(tmp_path)
    assert len(gcc.calls) == 1 and first.read_bytes() == b"\x7fELF fake"
    assert first.parent.parent == tmp_path / "agent"
    assert agentbin.ensure_agent(tmp_path) == first
    assert len(gcc.calls) == 1, "a cached agent is not built again"
    assert [p.name for p in (tmp_path / "agent").iterdir()] == [first.parent.name], \
        "no temporary build directory is left behind"


def test_a_changed_source_or_flag_changes_the_hash(gcc: FakeGcc, tmp_path: Path) -> None:
    src = copy_sources(tmp_path / "src")
    same = agentbin.ensure_agent(tmp_path / "cache", src_dir=src)
    assert same == agentbin.ensure_agent(tmp_path / "cache")
    main = src / agentbin.AGENT_SOURCES[0]
    main.write_bytes(main.read_bytes() + b"\n/* changed */\n")
    changed = agentbin.ensure_agent(tmp_path / "cache", src_dir=src)
    assert changed != same and len(gcc.calls) == 2
    sources = agentbin.read_sources()
    assert agentbin.source_hash(sources) != agentbin.source_hash(sources, ("-O2",))


def test_a_missing_gcc_names_the_packages(gcc: FakeGcc, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agentbin.shutil, "which", lambda name: None)
    with pytest.raises(agentbin.AgentBuildError, match="apt install gcc libc6-dev"):
        agentbin.ensure_agent(tmp_path)
    assert gcc.calls == []


def test_a_failed_build_names_the_packages_and_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(argv: Sequence[str], **_: object) -> runner.Completed:
        raise runner.CommandError(argv, 1, "", "fatal error: stdio.h: No such file")

    monkeypatch.setattr(agentbin.runner, "run", broken)
    monkeypatch.setattr(agentbin.shutil, "which", lambda name: f"/usr/bin/{name}")
    with pytest.raises(agentbin.AgentBuildError, match=r"(?s)libc6-dev.*stdio\.h"):
        agentbin.ensure_agent(tmp_path)
    assert list((tmp_path / "agent").iterdir()) == []

