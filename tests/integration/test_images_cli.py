"""`banger image pull|import|list|show` through the real daemon app and CLI (fake host
ports): progress lines on stderr, --json, the routes in the OpenAPI document, a refused
name, a hostile source's text made printable."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from banger.cli.main import cli
from banger.ports import ImageRecord
from tests.fakes import FakeImages
from tests.integration.conftest import Daemon


def banger(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _images(daemon: Daemon) -> FakeImages:
    images = daemon.service.ctx.host.images
    assert isinstance(images, FakeImages)
    return images


def test_pull_streams_progress_and_lists_the_image(daemon: Daemon) -> None:
    code, out, err = banger("image", "pull", "127.0.0.1:5000/Tools:1", "--json")
    assert code == 0, err
    assert "pulling 127.0.0.1:5000/Tools:1" in err
    assert json.loads(out)["name"] == "tools-1" and json.loads(out)["kind"] == "oci"
    code, out, err = banger("image", "list", "--json")
    assert [i["name"] for i in json.loads(out)] == ["debian-bookworm", "tools-1"]
    code, out, _ = banger("image", "list")
    assert out.splitlines()[0].split() == ["NAME", "KIND", "BUILT", "SIZE", "SOURCE"]
    assert json.loads(banger("image", "show", "tools-1")[1])["source"] == \
        "127.0.0.1:5000/Tools:1"
    paths = daemon.app.openapi()["paths"]
    assert {"/v1/images", "/v1/images/{name}", "/v1/images/pull",
            "/v1/images/import"} <= paths.keys()


def test_import_sends_an_absolute_path_and_bad_names_are_refused(
        daemon: Daemon, tmp_path: Path) -> None:
    archive = tmp_path / "app.tar"
    archive.write_bytes(b"")
    code, out, err = banger("image", "import", str(archive), "--name", "app")
    assert code == 0, err
    assert _images(daemon).pulled["app"].source == str(archive)
    code, _, err = banger("image", "pull", "x", "--name", "Bad Name")
    assert code != 0 and "name" in err
    r = daemon.http.post("/v1/images/import", json={"path": "relative.tar"})
    assert r.status_code == 422


def test_a_hostile_source_reaches_the_terminal_printable(daemon: Daemon) -> None:
    _images(daemon).pulled["evil"] = ImageRecord("evil", "oci", True, source="\x1b[2Jx")
    code, out, _ = banger("image", "list")
    assert code == 0 and "\x1b" not in out
