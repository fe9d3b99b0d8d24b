"""The daemon's OpenAPI document states the model's rules: name pattern, bounds, defaults
and choices come from banger.model.vm, so the published schema cannot drift from them."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from banger.api.schema import Check, Doctor
from banger.core.operations import Operations
from banger.core.service import VMService
from banger.daemon.app import create_app
from banger.model import vm as model
from banger.model.events import EVENT_KINDS
from banger.model.layout import Layout
from banger.store.db import Database
from banger.store.vms import OperationLog, VMRepository
from tests.fakes import fake_host


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root: Path = tmp_path_factory.mktemp("openapi")
    layout = Layout.for_user({"BANGER_HOME": str(root / "h"), "HOME": str(root)})
    db = Database(layout.db)
    svc = VMService(repo=VMRepository(db), ops=Operations(OperationLog(db)),
                    host=fake_host(root)[0], layout=layout)
    app = create_app(svc, doctor=lambda: Doctor(checks=[Check(name="x", status="pass",
                                                              detail="")]),
                     ssh_key="k", known_hosts="kh", ssh_argv=lambda p, a: ["ssh"])
    doc: dict[str, Any] = app.openapi()
    db.close()
    return doc


@pytest.fixture
def schemas(document: dict[str, Any]) -> dict[str, Any]:
    return document["components"]["schemas"]  # type: ignore[no-any-return]


def _plain(prop: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an ``anyOf [X, null]`` property."""
    branches = [b for b in prop.get("anyOf", [prop]) if b.get("type") != "null"]
    assert len(branches) == 1, prop
    return {**prop, **branches[0]}


def _bounds(prop: dict[str, Any]) -> tuple[int, int]:
    p = _plain(prop)
    return int(p["minimum"]), int(p["maximum"])


def test_name_pattern_is_the_models(schemas: dict[str, Any]) -> None:
    pattern = _plain(schemas["VMCreate"]["properties"]["name"])["pattern"]
    assert pattern == model.NAME_PATTERN
    for name in ("box", "web-1", "a" * 63, "-x", "x-", "Box", "a" * 64, "a_b", ""):
        ok = True
        try:
            model.validate_name(name)
        except model.InvalidSpec:
            ok = False
        assert bool(re.search(pattern, name)) is ok, name


@pytest.mark.parametrize("schema", ["VMCreate", "VMSet"])
def test_bounds_are_the_models(schemas: dict[str, Any], schema: str) -> None:
    props = schemas[schema]["properties"]
    assert _bounds(props["vcpus"]) == (model.MIN_VCPUS, model.MAX_VCPUS)
    assert _bounds(props["memory_mib"]) == (model.MIN_MEMORY_MIB, model.MAX_MEMORY_MIB)
    assert _bounds(props["disk_mib"]) == (model.MIN_WORK_DISK_MIB, model.MAX_WORK_DISK_MIB)


def test_bounds_are_where_the_model_refuses() -> None:
    spec = model.VMSpec()
    for field, low, high in (("vcpus", model.MIN_VCPUS, model.MAX_VCPUS),
                             ("memory_mib", model.MIN_MEMORY_MIB, model.MAX_MEMORY_MIB),
                             ("work_disk_mib", model.MIN_WORK_DISK_MIB,
                              model.MAX_WORK_DISK_MIB)):
        for value in (low, high):
            model.VMSpec(**{**spec.__dict__, field: value}).validated()
        for value in (low - 1, high + 1):
            with pytest.raises(model.InvalidSpec):
                model.VMSpec(**{**spec.__dict__, field: value}).validated()


def test_defaults_are_the_models(schemas: dict[str, Any]) -> None:
    props = schemas["VMCreate"]["properties"]
    spec = model.VMSpec()
    assert props["image"]["default"] == spec.image
    assert props["vcpus"]["default"] == spec.vcpus
    assert props["memory_mib"]["default"] == spec.memory_mib
    assert props["disk_mib"]["default"] == spec.work_disk_mib
    assert props["nat"]["default"] == spec.nat


def _choices(schemas: dict[str, Any], prop: dict[str, Any]) -> list[str]:
    p = _plain(prop)
    if "$ref" in p:
        p = schemas[p["$ref"].rsplit("/", 1)[1]]
    return list(p["enum"])


def test_choices_are_the_models(schemas: dict[str, Any]) -> None:
    networks = [m.value for m in model.NetworkMode]
    assert _choices(schemas, schemas["VMCreate"]["properties"]["network"]) == networks
    assert _choices(schemas, schemas["VMOut"]["properties"]["network"]) == networks
    assert _choices(schemas, schemas["VMOut"]["properties"]["state"]) == [
        s.value for s in model.VMState]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("post", "/v1/vms", "201"), ("post", "/v1/vms/{ref}/start", "200"),
    ("post", "/v1/vms/{ref}/restart", "200"), ("post", "/v1/vms/{ref}/workspace", "200")])
def test_streamed_routes_publish_the_event_vocabulary(document: dict[str, Any], method: str,
                                                      path: str, status: str) -> None:
    content = document["paths"][path][method]["responses"][status]["content"]
    line = content["application/x-ndjson"]["schema"]
    assert _choices(document["components"]["schemas"], line["properties"]["kind"]) == list(
        EVENT_KINDS)
    # Its nested models are the document's own (no dangling $defs).
    assert "$defs" not in line
    for ref in re.findall(r'"\$ref": "([^"]+)"', json.dumps(line)):
        assert ref.rsplit("/", 1)[1] in document["components"]["schemas"], ref


def test_the_log_stream_publishes_its_line(document: dict[str, Any]) -> None:
    route = document["paths"]["/v1/vms/{ref}/logs/stream"]["get"]
    line = route["responses"]["200"]["content"]["application/x-ndjson"]["schema"]
    assert line["properties"]["type"]["enum"] == ["data", "skipped", "heartbeat", "end"]
    assert {p["name"] for p in route["parameters"]} == {"ref", "follow", "vmm", "lines"}


def test_ssh_config_takes_the_models_names(tmp_path: Path) -> None:
    # banger.local is a stdlib leaf that cannot import the model: its own check of a VM
    # name must accept exactly what the model does.
    from banger.local.sshconfig import SshEntry, render

    for name in ("box", "web-1", "a" * 63, "0", "-x", "x-", "a" * 64, "a_b", "a.b", "",
                 "box\n"):
        try:
            model.validate_name(name)
            valid = True
        except model.InvalidSpec:
            valid = False
        entry = SshEntry(name=name, hostname=None, port=22, alias="banger-x")
        try:
            render([entry], tmp_path / "k", tmp_path / "kh")
            rendered = True
        except ValueError:
            rendered = False
        assert rendered is valid, name
