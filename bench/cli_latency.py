"""How long the CLI takes to answer, against the floor for a click CLI: the CLI's own
interpreter running `import click` and nothing else. Timed interleaved in one run
(floor, `banger --version`, `banger --help`, `banger vm list` to a pipe and to a
terminal, round after round) and reported as medians and ratios to the floor, with the
targets of issue 9: --version within 1.5x the floor, vm list (a real bangerd running,
3 VMs) within 3x. To a pipe (scripts, loops) vm list prints its table without rich; on a
terminal (list_tty: a pty, no target) rich draws it.

The VMs are created with --no-start (no boot needed) in a throwaway BANGER_HOME, whose
bangerd the first command autostarts; everything started is stopped at the end.

    uv run python bench/cli_latency.py [--rounds 21]

Writes JSON to stdout and bench/results/cli_latency.json.
"""

from __future__ import annotations

import argparse
import os
import pty
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchlib import remove_home, throwaway_home, write_result

IMAGES = Path(os.environ.get("BANGER_IMAGES_DIR",
                             Path.home() / ".cache" / "banger-test" / "images"))
BANGER = Path(sys.executable).parent / "banger"  # the installed console script
HEAVY = ("pydantic", "httpx", "rich")
TARGETS = {"version": 1.5, "list": 3.0}


def timed(argv: list[str], env: dict[str, str], *, tty: bool = False) -> float:
    """Wall time of one run; with ``tty``, stdout is a terminal (a pty), where rich
    draws the table."""
    master, slave = pty.openpty() if tty else (-1, -1)
    try:
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=slave if tty else subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, cwd="/", check=True)
        return time.perf_counter() - t0
    finally:
        if tty:
            os.close(master)
            os.close(slave)


def heavy_loaded(argv: list[str], env: dict[str, str]) -> list[str]:
    """Which of pydantic, httpx and rich the command imports (python -X importtime)."""
    r = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, cwd="/",
                       capture_output=True, text=True, check=True)
    mods = {line.rsplit("|", 1)[-1].strip().split(".")[0]
            for line in r.stderr.splitlines() if line.startswith("import time:")}
    return sorted(m for m in HEAVY if m in mods)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    home, env = throwaway_home("bgl-", IMAGES)
    commands = {
        "floor": [sys.executable, "-c", "import click"],
        "version": [sys.executable, str(BANGER), "--version"],
        "help": [sys.executable, str(BANGER), "--help"],
        "list": [sys.executable, str(BANGER), "vm", "list"],
        "list_tty": [sys.executable, str(BANGER), "vm", "list"],
    }
    try:
        for i in range(3):
            subprocess.run([sys.executable, str(BANGER), "vm", "create", "--no-start",
                            "--name", f"bench{i}"], env=env, cwd="/", check=True,
                           capture_output=True, timeout=300)
        listed = subprocess.run(commands["list"], env=env, cwd="/", check=True,
                                capture_output=True, text=True).stdout
        assert all(f"bench{i}" in listed for i in range(3)), listed
        times: dict[str, list[float]] = {k: [] for k in commands}
        for name, argv in commands.items():  # warm the page cache: not measured
            timed(argv, env, tty=name == "list_tty")
        for _ in range(args.rounds):
            for name, argv in commands.items():
                times[name].append(timed(argv, env, tty=name == "list_tty"))
        loads = {k: heavy_loaded(argv, env) for k, argv in commands.items()
                 if k not in ("floor", "list_tty")}
    finally:
        remove_home(home)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: med[k] / med["floor"] for k in commands if k != "floor"}
    result = {
        "rounds": args.rounds,
        "vms": 3,
        "command": f"{sys.executable} {BANGER} ...",
        "median_ms": {k: round(v * 1000, 1) for k, v in med.items()},
        "ratio_to_floor": {k: round(v, 2) for k, v in ratio.items()},
        "targets": TARGETS,
        "within_target": {k: ratio[k] <= t for k, t in TARGETS.items()},
        "heavy_modules_loaded": loads,
    }
    write_result("cli_latency", result)


if __name__ == "__main__":
    main()
