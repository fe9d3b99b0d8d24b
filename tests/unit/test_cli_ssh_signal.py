"""A signal during `vm run --rm`'s guest session ends ssh with SIGTERM, which lets it put
back the terminal it set raw; a SIGKILL (what subprocess.call does) leaves it raw."""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

import pytest

from banger.api.schema import SshTarget
from banger.cli.common import run_ssh
from banger.cli.interrupt import Interrupted, raise_on_signal

FAKE_SSH = """#!{python}
import signal, sys, time
from pathlib import Path
out = Path({out!r})
def restore(signum, frame):
    out.with_suffix(".restored").write_text(str(signum))  # ssh: leave_raw_mode()
    sys.exit(255)
signal.signal(signal.SIGTERM, restore)
out.write_text("up")
time.sleep(60)
"""


class _Client:
    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def ssh_target(self, ref: str) -> SshTarget:
        return SshTarget(host="127.0.0.1", port=22, user="root", key="k", known_hosts="kh",
                         alias="a", vm=ref, workdir=None, argv=self.argv)


def test_a_signal_during_the_session_lets_ssh_restore_the_terminal(tmp_path: Path) -> None:
    out = tmp_path / "ssh"
    script = tmp_path / "fake-ssh"
    script.write_text(FAKE_SSH.format(python=sys.executable, out=str(out)))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    def send_sigterm_once_up() -> None:
        deadline = time.monotonic() + 20
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm_once_up, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(Interrupted), raise_on_signal():
        run_ssh(_Client([str(script)]), "box", (), tty=True)  # type: ignore[arg-type]
    assert out.with_suffix(".restored").exists(), "ssh was killed, not asked to stop"
    assert time.monotonic() - started < 20
