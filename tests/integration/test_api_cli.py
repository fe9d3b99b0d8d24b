from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from banger.cli.main import cli
from banger.ports import ListeningSocket
from tests.integration.conftest import Daemon


def banger(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_socket_is_owner_only(daemon: Daemon) -> None:
    mode = daemon.layout.daemon_socket.stat().st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(daemon.layout.runtime_dir.stat().st_mode) == 0o700


def test_openapi_published(daemon: Daemon) -> None:
    doc = daemon.http.get("/openapi.json").json()
    assert "/v1/vms" in doc["paths"] and "/v1/vms/{ref}/start" in doc["paths"]
    assert "ErrorResponse" in doc["components"]["schemas"]


def test_lifecycle_through_cli(daemon: Daemon) -> None:
    code, out, err = banger("vm", "create", "--name", "box", "--json")
    assert code == 0, err
    vm = json.loads(out)
    assert vm["state"] == "running" and vm["runtime"]["accel"] == "tcg"
    assert "wait_agent" in err and "wait_ssh" not in err  # plain progress off a TTY
    code, out, _ = banger("vm", "list", "--json")
    assert [v["name"] for v in json.loads(out)] == ["box"]
    code, out, _ = banger("vm", "show", "box")
    assert code == 0 and "running" in out and "qemu pid" in out
    assert banger("vm", "stop", "box")[0] == 0
    code, out, _ = banger("vm", "set", "box", "--vcpu", "2", "--memory", "1G", "--json")
    assert code == 0 and json.loads(out)["memory_mib"] == 1024
    assert banger("vm", "start", "box")[0] == 0
    assert daemon.vmm.launched[-1].vcpus == 2
    assert banger("vm", "restart", "box")[0] == 0
    code, out, _ = banger("vm", "kill", "box", "--json")
    assert code == 0 and json.loads(out)[0]["vm"]["state"] == "stopped"
    assert daemon.vmm.procs == {}
    assert banger("vm", "delete", "box")[0] == 0
    assert json.loads(banger("vm", "list", "--json")[1]) == []


def test_bad_input_refused_before_anything_is_created(daemon: Daemon) -> None:
    for args, needle in [
        (["--name", "Bad_Name"], "DNS label"),
        (["--memory", "-1"], "--memory -1 MiB: Input should be greater than or equal to 128"),
        (["--vcpu", "0"], "--vcpu 0: Input should be greater than or equal to 1"),
        (["--memory", "lots"], "512M"),
    ]:
        code, _, err = banger("vm", "create", *args)
        assert code == 2 and needle in err, err
    code, _, err = banger("vm", "create", "--name", "x", "--image", "nope")
    assert code == 1 and "unknown image 'nope'" in err
    code, _, err = banger("vm", "create", "--name", "x", "--memory", "999G")
    assert code == 2 and "--memory 1022976 MiB: Input should be less than or equal to" in err
    # The daemon refuses on its own too, naming the field.
    r = daemon.http.post("/v1/vms", json={"name": "x", "memory_mib": -1})
    assert r.status_code == 422 and "memory_mib" in r.json()["error"]["message"]
    assert daemon.client.list_vms() == [] and daemon.vmm.launched == []
    assert banger("vm", "create", "--name", "dup", "--no-start")[0] == 0
    code, _, err = banger("vm", "create", "--name", "dup")
    assert code == 1 and "already exists" in err
    # The CLI checks no range itself: the daemon's refusal comes back naming the flag.
    code, _, err = banger("vm", "set", "dup", "--vcpu", "0")
    assert code == 2 and "--vcpu 0: Input should be greater than or equal to 1" in err, err


def test_failed_start_shows_stage_and_operation(daemon: Daemon) -> None:
    daemon.service.ctx.failpoint = "qemu_launch"
    code, _, err = banger("vm", "create", "--name", "f")
    assert code == 1
    assert "stage qemu_launch" in err and "operation op-" in err
    assert "rolling back qemu_launch" in err
    v = daemon.client.show("f")
    assert v.state == "error" and v.last_error_stage == "qemu_launch"
    assert daemon.vmm.procs == {}


def test_several_refs_each_reported(daemon: Daemon) -> None:
    for n in ("a", "b"):
        assert banger("vm", "create", "--name", n)[0] == 0
    code, out, err = banger("vm", "stop", "a", "ghost", "b")
    assert code == 1
    assert "a: stopped" in out and "b: stopped" in out and "no VM named 'ghost'" in err
    code, out, _ = banger("vm", "prune", "-f")
    assert code == 0 and "a: deleted" in out and "b: deleted" in out


def test_logs_and_ops(daemon: Daemon) -> None:
    banger("vm", "create", "--name", "l")
    vm = daemon.client.show("l")
    from pathlib import Path
    Path(vm.serial_log).write_text("Linux version 6.1\n")
    code, out, _ = banger("vm", "logs", "l")
    assert code == 0 and "Linux version" in out
    code, out, _ = banger("ops", "--json")
    assert code == 0 and json.loads(out) == []


def test_ssh_refused_when_not_running(daemon: Daemon) -> None:
    banger("vm", "create", "--name", "s", "--no-start")
    code, _, err = banger("vm", "ssh", "s", "--", "true")
    assert code == 1 and "not running" in err and "banger vm start s" in err


def test_ports_route_and_cli(daemon: Daemon) -> None:
    assert banger("vm", "create", "--name", "web", "--no-start")[0] == 0
    code, _, err = banger("vm", "ports", "web")
    assert code == 1 and "not running" in err and "banger vm start web" in err
    r = daemon.http.get("/v1/vms/web/ports")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert banger("vm", "start", "web")[0] == 0
    daemon.agent.sockets = [ListeningSocket("tcp", "0.0.0.0", 22, "sshd"),
                            ListeningSocket("tcp", "*", 8080, "busybox"),
                            ListeningSocket("udp", "127.0.0.53", 53, None)]
    port = daemon.vmm.launched[-1].net.ssh_port  # type: ignore[union-attr]
    body = daemon.http.get("/v1/vms/web/ports").json()
    assert body["vm"] == "web" and body["network"] == "user"
    code, out, err = banger("vm", "ports", "web", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert rows == body["ports"]
    assert rows[0] == {"proto": "tcp", "address": "0.0.0.0", "port": 22, "process": "sshd",
                       "endpoint": f"127.0.0.1:{port}",
                       "note": "forwarded to the guest's port 22"}
    assert rows[1]["endpoint"] is None and "user networking" in rows[1]["note"]
    assert rows[2] == {"proto": "udp", "address": "127.0.0.53", "port": 53, "process": None,
                       "endpoint": None, "note": "guest loopback only"}
    code, out, _ = banger("vm", "ports", "web")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["PROTO", "ADDRESS", "PORT", "PROCESS", "ENDPOINT"]
    assert lines[1].split()[:5] == ["tcp", "0.0.0.0", "22", "sshd", f"127.0.0.1:{port}"]
    assert "guest loopback only" in lines[3]
    daemon.agent.sockets = []
    assert banger("vm", "ports", "web")[1] == "web: nothing is listening\n"
    code, _, err = banger("vm", "ports", "nope")
    assert code == 1 and "no VM named 'nope'" in err
    doc = daemon.http.get("/openapi.json").json()
    assert "/v1/vms/{ref}/ports" in doc["paths"] and "GuestPortOut" in doc["components"][
        "schemas"]


def test_doctor(daemon: Daemon) -> None:
    code, out, _ = banger("doctor", "--json")
    assert code == 0 and json.loads(out)["checks"][0]["status"] == "pass"


def test_workspace_dry_run_and_create(daemon: Daemon, tmp_path: Path) -> None:
    repo = tmp_path / "proj"
    (repo / ".git").mkdir(parents=True)
    (repo / "README").write_text("hello")
    code, out, err = banger("vm", "run", "--dry-run", str(repo))
    assert code == 0, err
    assert "README" in out and "1 files" in out
    assert daemon.client.list_vms() == []
    # A guest command after -- is never taken for PATH.
    code, _, err = banger("vm", "run", "--dry-run", "--", "sh", "-c", "true")
    assert code == 2 and "need a PATH" in err
    code, _, err = banger("vm", "run", str(tmp_path), "--dry-run")
    assert code == 1 and "not inside a git work tree" in err
    code, _, err = banger("vm", "run", "--from", "main", str(repo))
    assert code == 2 and "--from needs --branch" in err
    code, out, err = banger("vm", "run", "-d", "--json", "--name", "w", str(repo))
    assert code == 0, err
    vm = json.loads(out)
    assert vm["workspace_path"] == str(repo) and vm["workspace_guest_path"] == "/root/repo"
    assert daemon.client.ssh_target("w").workdir == "/root/repo"
    assert "/root/repo" in banger("vm", "show", "w")[1]


# -- ssh-config ---------------------------------------------------------------------------

def _hosts(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("Host ")]


def test_ssh_config_follows_lifecycle(daemon: Daemon) -> None:
    path = daemon.layout.ssh_config
    # Written at daemon start, with no VM: an installed Include never points at nothing.
    assert _hosts(path) == ["Host *.vm"]
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert banger("vm", "create", "--name", "box")[0] == 0
    assert banger("vm", "create", "--name", "web")[0] == 0
    text = path.read_text()
    assert _hosts(path) == ["Host box.vm", "Host web.vm", "Host *.vm"]
    box = daemon.service.show("box")
    assert box.handles is not None and box.handles.endpoint is not None
    block = text.split("Host box.vm\n", 1)[1].split("\n\n", 1)[0]
    assert f"    HostName {box.handles.endpoint.host}" in block
    assert f"    Port {box.handles.endpoint.port}" in block
    assert f"    HostKeyAlias {box.paths.names.ssh_alias}" in block
    assert f"    IdentityFile {daemon.layout.ssh_key}" in block
    assert banger("vm", "stop", "box")[0] == 0
    assert _hosts(path) == ["Host web.vm", "Host *.vm"]
    assert banger("vm", "start", "box")[0] == 0
    assert _hosts(path) == ["Host box.vm", "Host web.vm", "Host *.vm"]
    assert banger("vm", "kill", "web")[0] == 0
    assert _hosts(path) == ["Host box.vm", "Host *.vm"]
    assert banger("vm", "delete", "box", "web")[0] == 0
    assert _hosts(path) == ["Host *.vm"]
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


def test_ssh_config_install_uninstall(daemon: Daemon, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    user = home / ".ssh" / "config"
    include = daemon.layout.ssh_config

    code, out, _ = banger("ssh-config")
    assert code == 0 and str(include) in out and "not installed" in out
    assert "banger ssh-config --install" in out
    assert not user.exists()  # looking changes nothing

    user.parent.mkdir(mode=0o700)
    original = "Host github.com\n    User git\n"
    user.write_text(original)
    code, out, _ = banger("ssh-config", "--install")
    assert code == 0 and "added an Include" in out
    installed = user.read_text()
    assert installed.endswith(original) and f'Include "{include}"' in installed
    code, out, _ = banger("ssh-config", "--install")
    assert code == 0 and "already installed" in out
    assert user.read_text() == installed

    assert banger("vm", "create", "--name", "box")[0] == 0
    code, out, _ = banger("ssh-config", "--json")
    assert code == 0
    assert json.loads(out) == {"path": str(include), "user_config": str(user),
                               "installed": True, "changed": False, "hosts": ["box.vm"]}
    code, out, _ = banger("ssh-config")
    assert "installed in" in out and "not installed" not in out and "box.vm" in out

    code, out, _ = banger("ssh-config", "--uninstall", "--json")
    assert code == 0 and json.loads(out)["changed"] is True
    assert json.loads(out)["installed"] is False
    assert user.read_text() == original
    code, out, _ = banger("ssh-config", "--uninstall")
    assert code == 0 and "nothing to remove" in out
    assert user.read_text() == original

    code, _, err = banger("ssh-config", "--install", "--uninstall")
    assert code == 2 and "do not go together" in err


def test_ssh_config_broken_block_refused(daemon: Daemon, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    user = tmp_path / ".ssh" / "config"
    user.parent.mkdir()
    user.write_text("Host a\n# >>> banger >>>\nInclude /x\n")  # no closing marker
    code, _, err = banger("ssh-config", "--install")
    assert code == 1 and f"{user}:2:" in err and "by hand" in err
    assert user.read_text() == "Host a\n# >>> banger >>>\nInclude /x\n"

