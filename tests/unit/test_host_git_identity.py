"""The host's git identity, read with one real `git config` (SshGuest.git_identity)."""

from __future__ import annotations

from pathlib import Path

import pytest

from banger.host.guest_ssh import SshGuest
from banger.model.layout import Layout


def _guest(tmp_path: Path) -> SshGuest:
    return SshGuest(Layout.for_user({"BANGER_HOME": str(tmp_path / "home")}))


def test_name_and_email_last_value_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "gitconfig"
    cfg.write_text('[user]\n\tname = First\n\temail = "a b@x" \n[user]\n\tname = "Ada \\"L\\""\n'
                   "[core]\n\teditor = vi\n[user \"x\"]\n\tname = not-this\n")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    assert _guest(tmp_path).git_identity() == {"user.name": 'Ada "L"', "user.email": "a b@x"}


def test_none_set_or_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "gitconfig"
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    assert _guest(tmp_path).git_identity() == {}
    cfg.write_text("[user]\n\tname =   \n")
    assert _guest(tmp_path).git_identity() == {}
