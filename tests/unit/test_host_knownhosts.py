"""banger's own known_hosts removal agrees with `ssh-keygen -R` (the tool it replaces on
the create and delete paths), for plain, listed, hashed and marker entries."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from banger.host import knownhosts

KEY = "AAAAC3NzaC1lZDI1NTE5AAAAIHh0ZXN0a2V5Zm9ydGhlYmFuZ2VydGVzdHN1aXRlMTIz"
ALIASES = ["vm-a.vm", "vm-b.vm", "box", "[box]:2222", "other"]

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                reason="ssh-keygen is the reference")


def _hashed(tmp: Path, host: str) -> str:
    f = tmp / "h"
    f.write_text(f"{host} ssh-ed25519 {KEY}\n")
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(f)], check=True,
                   capture_output=True)
    (tmp / "h.old").unlink()
    return f.read_text()


line = st.one_of(
    st.lists(st.sampled_from(ALIASES), min_size=1, max_size=3, unique=True).map(
        lambda hs: f"{','.join(hs)} ssh-ed25519 {KEY}\n"),
    st.sampled_from(ALIASES).map(lambda h: f"@revoked {h} ssh-ed25519 {KEY}\n"),
    st.just("# a comment vm-a.vm\n"),
    st.just("\n"),
    st.sampled_from(ALIASES).map(lambda h: ("HASHED", h)),
)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(line, max_size=8), alias=st.sampled_from(ALIASES))
def test_agrees_with_ssh_keygen(tmp_path: Path, lines: list[object], alias: str) -> None:
    text = "".join(_hashed(tmp_path, x[1]) if isinstance(x, tuple) else str(x)
                   for x in lines)
    ours, ref = tmp_path / "ours", tmp_path / "ref"
    ours.write_text(text)
    ref.write_text(text)
    knownhosts.remove(ours, alias)
    subprocess.run(["ssh-keygen", "-q", "-R", alias, "-f", str(ref)], capture_output=True)
    assert ours.read_text() == ref.read_text()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_missing_file_and_mode_kept(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    knownhosts.remove(kh, "box")  # no file: fine
    kh.write_text(f"box ssh-ed25519 {KEY}\nkeep ssh-ed25519 {KEY}\n")
    kh.chmod(0o600)
    knownhosts.remove(kh, "box")
    assert kh.read_text() == f"keep ssh-ed25519 {KEY}\n"
    assert kh.stat().st_mode & 0o777 == 0o600
