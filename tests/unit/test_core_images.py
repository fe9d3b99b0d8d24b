"""Image use cases (core/images.py) and what an OCI image changes for a VM: its config's
Env and WorkingDir for execs (core/execs.py), its microVM-only boot (core/startplan.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from banger.core.execs import DEFAULT_ENV, HOME, with_image_config
from banger.core.startplan import boot_source
from banger.model.errors import ConflictError, InvalidRequest, OperationFailed
from banger.model.layout import Layout
from banger.model.vm import VM, KernelKind, VMSpec, VMState
from banger.ports import ExecRequest, ImageInfo, ImageRecord
from tests.fakes import agent_of, fake_service

OCI = ImageRecord("app", "oci", True, env=("PATH=/opt/bin:/bin", "FOO=bar"), workdir="/srv")


def test_an_oci_images_env_and_workdir_apply_unless_the_caller_set_them() -> None:
    req = ExecRequest(argv=("x",), env={**DEFAULT_ENV, "MINE": "1"}, cwd=HOME)
    got = with_image_config(req, OCI)
    assert got.env["PATH"] == "/opt/bin:/bin" and got.env["FOO"] == "bar"
    assert got.env["MINE"] == "1" and got.cwd == "/srv"
    mine = with_image_config(ExecRequest(("x",), {**DEFAULT_ENV, "FOO": "mine"}, cwd="/tmp"), OCI)
    assert mine.env["FOO"] == "mine" and mine.cwd == "/tmp"
    builtin = ImageRecord("debian-bookworm", "built-in", True, env=("FOO=no",), workdir="/x")
    assert with_image_config(req, builtin) == req


def test_an_oci_image_boots_the_microvm_kernel_only(tmp_path: Path) -> None:
    k = tmp_path / "vmlinux-microvm"
    info = ImageInfo("app", tmp_path / "rootfs.ext4", k, k, "init=/.banger/init",
                     microvm_kernel=k, cloud_kernel=False)
    vm = VM(id="a" * 8, name="box", spec=VMSpec(image="app"), state=VMState.STOPPED,
            created_at=0.0, updated_at=0.0)
    assert boot_source(vm, info).kernel == k
    cloud = replace(vm, spec=VMSpec(image="app", kernel=KernelKind.CLOUD))
    with pytest.raises(InvalidRequest, match="microVM kernel only"):
        boot_source(cloud, info)


def test_pull_names_the_image_from_its_ref_an_exec_gets_its_config_and_ssh_says_no(
        tmp_path: Path) -> None:
    layout = Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})
    svc, images, *_ = fake_service(tmp_path, layout)
    lines: list[str] = []
    got = svc.pull_image("127.0.0.1:5000/tools/Py:3.12", None, archive=False,
                         on_progress=lines.append)
    assert got.name == "py-3.12" and lines
    with pytest.raises(InvalidRequest, match="image name"):
        svc.pull_image("x", "Bad Name", archive=False, on_progress=lines.append)
    with pytest.raises(InvalidRequest, match="absolute path"):
        svc.pull_image("rel/app.tar", None, archive=True, on_progress=lines.append)
    images.pulled["py-3.12"] = OCI
    svc.create(name="box", spec=VMSpec(image="py-3.12"))
    ex = svc.exec("box", ExecRequest(argv=("echo", "hi"), env=dict(DEFAULT_ENV), cwd=""),
                  workspace=True)
    ex.abandon()
    (sent,) = [e for execs in agent_of(svc).execs.values() for e in execs]
    assert sent.request.env["FOO"] == "bar" and sent.request.cwd == "/srv"

    with pytest.raises(ConflictError, match="starts no sshd"):
        svc.ssh_view("box")


def test_a_restart_keeps_the_base_its_overlay_was_made_over(tmp_path: Path) -> None:
    layout = Layout.for_user({"BANGER_HOME": str(tmp_path / "home"), "HOME": str(tmp_path)})
    svc, images, _disks, vmm, *_ = fake_service(tmp_path, layout)
    first = images._info()
    first.rootfs.parent.mkdir(parents=True, exist_ok=True)
    first.rootfs.write_bytes(b"first build")
    svc.create(name="box", spec=VMSpec())
    assert vmm.launched[-1].root.backing == first.rootfs
    second = tmp_path / "builds" / "second" / "rootfs.ext4"
    second.parent.mkdir(parents=True)
    second.write_bytes(b"second build")
    images._info = lambda: replace(first, rootfs=second)  # type: ignore[method-assign]
    svc.stop("box")
    svc.start("box")
    assert vmm.launched[-1].root.backing == first.rootfs  # the image moved on; the VM not
    svc.stop("box")
    first.rootfs.unlink()  # the old base gone: over the current one its fs is corrupt
    with pytest.raises(OperationFailed, match=r"made over .*, which is gone.*banger vm "
                                              r"delete box"):
        svc.start("box")
