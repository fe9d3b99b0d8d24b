"""The default image builds without root: mmdebstrap's unshare mode as a plain user.

Slow (a full mmdebstrap run); needs root to switch to an unprivileged test account, and
unprivileged user namespaces with subordinate ids for it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from banger.host import disks, imagebuild, kernelbuild

from .conftest import IMAGES_DIR

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

USER = "bangertest"
SRC = Path(imagebuild.__file__).parents[2]


def build_user() -> str:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root to run the build as an unprivileged test user")
    for tool in ("mmdebstrap", "newuidmap", "useradd"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    try:
        pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", USER], check=True)
    for idfile, flag in (("/etc/subuid", "--add-subuids"), ("/etc/subgid", "--add-subgids")):
        text = Path(idfile).read_text() if Path(idfile).exists() else ""
        if not any(line.startswith(f"{USER}:") for line in text.splitlines()):
            subprocess.run(["usermod", flag, "200000-265535", USER], check=True)
    if subprocess.run(["runuser", "-u", USER, "--", "unshare", "-r", "true"],
                      capture_output=True).returncode != 0:
        pytest.skip("unprivileged user namespaces are disabled here")
    return USER


def test_default_image_builds_as_a_plain_user() -> None:
    user = build_user()
    out = Path(tempfile.mkdtemp(prefix="banger-userbuild-"))
    try:
        os.chown(out, pwd.getpwnam(user).pw_uid, -1)
        target = out / "debian-bookworm"
        # The microVM kernel this test does not cover: the one the e2e tier built once
        # (conftest), copied where the plain user can read it (root's cache is not).
        cache = out / "cache"
        key = kernelbuild.current_key()
        shutil.copytree(IMAGES_DIR.parent / "kernel" / key, cache / "kernel" / key)
        for p in (cache, *cache.rglob("*")):
            os.chown(p, pwd.getpwnam(user).pw_uid, -1)
        code = ("from pathlib import Path; from banger.host import imagebuild; "
                f"imagebuild.build_default_image(Path({str(target)!r}), "
                f"agent_cache=Path({str(cache)!r}), "
                "on_progress=lambda s: print(s, flush=True))")
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        res = subprocess.run(["runuser", "-u", user, "--", "env", f"PYTHONPATH={SRC}",
                              python, "-c", code], capture_output=True, text=True,
                             cwd="/", timeout=900)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "building rootfs.ext4" in res.stdout
        art = imagebuild.load_image(target)
        # Files belong to root (and system groups) inside, to the builder outside. The
        # groups are Debian's fixed ones (shadow 42, mail 8, staff 50); apt's own
        # partial/ dir is no witness: whether _apt owns it depends on the apt release.
        for path, uid, gid in (("/etc/shadow", 0, 42), ("/sbin/banger-init", 0, 0),
                               ("/root", 0, 0), ("/var/mail", 0, 8), ("/var/local", 0, 50)):
            info = disks.stat_in_image(art.rootfs, path)
            assert (info.uid, info.gid) == (uid, gid), path
        assert {p.stat().st_uid for p in target.iterdir()} == {pwd.getpwnam(user).pw_uid}
        # Nothing half-built is left beside it.
        assert sorted(p.name for p in out.iterdir()) == ["cache", "debian-bookworm"]
    finally:
        shutil.rmtree(out, ignore_errors=True)
