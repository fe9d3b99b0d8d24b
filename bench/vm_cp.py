"""`banger vm cp -r` of a 200 MB directory (200 files of 1 MiB random bytes) into a
running VM and back, against `scp -r` to the same VM, timed interleaved in one run and
reported as medians, with issue 10's target: cp at least as fast as scp, each way. Every
copy out is checked byte for byte against the source.

A VM is started (`vm run -d`) in a throwaway BANGER_HOME, whose bangerd the first command
autostarts; scp uses the same ssh target as `banger vm ssh` (the daemon's key, known
hosts and forwarded port; scp's -P for ssh's -p). The guest's copies are removed between
rounds (`vm exec -- rm -rf`, not timed). Everything started is stopped at the end.

    uv run python bench/vm_cp.py [--rounds 5] [--files 200] [--file-mib 1]

Writes JSON to stdout and bench/results/vm_cp.json.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import remove_home, throwaway_home, write_result

from banger.client.client import Client

IMAGES = Path(os.environ.get("BANGER_IMAGES_DIR",
                             Path.home() / ".cache" / "banger-test" / "images"))
BANGER = Path(sys.executable).parent / "banger"


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, cwd="/", timeout=1800)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv} failed: {proc.stderr.decode(errors='replace')}")
    return took


def same_tree(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def scp_base(client: Client) -> tuple[list[str], str]:
    """scp's options from the ssh argv `banger vm ssh` runs, and the user@host."""
    target = client.ssh_target("box")
    argv = list(target.argv)
    dest = argv.pop()
    opts = ["-P" if a == "-p" else a for a in argv[1:]]
    return ["scp", "-r", "-q", *opts], dest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--file-mib", type=int, default=1)
    args = ap.parse_args()
    home, env = throwaway_home("bgc-", IMAGES)
    work = Path(tempfile.mkdtemp(prefix="bgc-data-"))
    src = work / "data"
    src.mkdir()
    for i in range(args.files):
        (src / f"f{i:04d}").write_bytes(os.urandom(args.file_mib << 20))
    total_mib = args.files * args.file_mib
    banger = [sys.executable, str(BANGER)]
    times: dict[str, list[float]] = {"cp_in": [], "scp_in": [], "cp_out": [], "scp_out": []}
    identical = True
    try:
        subprocess.run([*banger, "vm", "run", "-d", "--name", "box", "--disk-size", "4G"],
                       env=env, cwd="/", check=True, capture_output=True, timeout=600)
        scp, dest = scp_base(Client(home / "run" / "bangerd.sock"))
        clean = [*banger, "vm", "exec", "box", "--", "rm", "-rf", "/root/cp", "/root/scp"]
        for r in range(args.rounds + 1):  # round 0 warms up: not measured
            timed(clean, env)
            for d in ("cp_out", "scp_out"):
                shutil.rmtree(work / d, ignore_errors=True)
            took = {
                "cp_in": timed([*banger, "vm", "cp", "-r", str(src), "box:/root/cp"], env),
                "scp_in": timed([*scp, str(src), f"{dest}:/root/scp"], env),
                "cp_out": timed([*banger, "vm", "cp", "-r", "box:/root/cp",
                                 str(work / "cp_out")], env),
                "scp_out": timed([*scp, f"{dest}:/root/scp", str(work / "scp_out")], env),
            }
            identical &= same_tree(src, work / "cp_out") and same_tree(src, work / "scp_out")
            if r:
                for k, v in took.items():
                    times[k].append(v)
            print(f"round {r}: " + ", ".join(f"{k} {v:.2f}s" for k, v in took.items()),
                  file=sys.stderr)
    finally:
        remove_home(home)
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "rounds": args.rounds,
        "tree": f"{args.files} files of {args.file_mib} MiB ({total_mib} MiB)",
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "mib_per_s": {k: round(total_mib / v, 1) for k, v in med.items()},
        "cp_over_scp": {"in": round(med["cp_in"] / med["scp_in"], 2),
                        "out": round(med["cp_out"] / med["scp_out"], 2)},
        "bytes_identical": identical,
        "within_target": med["cp_in"] <= med["scp_in"] and med["cp_out"] <= med["scp_out"],
    }
    write_result("vm_cp", result)


if __name__ == "__main__":
    main()
