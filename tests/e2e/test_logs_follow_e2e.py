"""`banger vm logs -f` on a real VM: the guest's boot lines as it boots, the end when the
VM stops."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.e2e.conftest import Banger

pytestmark = pytest.mark.e2e


def test_follow_shows_a_booting_guest_and_ends_when_it_stops(banger: Banger) -> None:
    banger.run("vm", "create", "--no-start", "--name", "box")
    start = subprocess.Popen(banger.argv("vm", "start", "box"), env=banger.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd="/")
    try:
        deadline = time.monotonic() + 120  # a fail-safe, not a measure
        while banger.show("box")["state"] == "stopped":
            assert start.poll() is None, start.communicate()
            assert time.monotonic() < deadline, "the VM never started"
            time.sleep(0.05)
        follow = subprocess.Popen(banger.argv("vm", "logs", "-f", "box"), env=banger.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  cwd="/")
        out, err = start.communicate(timeout=300)
        assert start.returncode == 0, err
    finally:
        if start.poll() is None:
            start.kill()
            start.wait()
    try:
        # Booted, and following still: the follower has not ended on its own.
        assert follow.poll() is None, follow.communicate()
        banger.run("vm", "stop", "box")
        out_b, err_b = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()
    assert follow.returncode == 0, err_b
    text = out_b.decode()
    # banger's init speaks on the console (test_boot: "banger: ", "sshd started").
    assert "banger: " in text, text[-2000:]
    assert "\x1b" not in text
