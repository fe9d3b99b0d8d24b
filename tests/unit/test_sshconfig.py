"""banger's ssh_config and its Include block in ~/.ssh/config: deterministic text, exact
install/uninstall, byte-for-byte preservation, and the real ssh parsing it (ssh -G)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from banger.cli import userssh
from banger.daemon.doctor import ssh_config_check
from banger.local import sshconfig
from banger.local.sshconfig import BEGIN, END, SshConfigError, SshEntry
from tests.hostile_ssh import HOSTILE_USER_CONFIG, assert_forwards_nothing

ENTRIES = [
    SshEntry("web", "10.77.0.3", 22, "banger-bbbbbbbbbbbb"),
    SshEntry("box", "127.0.0.1", 2201, "banger-aaaaaaaaaaaa"),
    SshEntry("dns-only", None, 22, "banger-cccccccccccc"),
]


def test_render_blocks(tmp_path: Path) -> None:
    text = sshconfig.render(ENTRIES, tmp_path / "id_ed25519", tmp_path / "known_hosts")
    hosts = [line for line in text.splitlines() if line.startswith("Host ")]
    assert hosts == ["Host box.vm", "Host dns-only.vm", "Host web.vm", "Host *.vm"]
    box = text.split("Host box.vm\n", 1)[1].split("\n\n", 1)[0]
    for line in ("HostName 127.0.0.1", "Port 2201", "HostKeyAlias banger-aaaaaaaaaaaa",
                 "User root", f"IdentityFile {tmp_path / 'id_ed25519'}", "IdentitiesOnly yes",
                 f"UserKnownHostsFile {tmp_path / 'known_hosts'}",
                 "StrictHostKeyChecking yes"):
        assert f"    {line}\n" in box + "\n", line
    dns_only = text.split("Host dns-only.vm\n", 1)[1].split("\n\n", 1)[0]
    assert "HostName" not in dns_only
    generic = text.split("Host *.vm\n", 1)[1]
    assert "HostKeyAlias" not in generic and "    User root\n" in generic


def test_render_deterministic(tmp_path: Path) -> None:
    a = sshconfig.render(ENTRIES, tmp_path / "k", tmp_path / "kh")
    b = sshconfig.render(list(reversed(ENTRIES)), tmp_path / "k", tmp_path / "kh")
    assert a == b
    assert sshconfig.render([], tmp_path / "k", tmp_path / "kh").count("Host ") == 1


def test_render_custom_zone(tmp_path: Path) -> None:
    text = sshconfig.render(ENTRIES[:1], tmp_path / "k", tmp_path / "kh", zone="Banger.Test.")
    assert "Host web.banger.test\n" in text and "Host *.banger.test\n" in text


@pytest.mark.parametrize("entries", [
    [SshEntry("box", "1.2.3.4", 22, "a"), SshEntry("BOX", "1.2.3.5", 22, "b")],
    [SshEntry("bad name", "1.2.3.4", 22, "a")],
    [SshEntry("box", "1.2.3.4", 0, "a")],
])
def test_render_rejects(entries: list[SshEntry], tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        sshconfig.render(entries, tmp_path / "k", tmp_path / "kh")


def test_render_quotes_awkward_paths(tmp_path: Path) -> None:
    weird = tmp_path / 'my "keys" dir\\x #1'
    text = sshconfig.render(ENTRIES[:1], weird / "id 100%", tmp_path / "kh")
    assert '    IdentityFile "' in text
    with pytest.raises(SshConfigError):
        sshconfig.render(ENTRIES[:1], tmp_path / "a\nHost *", tmp_path / "kh")


def test_write_atomic_0644(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ssh" / "config"
    sshconfig.write(path, "one\n")
    sshconfig.write(path, "two\n")
    assert path.read_text() == "two\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["config"]  # no temp files


# -- install / uninstall -----------------------------------------------------------------

INCLUDE = Path("/var/lib/banger state/ssh/config")


def test_install_creates_private_dir_and_file(tmp_path: Path) -> None:
    user = tmp_path / "home" / ".ssh" / "config"
    assert not sshconfig.is_installed(user)
    assert userssh.install(user, INCLUDE)
    assert stat.S_IMODE(user.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(user.stat().st_mode) == 0o600
    text = user.read_text()
    assert text.startswith(BEGIN + "\n") and text.endswith(END + "\n")
    assert f'Include "{INCLUDE}"\n' in text
    assert sshconfig.is_installed(user) and sshconfig.is_installed(user, INCLUDE)
    assert not sshconfig.is_installed(user, Path("/elsewhere"))


def test_install_keeps_existing_dir_mode(tmp_path: Path) -> None:
    d = tmp_path / ".ssh"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    userssh.install(d / "config", INCLUDE)
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_install_idempotent_and_first(tmp_path: Path) -> None:
    user = tmp_path / "config"
    original = b"Host github.com\n    User git\n"
    user.write_bytes(original)
    assert userssh.install(user, INCLUDE)
    once = user.read_bytes()
    assert once.startswith(BEGIN.encode()) and once.endswith(original)
    assert not userssh.install(user, INCLUDE)
    assert user.read_bytes() == once
    assert userssh.uninstall(user)
    assert user.read_bytes() == original
    assert not userssh.uninstall(user)
    assert user.read_bytes() == original
    assert not userssh.uninstall(tmp_path / "missing")


def test_install_moves_block_to_top_and_updates_path(tmp_path: Path) -> None:
    user = tmp_path / "config"
    user.write_bytes(b"Host a\n    User x\n")
    userssh.install(user, INCLUDE)
    block = user.read_bytes()[: -len(b"Host a\n    User x\n")]
    # Someone put content above the block: install moves the block back to the top.
    user.write_bytes(b"Host z\n" + block + b"Host a\n    User x\n")
    assert not sshconfig.is_installed(user)
    assert userssh.install(user, INCLUDE)
    assert user.read_bytes() == block + b"Host z\nHost a\n    User x\n"
    # Another include path replaces the block in place.
    assert userssh.install(user, Path("/new/place/config"))
    data = user.read_bytes()
    assert data.count(BEGIN.encode()) == 1 and b'Include "/new/place/config"' in data
    assert data.endswith(b"Host z\nHost a\n    User x\n")


def test_mode_and_symlink_preserved(tmp_path: Path) -> None:
    real = tmp_path / "dotfiles" / "ssh_config"
    real.parent.mkdir()
    real.write_text("Host a\n")
    real.chmod(0o640)
    link = tmp_path / "config"
    link.symlink_to(real)
    assert userssh.install(link, INCLUDE)
    assert link.is_symlink()
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert real.read_text().endswith("Host a\n") and sshconfig.is_installed(link)
    assert userssh.uninstall(link)
    assert link.is_symlink() and real.read_text() == "Host a\n"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640


@pytest.mark.parametrize(("content", "line"), [
    (f"Host a\n{BEGIN}\nInclude x\n", 2),
    (f"Host a\n\n{END}\n", 3),
    (f"{END}\n{BEGIN}\n", 1),
    (f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n", 3),
])
def test_half_marker_refused(tmp_path: Path, content: str, line: int) -> None:
    user = tmp_path / "config"
    user.write_text(content)
    for call in (lambda: userssh.install(user, INCLUDE), lambda: userssh.uninstall(user),
                 lambda: sshconfig.is_installed(user)):
        with pytest.raises(SshConfigError, match=f"{user}:{line}:"):
            call()
    assert user.read_text() == content


def test_include_path_must_be_usable(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        userssh.install(tmp_path / "config", Path("relative/config"))
    with pytest.raises(SshConfigError):
        userssh.install(tmp_path / "config", Path("/tmp/glob*/config"))
    assert not (tmp_path / "config").exists()


no_markers = st.binary(max_size=2000).filter(
    lambda b: BEGIN.encode() not in b and END.encode() not in b)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=no_markers)
@example(content=b"")
@example(content=b"no newline at end")
@example(content=b"\r\nHost x\r\n\tUser y\r\n")
@example(content=b"\xff\xfe binary \x00 junk\n")
def test_install_uninstall_preserve_bytes(tmp_path: Path, content: bytes) -> None:
    user = tmp_path / "config"
    user.write_bytes(content)
    user.chmod(0o600)
    assert userssh.install(user, INCLUDE)
    installed = user.read_bytes()
    assert installed.endswith(content)
    assert sshconfig.is_installed(user, INCLUDE)
    assert not userssh.install(user, INCLUDE)
    assert user.read_bytes() == installed
    assert userssh.uninstall(user)
    assert user.read_bytes() == content
    assert stat.S_IMODE(user.stat().st_mode) == 0o600
    user.unlink()


# -- the real ssh parses it ----------------------------------------------------------------

def _ssh_g(config: Path, host: str) -> dict[str, list[str]]:
    # -G prints the configuration ssh would use for `host`, without connecting.
    out = subprocess.run(["ssh", "-G", "-F", str(config), host], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    opts: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        opts.setdefault(key, []).append(value)
    return opts


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client (openssh-client)")
def test_ssh_reads_it_through_the_include(tmp_path: Path) -> None:
    state = tmp_path / "banger state"  # a space on purpose: the quoting must hold
    key, known_hosts, banger_cfg = state / "id_ed25519", state / "known_hosts", state / "cfg"
    sshconfig.write(banger_cfg, sshconfig.render(ENTRIES, key, known_hosts))
    user = tmp_path / "home" / ".ssh" / "config"
    user.parent.mkdir(parents=True)
    # A user's catch-all that would win if banger's block were not first.
    user.write_text("Host *\n    User alice\n    Port 2222\n")
    userssh.install(user, banger_cfg)

    box = _ssh_g(user, "box.vm")
    assert box["hostname"] == ["127.0.0.1"] and box["port"] == ["2201"]
    assert box["user"] == ["root"]
    assert box["identityfile"][0] == str(key)
    assert box["hostkeyalias"] == ["banger-aaaaaaaaaaaa"]
    assert box["userknownhostsfile"] == [str(known_hosts)]
    assert box["stricthostkeychecking"] == ["true"]
    assert box["identitiesonly"] == ["yes"]

    web = _ssh_g(user, "web.vm")
    assert web["hostname"] == ["10.77.0.3"] and web["port"] == ["22"]
    other = _ssh_g(user, "new.vm")  # only the generic block: DNS gives the address
    assert other["hostname"] == ["new.vm"] and other["user"] == ["root"]
    assert other["identityfile"][0] == str(key)
    elsewhere = _ssh_g(user, "example.com")
    assert elsewhere["user"] == ["alice"] and elsewhere["port"] == ["2222"]

    userssh.uninstall(user)
    assert _ssh_g(user, "box.vm")["user"] == ["alice"]
    assert os.stat(user).st_size == len("Host *\n    User alice\n    Port 2222\n")


# -- doctor's row -------------------------------------------------------------------------

def test_doctor_ssh_config_row(tmp_path: Path) -> None:
    include = tmp_path / "state" / "ssh" / "config"
    user = tmp_path / ".ssh" / "config"
    check = ssh_config_check(user, include)
    assert check.status == "warn" and "banger ssh-config --install" in check.detail
    userssh.install(user, include)
    assert ssh_config_check(user, include).status == "pass"
    other = ssh_config_check(user, tmp_path / "elsewhere")
    assert other.status == "warn" and "banger ssh-config --install" in other.detail
    user.write_text("# >>> banger >>>\n")
    assert ssh_config_check(user, include).status == "warn"


@pytest.mark.skipif(shutil.which("ssh") is None, reason="no ssh client (openssh-client)")
def test_include_forwards_nothing_whatever_the_user_config(tmp_path: Path) -> None:
    state = tmp_path / "state"
    banger_cfg = state / "ssh" / "config"
    sshconfig.write(banger_cfg, sshconfig.render(ENTRIES, state / "k", state / "kh"))
    # A fake home: ~/.ssh/config as `banger ssh-config --install` finds it there.
    user = tmp_path / "home" / ".ssh" / "config"
    user.parent.mkdir(parents=True)
    user.write_text(HOSTILE_USER_CONFIG)
    userssh.install(user, banger_cfg)
    assert user.read_text().startswith(BEGIN)  # first, so its values win
    for host in ("box.vm", "web.vm", "not-yet-listed.vm"):
        out = subprocess.run(["ssh", "-G", "-F", str(user), host], capture_output=True,
                             text=True, timeout=10, check=True).stdout
        assert_forwards_nothing(out)
    # Everything else still gets what the user asked for.
    assert "forwardagent yes" in subprocess.run(
        ["ssh", "-G", "-F", str(user), "example.com"], capture_output=True, text=True,
        timeout=10, check=True).stdout


# -- root editing a home it does not own ---------------------------------------------------

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
USER, OTHER = 65534, 65533  # the home's owner, and a third user


def _home(tmp_path: Path, owner: int = USER) -> Path:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    for d in (home, home / ".ssh"):
        os.chown(d, owner, owner)
    return home


def _both(user: Path) -> list[Callable[[], bool]]:
    return [lambda: userssh.install(user, INCLUDE), lambda: userssh.uninstall(user)]


def _owned(path: Path, uid: int, text: str | None = None) -> Path:
    """``path`` made (a directory, or a file holding ``text``) and owned by ``uid``."""
    if text is None:
        path.mkdir()
    else:
        path.write_text(text)
    os.chown(path, uid, uid)
    return path


@AS_ROOT
def test_root_does_not_write_through_a_users_symlink(tmp_path: Path) -> None:
    home = _home(tmp_path)
    victim = tmp_path / "victim"  # root's, in root's directory
    victim.write_text(f"{BEGIN}\n{END}\nroot's file\n")
    user = home / ".ssh" / "config"
    user.symlink_to(victim)
    os.lchown(user, USER, USER)
    for call in _both(user):
        with pytest.raises(SshConfigError, match=r"belongs to .*uid 0.*not to .*uid 65534"):
            call()
    assert victim.read_text() == f"{BEGIN}\n{END}\nroot's file\n"
    assert victim.stat().st_uid == 0 and user.is_symlink()


@AS_ROOT
def test_root_refuses_a_third_users_file_or_directory(tmp_path: Path) -> None:
    home = _home(tmp_path)
    theirs = _owned(tmp_path / "theirs", OTHER)
    _owned(theirs / "cfg", OTHER, "Host x\n")
    user = home / ".ssh" / "config"
    user.symlink_to(theirs / "cfg")
    with pytest.raises(SshConfigError, match=f"{theirs} belongs to uid {OTHER}"):
        userssh.install(user, INCLUDE)
    assert (theirs / "cfg").read_text() == "Host x\n"
    # ~/.ssh itself handed to another user: not written into either.
    user.unlink()
    os.chown(home / ".ssh", OTHER, OTHER)
    with pytest.raises(SshConfigError, match=f"{home / '.ssh'} belongs to uid {OTHER}"):
        userssh.install(user, INCLUDE)
    assert not os.path.lexists(user)
    # The file in the owner's ~/.ssh, but another user's.
    os.chown(home / ".ssh", USER, USER)
    _owned(user, OTHER, "Host y\n")
    for call in _both(user):
        with pytest.raises(SshConfigError, match=f"it belongs to uid {OTHER}"):
            call()
    assert user.read_text() == "Host y\n"


@AS_ROOT
def test_root_sets_up_a_users_ssh_config_as_theirs(tmp_path: Path) -> None:
    home = _owned(tmp_path / "home", USER)
    user = home / ".ssh" / "config"
    assert userssh.install(user, INCLUDE)  # ~/.ssh made, the user's
    for p, mode in ((home / ".ssh", 0o700), (user, 0o600)):
        st = p.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (USER, USER, mode)
    assert userssh.uninstall(user) and user.read_bytes() == b""
    assert user.stat().st_uid == USER
    assert [p.name for p in (home / ".ssh").iterdir()] == ["config"]  # no temp file left


@AS_ROOT
def test_root_keeps_a_users_dotfile_symlink_working(tmp_path: Path) -> None:
    home = _home(tmp_path)
    real = _owned(_owned(home / "dotfiles", USER) / "ssh_config", USER, "Host a\n")
    real.chmod(0o640)
    user = home / ".ssh" / "config"
    user.symlink_to(real)
    os.lchown(user, USER, USER)
    assert userssh.install(user, INCLUDE)
    assert user.is_symlink() and sshconfig.is_installed(user, INCLUDE)
    st = real.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (USER, 0o640)
    assert userssh.uninstall(user) and real.read_text() == "Host a\n"


def test_a_user_cannot_edit_a_home_not_theirs(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    owner = home.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 4242)  # a caller that is not root
    with pytest.raises(SshConfigError, match="not to you"):
        userssh.install(home / ".ssh" / "config", INCLUDE)
    assert not (home / ".ssh" / "config").exists()
