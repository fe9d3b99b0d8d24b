"""OCI images end to end: a real registry on loopback (Debian's docker-registry, its storage
in a temp dir, on 127.0.0.1 at a free port, started and stopped here), test images made
locally (tar layers -> an OCI layout -> pushed with skopeo), pulled by banger, booted,
and a command run in them through the agent.

- a busybox-only image (static busybox, no libc, no init, no sshd, no Python) boots and
  runs `vm exec` with the image's Env and WorkingDir, and `vm cp` both ways;
- a two-layer image whose second layer deletes (whiteout), empties (opaque directory) and
  replaces files of the first shows only the second layer's view;
- a blob the registry serves with the wrong content is refused, and neither an image nor
  a half-written blob is left behind.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import ocimake
from tests.e2e.conftest import Banger, finish, make_banger
from tests.ocimake import Registry

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    r = Registry(tmp_path_factory.mktemp("registry"))
    yield r
    r.stop()


@pytest.fixture
def b() -> Iterator[Banger]:
    bg = make_banger(prefix="bgoci-")
    yield bg
    finish(bg)


def _exec(b: Banger, vm: str, *argv: str) -> str:
    return b.run("vm", "exec", vm, "--", *argv, timeout=120).stdout


def test_a_busybox_only_image_pulls_boots_and_runs_commands(
        b: Banger, registry: Registry, tmp_path: Path) -> None:
    ref = registry.push([ocimake.busybox_layer()], "bbonly", tmp_path,
                        env=["PATH=/bin", "GREETING=hello-oci"], workdir="/etc")
    pulled = json.loads(b.run("image", "pull", ref, "--name", "bbonly", "--json").stdout)
    assert pulled["kind"] == "oci" and pulled["env"] == ["PATH=/bin", "GREETING=hello-oci"]
    run = b.run("vm", "run", "--name", "bb", "--image", "bbonly", "-d", timeout=300)
    assert "ready" in run.stdout + run.stderr
    assert _exec(b, "bb", "cat", "/etc/motd") == "from the busybox layer\n"
    # The image's Env and WorkingDir; no libc in the image, only banger's /.banger.
    assert _exec(b, "bb", "sh", "-c", 'echo "$GREETING $PWD"') == "hello-oci /etc\n"
    assert b.run("vm", "exec", "bb", "--", "ls", "/lib", check=False, timeout=120).returncode
    assert _exec(b, "bb", "ls", "/.banger") == "banger-agent\nbin\nbusybox\ninit\n"
    # No sshd in it: `vm ssh` says so at once rather than waiting for one.
    ssh = b.run("vm", "ssh", "bb", "--", "true", check=False, timeout=20)
    assert ssh.returncode != 0 and "starts no sshd" in ssh.stderr, ssh.stderr
    # Files in and out through the agent alone (no tar, no shell of the image's needed).
    note = tmp_path / "note.txt"
    note.write_text("through the agent\n")
    b.run("vm", "cp", str(note), "bb:/root/note.txt", timeout=120)
    assert _exec(b, "bb", "cat", "/root/note.txt") == "through the agent\n"
    b.run("vm", "cp", "bb:/etc/motd", str(tmp_path / "motd"), timeout=120)
    assert (tmp_path / "motd").read_text() == "from the busybox layer\n"


def test_a_second_layer_deletes_empties_and_replaces_the_firsts_files(
        b: Banger, registry: Registry, tmp_path: Path) -> None:
    lower = ocimake.tar_layer([("etc", "dir", b"", 0o755),
                               ("etc/motd", "file", b"lower\n", 0o644),
                               ("etc/gone", "file", b"gone\n", 0o644),
                               ("opt/old/a", "file", b"a\n", 0o644),
                               ("opt/old/b", "file", b"b\n", 0o644)])
    upper = ocimake.tar_layer([("etc/.wh.gone", "file", b"", 0o644),
                               ("etc/motd", "file", b"upper\n", 0o600),
                               ("opt/old/.wh..wh..opq", "file", b"", 0o644),
                               ("opt/old/new", "file", b"new\n", 0o644)])
    ref = registry.push([ocimake.busybox_layer(), lower, upper], "twolayer", tmp_path,
                        env=["PATH=/bin"])
    b.run("image", "pull", ref, "--name", "twolayer")
    once = b.run("vm", "run", "--rm", "--name", "once", "--image", "twolayer", "--",
                 "cat", "/etc/motd", timeout=300)
    assert once.stdout == "upper\n"
    b.run("vm", "run", "--name", "two", "--image", "twolayer", "-d", timeout=300)
    assert _exec(b, "two", "cat", "/etc/motd") == "upper\n"
    assert _exec(b, "two", "ls", "/opt/old") == "new\n"
    gone = b.run("vm", "exec", "two", "--", "ls", "/etc/gone", check=False, timeout=120)
    assert gone.returncode != 0
    assert _exec(b, "two", "busybox", "stat", "-c", "%a", "/etc/motd") == "600\n"
    # Pulled again under the same name: the VM made from the first pull still boots.
    b.run("image", "pull", ref, "--name", "twolayer")
    b.run("vm", "restart", "two", timeout=300)
    assert _exec(b, "two", "cat", "/etc/motd") == "upper\n"


def test_a_blob_with_a_wrong_digest_is_refused_and_nothing_is_left(
        b: Banger, registry: Registry, tmp_path: Path) -> None:
    layer = ocimake.tar_layer([("evil", "file", b"the registry will change this\n", 0o644)])
    ref = registry.push([layer], "corrupt", tmp_path)
    manifest = json.loads((tmp_path / "corrupt" / "index.json").read_text())["manifests"][0]
    mdata = (tmp_path / "corrupt" / "blobs" / "sha256"
             / manifest["digest"].split(":", 1)[1]).read_text()
    digest = json.loads(mdata)["layers"][0]["digest"]
    data = registry.blob(digest)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, other content: only the digest can tell
    data.write_bytes(bytes(raw))
    proc = b.run("image", "pull", ref, "--name", "corrupt", check=False, timeout=300)
    assert proc.returncode != 0
    assert "digest" in proc.stderr.lower(), proc.stderr
    listed = [i["name"] for i in json.loads(b.run("image", "list", "--json").stdout)]
    assert "corrupt" not in listed
    oci = b.home / "state" / "oci"
    for made in (oci / "images", oci / "builds"):
        assert not made.exists() or list(made.iterdir()) == [], list(made.iterdir())
    for blob in (oci / "layout" / "blobs" / "sha256").glob("*"):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, blob
    assert not (oci / "layout" / "blobs" / "sha256" / digest.split(":", 1)[1]).exists()
