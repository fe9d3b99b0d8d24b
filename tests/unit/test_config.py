from __future__ import annotations

import re
from pathlib import Path

import pytest

from banger.model.config import Config, ConfigError, FileSync, load_config


def test_absent_config_is_empty(tmp_path: Path) -> None:
    assert load_config(tmp_path / "nope.toml", tmp_path) == Config()


def test_file_sync_entries(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[[file_sync]]\nhost = "~/.npmrc"\nguest = "~/.npmrc"\nmode = "0600"\n'
                   '[[file_sync]]\nhost = "/etc/hosts"\nguest = "/root/etc/hosts"\n')
    assert load_config(cfg, Path("/home/u")).file_sync == (
        FileSync(Path("/home/u/.npmrc"), "/root/.npmrc", 0o600),
        FileSync(Path("/etc/hosts"), "/root/etc/hosts", None))


@pytest.mark.parametrize(("body", "needle"), [
    ('[[file_sync]]\nhost = "a"\nguest = "/etc/passwd"\n', "under ~/ or /root/"),
    ('[[file_sync]]\nhost = "a"\nguest = "/root/../etc/x"\n', "under ~/ or /root/"),
    ('[[file_sync]]\nhost = "a"\nguest = "/root"\n', "under ~/ or /root/"),
    ('[[file_sync]]\nhost = "a"\nguest = "~/x"\nmode = "999"\n', "octal"),
    ('[[file_sync]]\nhost = "a"\nguest = "~/x"\nmode = 384\n', "octal"),
    ('[[file_sync]]\nhost = "a"\n', "host and guest"),
    ('[[file_sync]]\nhost = "a"\nguest = "~/x"\nextra = 1\n', "unknown keys"),
    ('file_sync = 3\n', "array of tables"),
    ('[[file_sync]\n', "config.toml"),
])
def test_invalid_config_names_the_problem(tmp_path: Path, body: str, needle: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        load_config(cfg, tmp_path)


def test_bootstrap_and_network_tables(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[bootstrap]\ninstaller_url = "http://10.0.2.2:8000/install.sh"\n'
                   '[network]\nmode = "tap"\nbridge = "bgtest0"\nsubnet = "10.77.0.0/24"\n'
                   'dns_port = 0\n')
    c = load_config(cfg, tmp_path)
    assert c.installer_url == "http://10.0.2.2:8000/install.sh"
    assert (c.network.mode, c.network.bridge, str(c.network.subnet), c.network.dns_port) == \
        ("tap", "bgtest0", "10.77.0.0/24", 0)


@pytest.mark.parametrize(("body", "needle"), [
    ('[network]\nmode = "bridge"\n', '"user" or "tap"'),
    ('[network]\nbridge = "this-name-is-too-long"\n', "valid interface name"),
    ('[network]\nsubnet = "10.0.0.0/8"\n', "/16 to /29"),
    ('[network]\nsubnet = "nonsense"\n', "IPv4 network"),
    ('[network]\ndns_port = 70000\n', "port number"),
    ('[network]\nfoo = 1\n', "unknown keys"),
    ('[bootstrap]\ninstaller_url = "file:///etc/passwd"\n', "http(s) URL"),
    ('netwrok = 1\n', "unknown keys"),
])
def test_bad_tables_name_the_key(tmp_path: Path, body: str, needle: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(cfg, tmp_path)


def test_serial_log_cap(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    assert load_config(cfg, tmp_path).serial_max_mib == 8
    cfg.write_text("[logs]\nserial_max_mib = 2\n")
    assert load_config(cfg, tmp_path).serial_max_mib == 2
    for bad in ("0", '"8M"', "true", "5000"):
        cfg.write_text(f"[logs]\nserial_max_mib = {bad}\n")
        with pytest.raises(ConfigError, match=r"\[logs\] serial_max_mib must be"):
            load_config(cfg, tmp_path)


@pytest.mark.parametrize(("guest", "own"), [
    ("~/.ssh/authorized_keys", "/root/.ssh/authorized_keys"),
    ("/root/.ssh/authorized_keys", "/root/.ssh/authorized_keys"),
    ("~/.ssh/../.ssh/authorized_keys", "/root/.ssh/authorized_keys"),
    ("~/.ssh//authorized_keys/", "/root/.ssh/authorized_keys"),
    ("//root/./.ssh/authorized_keys", "/root/.ssh/authorized_keys"),
    ("~/.ssh", "/root/.ssh/authorized_keys"),  # a file there replaces the directory
    ("~/.ssh/rc", "/root/.ssh/rc"),
    ("~/.banger/hostname", "/root/.banger/..."),
    ("~/.banger/ssh_host_ed25519_key", "/root/.banger/..."),
    ("~/x/../.banger/bootstrap.log", "/root/.banger/..."),
    ("~/.banger", "/root/.banger/..."),
    ("~/repo/.git/config", "/root/repo/..."),
])
def test_file_sync_to_bangers_own_files_refused(tmp_path: Path, guest: str, own: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[[file_sync]]\nhost = "~/.npmrc"\nguest = "~/ok"\n'
                   f'[[file_sync]]\nhost = "~/.ssh/id_ed25519.pub"\nguest = "{guest}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(cfg, Path("/home/u"))
    message = str(err.value)
    assert "file_sync entry 2" in message and repr(guest) in message
    assert f"banger's own {own}" in message


@pytest.mark.parametrize(("guest", "stored"), [
    ("~/.ssh/id_ed25519", "/root/.ssh/id_ed25519"),  # a key for the guest's own git push
    ("~/.ssh/config", "/root/.ssh/config"),
    ("~/.banger-notes", "/root/.banger-notes"),
    ("~/repository/x", "/root/repository/x"),
    ("~/a/../b/", "/root/b"),
    ("~/.gitconfig", "/root/.gitconfig"),
])
def test_file_sync_near_bangers_files_allowed(tmp_path: Path, guest: str, stored: str) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[[file_sync]]\nhost = "/etc/hosts"\nguest = "{guest}"\n')
    assert load_config(cfg, Path("/home/u")).file_sync[0].guest == stored


def test_daemon_boot_limit(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text("[daemon]\nmax_concurrent_boots = 3\n")
    assert load_config(cfg, tmp_path).max_concurrent_boots == 3
    assert Config().max_concurrent_boots is None  # the daemon's default: CPUs, at least 2
    for bad in ("0", '"4"', "true", "1000"):
        cfg.write_text(f"[daemon]\nmax_concurrent_boots = {bad}\n")
        with pytest.raises(ConfigError, match=r"\[daemon\] max_concurrent_boots"):
            load_config(cfg, tmp_path)
    cfg.write_text("[daemon]\nmax_boots = 3\n")
    with pytest.raises(ConfigError, match="max_concurrent_boots"):
        load_config(cfg, tmp_path)
