"""The command runner: output capped per stream, timeouts, input, clipped messages."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from banger.host.runner import CommandError, OutputTooLarge, run, stream


def test_output_over_the_cap_kills_the_command_with_a_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(OutputTooLarge) as err:
        run(["yes"], max_output=1 << 20, timeout=30)  # `yes` never ends on its own
    assert time.monotonic() - started < 10
    assert "output on stdout exceeded 1 MiB; the command was killed" in str(err.value)
    assert err.value.stdout == ""


def test_stderr_is_capped_too_and_check_false_does_not_hide_it() -> None:
    with pytest.raises(OutputTooLarge, match="stderr exceeded 64 KiB"):
        run(["sh", "-c", "yes >&2"], check=False, max_output=64 << 10, timeout=30)


def test_under_the_cap_returns_everything() -> None:
    res = run(["head", "-c", str(3 << 20), "/dev/zero"], max_output=4 << 20)
    assert len(res.stdout) == 3 << 20 and res.returncode == 0


def test_timeout_still_works() -> None:
    started = time.monotonic()
    with pytest.raises(CommandError, match=r"timed out after 0\.5 s"):
        run(["sleep", "30"], timeout=0.5)
    assert time.monotonic() - started < 5


def test_input_and_stdin(tmp_path: Path) -> None:
    # Bigger than a pipe buffer both ways: the writer must not deadlock the reader.
    data = "x" * (1 << 20)
    assert run(["cat"], input=data).stdout == data
    f = tmp_path / "in"
    f.write_bytes(b"hello")
    with f.open("rb") as fh:
        assert run(["cat"], stdin=fh).stdout == "hello"


def test_failure_message_is_clipped() -> None:
    # One 1 MiB line of stderr from a guest must not become a 1 MiB error message.
    with pytest.raises(CommandError) as err:
        run(["sh", "-c", "head -c 1048576 /dev/zero | tr '\\0' e >&2; exit 3"])
    assert "exited with status 3" in str(err.value)
    assert len(str(err.value)) < 2000


def test_one_gib_of_output_keeps_memory_low() -> None:
    # The real runner in a child process, so its peak RSS is its own. VmHWM, not
    # ru_maxrss: Linux carries ru_maxrss over exec, so a child forked from a big pytest
    # process would report the parent's size.
    code = textwrap.dedent("""
        from pathlib import Path
        from banger.host.runner import OutputTooLarge, run
        try:
            run(["head", "-c", str(1 << 30), "/dev/zero"], timeout=120)
        except OutputTooLarge as exc:
            print("error:", exc)
        hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines()
               if ln.startswith("VmHWM:")][0]
        print("maxrss_kib", hwm.split()[1])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=180).stdout
    assert "exceeded 16 MiB; the command was killed" in out
    rss_kib = int(out.split("maxrss_kib")[1])
    assert rss_kib < 200 * 1024, f"peak RSS {rss_kib} KiB"


def test_stream_reads_stdout_as_it_comes_and_judges_the_exit(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.write_bytes(b"abc" * 100_000)
    with src.open("rb") as f, stream(["cat"], stdin=f.fileno(), timeout=30) as out:
        assert out.read(3) == b"abc"  # the rest is read and dropped on leaving
    with src.open("rb") as f, pytest.raises(CommandError, match=r"status 3(.|\n)*oops"), \
            stream([sys.executable, "-c", "import sys; sys.stderr.write('oops'); "
                    "sys.exit(3)"], stdin=f.fileno(), timeout=30) as out:
        out.read()
    started = time.monotonic()
    with src.open("rb") as f, pytest.raises(CommandError, match="timed out"), \
            stream(["sleep", "30"], stdin=f.fileno(), timeout=0.5) as out:
        out.read()
    assert time.monotonic() - started < 10
