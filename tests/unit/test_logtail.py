"""The one log-tail reader (banger.local.logtail) and the places that show a log's end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from banger.local.logtail import LINES_WINDOW, tail_bytes, tail_lines


def test_tail_bytes_is_the_end(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"0123456789")
    assert tail_bytes(log, 4) == b"6789"
    assert tail_bytes(log, 100) == b"0123456789"
    assert tail_bytes(log, 0) == b""


def test_tail_lines_decodes_with_replacement(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"one\ntwo \xff\nthree\n")
    assert tail_lines(log, 2) == ["two \ufffd", "three"]
    assert tail_lines(log, 10) == ["one", "two \ufffd", "three"]
    assert tail_lines(log, 0) == []


def test_tail_lines_looks_back_one_window_only(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(b"early\n" + b"x" * LINES_WINDOW + b"\nlate\n")
    # "early" is out of reach; the window starts inside the long line.
    assert tail_lines(log, 5) == ["x" * (LINES_WINDOW - len("\nlate\n")), "late"]


def test_missing_log_raises_for_the_caller_to_word(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        tail_lines(tmp_path / "nope", 3)
    with pytest.raises(FileNotFoundError):
        tail_bytes(tmp_path / "nope", 3)


# Each place that shows the end of a log a guest (or its VMM) writes, called on a 4 GiB
# log in a process that may not map 1 GiB: reading the whole file would raise MemoryError.
CALLERS = {
    "core.startplan": ("from banger.core.startplan import _tail",
                       "_tail(log)"),
    "host.qemu": ("from banger.host.qemu import log_tail",
                  "log_tail(log)"),
    "host.ssh": ("from banger.host.ssh import _with_tail",
                 "_with_tail('timed out', log)"),
    "daemon.logstream": ("from banger.daemon.logstream import _serial_tail",
                   "_serial_tail(log, log.with_name('rotated'))[0]"),
}


@pytest.mark.parametrize("caller", sorted(CALLERS))
def test_a_huge_log_is_never_read_whole(tmp_path: Path, caller: str) -> None:
    log = tmp_path / "serial.log"
    with log.open("wb") as f:
        f.truncate(4 << 30)  # sparse: costs no disk
        f.seek(0, 2)
        f.write(b"boot \xff\nlast line\n")
    imports, call = CALLERS[caller]
    script = (f"import resource, sys\nfrom pathlib import Path\n{imports}\n"
              f"log = Path(sys.argv[1])\n"
              "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
              f"print({call})\n")
    done = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "last line" in done.stdout and "boot \ufffd" in done.stdout
