"""Whether `banger vm logs -f` keeps up with a console flood, and what it costs the daemon:
a fake VM's serial log (1 MiB cap, rotated as bangerd does) is written at a steady
rate while the real CLI follows it through a daemon of its own process; counted are the
bytes the CLI printed (against those written), the skips it reported and the daemon's
peak RSS growth. A guest under TCG writes ~0.7 MiB/s to its console here.

    uv run python bench/logs_follow.py [--mib 16] [--rate 4] [--runs 3]

Writes JSON (medians over the runs, and each run) to stdout and
bench/results/logs_follow.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchlib import write_result

ROOT = Path(__file__).resolve().parents[1]
BLOCK = (b"x" * 99 + b"\n") * 1311  # 128 KiB-ish, well under the cap


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def one_run(mib: int, rate: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    env = dict(os.environ, BANGER_HOME=str(tmp / "h"), PYTHONPATH=str(ROOT))
    os.environ["BANGER_HOME"] = env["BANGER_HOME"]
    from banger.client.client import Client, DaemonUnavailable
    from banger.model.layout import Layout

    daemon = subprocess.Popen([sys.executable, "-m", "tests.integration.flood_daemon",
                               str(tmp / "host")], env=env, cwd=ROOT)
    try:
        layout = Layout.for_user()
        client = Client(layout.daemon_socket)
        deadline = time.monotonic() + 60
        while True:
            try:
                client.health()
                break
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client.create({"name": "box"}, lambda _: None)
        log = next(layout.vms_dir.iterdir()) / "serial.log"
        log.write_bytes(b"go\n")
        cli = subprocess.Popen([sys.executable, "-m", "banger.cli.main", "vm", "logs", "-f",
                                "--raw", "box"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
        assert cli.stdout is not None and cli.stderr is not None
        assert cli.stdout.readline() == b"go\n"
        shown = 0

        def drain() -> None:
            nonlocal shown
            assert cli.stdout is not None
            while chunk := cli.stdout.read1(1 << 16):
                shown += len(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        before = _kib(daemon.pid, "VmRSS")
        blocks = mib * (1 << 20) // len(BLOCK)
        pause = len(BLOCK) / (rate * (1 << 20))
        start = time.monotonic()
        with log.open("ab") as f:
            for i in range(blocks):
                f.write(BLOCK)
                f.flush()
                time.sleep(max(0.0, start + (i + 1) * pause - time.monotonic()))
        client.stop("box")
        rc = cli.wait(120)
        reader.join()
        err = cli.stderr.read().decode()
        return {"written_bytes": blocks * len(BLOCK), "shown_bytes": shown,
                "skips": err.count("rotated away"), "exit": rc,
                "daemon_rss_growth_kib": _kib(daemon.pid, "VmHWM") - before}
    finally:
        daemon.terminate()
        daemon.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=16)
    ap.add_argument("--rate", type=float, default=4.0, help="MiB/s written")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    runs = [one_run(args.mib, args.rate) for _ in range(args.runs)]
    result = {
        "rate_mib_s": args.rate, "mib": args.mib,
        "median_shown_ratio": statistics.median(r["shown_bytes"] / r["written_bytes"]
                                                for r in runs),
        "median_skips": statistics.median(r["skips"] for r in runs),
        "median_daemon_rss_growth_kib": statistics.median(r["daemon_rss_growth_kib"]
                                                          for r in runs),
        "runs": runs,
    }
    write_result("logs_follow", result)


if __name__ == "__main__":
    main()
