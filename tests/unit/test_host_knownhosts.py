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
ALIASES = ["vm-a.vm", "vm-b.vm", "box", "[box]:2222", "other", "box\x85"]

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
    # Separators ssh does not split lines or fields at (str.splitlines and str.split do).
    st.sampled_from(["other ssh-ed25519 K note\x85box junk\n", "box\x0bx ssh-ed25519 K\n",
                     "box\x85 ssh-ed25519 K\n", "\tbox ssh-ed25519 K\r\n",
                     "vm-a.vm\u2028 ssh-ed25519 K\n", "box\x1cvm-a.vm ssh-ed25519 K\n"]),
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
    ours.write_bytes(text.encode())
    ref.write_bytes(text.encode())
    knownhosts.remove(ours, alias)
    subprocess.run(["ssh-keygen", "-q", "-R", alias, "-f", str(ref)], capture_output=True)
    assert ours.read_bytes() == ref.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_pin_after_a_last_line_without_newline_is_a_line_of_its_own(tmp_path: Path) -> None:
    from banger.host import ssh
    kh = tmp_path / "known_hosts"
    kh.write_bytes(f"keep ssh-ed25519 {KEY}".encode())  # no newline at the end
    ssh.trust_host_key(kh, "box", f"ssh-ed25519 {KEY} c")
    assert kh.read_bytes().split(b"\n") == [f"keep ssh-ed25519 {KEY}".encode(),
                                             f"box ssh-ed25519 {KEY}".encode(), b""]


def test_missing_file_and_mode_kept(tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    knownhosts.remove(kh, "box")  # no file: fine
    kh.write_text(f"box ssh-ed25519 {KEY}\nkeep ssh-ed25519 {KEY}\n")
    kh.chmod(0o600)
    knownhosts.remove(kh, "box")
    assert kh.read_text() == f"keep ssh-ed25519 {KEY}\n"
    assert kh.stat().st_mode & 0o777 == 0o600
