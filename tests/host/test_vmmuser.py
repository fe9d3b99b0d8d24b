"""The unprivileged QEMU users, created on demand under a root daemon."""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from banger.host import vmmuser

pytestmark = [pytest.mark.host,
              pytest.mark.skipif(os.geteuid() != 0, reason="creating users needs root")]


@pytest.fixture
def base(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"bgt-{secrets.token_hex(3)}"
    monkeypatch.setenv(vmmuser.ENV_USER, name)
    # A PATH without sbin, as under sudo or cron: useradd is still found.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    yield name
    for user in (name, f"{name}-1"):
        subprocess.run(["/usr/sbin/userdel", user], capture_output=True, check=False)


def test_users_are_made_unprivileged_on_first_need(base: str) -> None:
    first, second = vmmuser.resolve(0), vmmuser.resolve(1)
    assert first is not None and second is not None
    assert (first.name, second.name) == (base, f"{base}-1")
    for runas in (first, second):
        pw = pwd.getpwnam(runas.name)
        assert (pw.pw_uid, pw.pw_gid) == (runas.uid, runas.gid)
        assert 0 < pw.pw_uid < 1000  # a system user
        assert pw.pw_shell == "/usr/sbin/nologin" and pw.pw_dir == "/nonexistent"
        assert grp.getgrgid(pw.pw_gid).gr_name == runas.name  # its own group
        assert 0 not in runas.groups
    assert first.uid != second.uid and first.gid != second.gid
    assert vmmuser.resolve(0) == first  # found again, not made twice


def test_root_is_refused_as_qemus_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(vmmuser.ENV_USER, "root")
    with pytest.raises(vmmuser.VmmUserError, match="is root"):
        vmmuser.resolve(0)
