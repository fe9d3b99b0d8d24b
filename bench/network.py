"""What tap networking costs: `banger vm run --rm -- true` in user mode against tap mode
(with and without --nat), interleaved in one run, inside a throwaway network namespace
(root only: the bridge, taps and rules exist only there). Also times the host-side
network stages alone (bridge, tap, NAT rules and their teardown) from the op log.

    uv run python bench/network.py [--runs 3]

Writes JSON (medians, ratios against user mode) to stdout and bench/results/network.json.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import kill_banger_processes, write_result

IMAGES = Path(os.environ.get("BANGER_IMAGES_DIR",
                             Path.home() / ".cache" / "banger-test" / "images"))
MODES = {"user": ["--network", "user"], "tap": ["--network", "tap"],
         "tap_nat": ["--network", "tap", "--nat"]}


def run(ns: str, env: dict[str, str], flags: list[str]) -> tuple[float, dict[str, float]]:
    started = time.monotonic()
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "banger.cli.main",
                           "vm", "run", "--rm", *flags, "--", "true"],
                          env=env, check=True, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    stages: dict[str, float] = {}
    for line in proc.stderr.splitlines():  # "✓ tap (0.01s)"
        parts = line.split()
        if len(parts) == 3 and parts[0] == "✓" and parts[2].startswith("("):
            stages[parts[1]] = float(parts[2].strip("()s"))
    return elapsed, stages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/network.py needs root (a network namespace with a bridge in it)")
    ns = f"bgbench-{secrets.token_hex(3)}"
    home = Path(tempfile.mkdtemp(prefix="bgn-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
    env.update(BANGER_HOME=str(home), BANGER_IMAGES_DIR=str(IMAGES))
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        run(ns, env, MODES["tap"][:2])  # daemon start, KVM probe, bridge: not measured
        totals: dict[str, list[float]] = {m: [] for m in MODES}
        net_stages: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.runs):
            for mode, flags in MODES.items():
                elapsed, stages = run(ns, env, flags)
                totals[mode].append(elapsed)
                net_stages[mode].append(sum(stages.get(s, 0.0) for s in (
                    "bridge", "tap", "prepare_host_features", "port_forward")))
        med = {m: statistics.median(v) for m, v in totals.items()}
        result = {
            "runs": args.runs,
            "median_s": {m: round(v, 2) for m, v in med.items()},
            "all_s": {m: [round(x, 2) for x in v] for m, v in totals.items()},
            "network_stages_median_s": {m: round(statistics.median(v), 3)
                                        for m, v in net_stages.items()},
            "ratio_vs_user": {m: round(v / med["user"], 3) for m, v in med.items()},
        }
    finally:
        kill_banger_processes(home, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(home, ignore_errors=True)
    write_result("network", result)


if __name__ == "__main__":
    main()
