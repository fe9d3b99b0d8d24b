"""`banger vm exec box -- true` on a running VM against `banger --version`, timed
interleaved in one run and reported as medians, with issue 10's target: exec at most
0.1 s above --version (the agent's round trip itself is 8-17 ms here). Also timed:
`vm exec` of `cat` with 1 MiB on stdin, and of `head -c 8M /dev/zero` (throughput).

A VM is started (`vm run -d`) in a throwaway BANGER_HOME, whose bangerd the first
command autostarts; one warm-up exec is not measured (the daemon's agent connection is
the one the boot opened, so there is nothing to warm but the page cache). Everything
started is stopped at the end.

    uv run python bench/vm_exec.py [--rounds 21]

Writes JSON to stdout and bench/results/vm_exec.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import remove_home, throwaway_home, write_result

IMAGES = Path(os.environ.get("BANGER_IMAGES_DIR",
                             Path.home() / ".cache" / "banger-test" / "images"))
BANGER = Path(sys.executable).parent / "banger"
TARGET_ABOVE_VERSION = 0.1  # seconds
STDIN = b"x" * (1 << 20)


def timed(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, input=stdin, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, cwd="/", check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    home, env = throwaway_home("bgx-", IMAGES)
    banger = [sys.executable, str(BANGER)]
    commands: dict[str, tuple[list[str], bytes]] = {
        "version": ([*banger, "--version"], b""),
        "exec_true": ([*banger, "vm", "exec", "box", "--", "true"], b""),
        "exec_cat_1MiB": ([*banger, "vm", "exec", "box", "--", "cat"], STDIN),
        "exec_out_8MiB": ([*banger, "vm", "exec", "box", "--", "head", "-c", "8388608",
                           "/dev/zero"], b""),
    }
    try:
        subprocess.run([*banger, "vm", "run", "-d", "--name", "box"], env=env, cwd="/",
                       check=True, capture_output=True, timeout=600)
        times: dict[str, list[float]] = {k: [] for k in commands}
        for argv, stdin in commands.values():  # warm-up: not measured
            timed(argv, env, stdin)
        for _ in range(args.rounds):
            for name, (argv, stdin) in commands.items():
                times[name].append(timed(argv, env, stdin))
    finally:
        remove_home(home)
    med = {k: statistics.median(v) for k, v in times.items()}
    above = med["exec_true"] - med["version"]
    result = {
        "rounds": args.rounds,
        "command": f"{sys.executable} {BANGER} vm exec box -- true",
        "median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "exec_true_above_version_ms": round(above * 1000, 1),
        "target_above_version_ms": TARGET_ABOVE_VERSION * 1000,
        "within_target": above <= TARGET_ABOVE_VERSION,
        "out_8MiB_mib_per_s": round(8 / med["exec_out_8MiB"], 1),
    }
    write_result("vm_exec", result)


if __name__ == "__main__":
    main()
