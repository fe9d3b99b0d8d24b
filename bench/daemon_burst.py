"""Whether reads wait behind boots: the latency of `GET /v1/vms` (what `banger vm list`
asks) on an idle daemon against the same request while a burst of real VMs boots
(`banger vm run --rm -- true`, started together), in one run. Also how long the burst took
and whether every run succeeded.

    uv run python bench/daemon_burst.py [--vms 4] [--probes 40]

Writes JSON (medians, p95, the ratio burst/idle) to stdout and
bench/results/daemon_burst.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from benchlib import kill_banger_processes, write_result

from banger.model.layout import Layout

IMAGES = Path(os.environ.get("BANGER_IMAGES_DIR",
                             Path.home() / ".cache" / "banger-test" / "images"))


def banger(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "banger.cli.main", *args], env=env,
                          capture_output=True, text=True, cwd="/", timeout=900)


def probe(http: httpx.Client, n: int, pause: float) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        http.get("/v1/vms").raise_for_status()
        out.append(time.perf_counter() - t0)
        time.sleep(pause)
    return out


def p95(xs: list[float]) -> float:
    return sorted(xs)[max(0, round(0.95 * len(xs)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--probes", type=int, default=40)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bgb-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
    env.update(BANGER_HOME=str(home), BANGER_IMAGES_DIR=str(IMAGES))
    try:
        banger(env, "vm", "run", "--rm", "--", "true").check_returncode()  # warm: not measured
        sock = Layout.for_user(env).daemon_socket
        http = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)),
                            base_url="http://bangerd", timeout=30)
        idle = probe(http, args.probes, 0.05)
        results: list[int] = []

        def one(i: int) -> None:
            results.append(banger(env, "vm", "run", "--rm", "--name", f"burst{i}", "--",
                                  "true").returncode)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.vms)]
        began = time.monotonic()
        for t in threads:
            t.start()
        time.sleep(1.0)  # the boots are in flight
        during: list[float] = []
        while any(t.is_alive() for t in threads):
            during += probe(http, 1, 0.1)
        burst_s = time.monotonic() - began
        for t in threads:
            t.join()
        med_idle, med_burst = statistics.median(idle), statistics.median(during)
        result = {
            "vms": args.vms,
            "all_ok": results == [0] * args.vms,
            "burst_s": round(burst_s, 2),
            "list_idle_median_ms": round(med_idle * 1000, 2),
            "list_idle_p95_ms": round(p95(idle) * 1000, 2),
            "list_during_burst_median_ms": round(med_burst * 1000, 2),
            "list_during_burst_p95_ms": round(p95(during) * 1000, 2),
            "list_during_burst_max_ms": round(max(during) * 1000, 2),
            "probes_during_burst": len(during),
            "ratio_burst_vs_idle": round(med_burst / med_idle, 2),
        }
    finally:
        kill_banger_processes(home, signal.SIGTERM)
        time.sleep(1)
        kill_banger_processes(home, signal.SIGKILL)
        shutil.rmtree(home, ignore_errors=True)
    write_result("daemon_burst", result)


if __name__ == "__main__":
    main()
