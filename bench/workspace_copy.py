"""Workspace copy-in: banger's select + stage + work-disk build against
``git archive HEAD | tar -x`` into a local directory, on the same synthetic repo, in one run.

    uv run python bench/workspace_copy.py [--files 10000] [--mib 200] [--runs 3]

The repo is text-like (words from a small vocabulary, so zlib compresses it about as much
as source code) and packed without deltas, like a gc'd repo of unrelated files. Caches are
warm for both sides (the repo is read once before timing). Writes JSON to stdout and
bench/results/workspace_copy.json.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import write_result

from banger.host import disks, repostage, workspace
from banger.host.scratch import Scratch

GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.com",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.com"}


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, env=GIT_ENV,
                   stdout=subprocess.DEVNULL)


def make_repo(root: Path, n_files: int, total_mib: int) -> Path:
    rng = random.Random(1)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz_", k=rng.randint(2, 10)))
             for _ in range(2000)]
    pool = " ".join(rng.choices(words, k=1_200_000)).encode()  # ~7 MB of "source"
    weights = [rng.lognormvariate(0, 1) for _ in range(n_files)]
    scale = (total_mib << 20) / sum(weights)
    repo = root / "repo"
    repo.mkdir()
    for i, w in enumerate(weights):
        size = min(len(pool) - 1, max(1, int(w * scale)))
        d = repo / f"pkg{i % 100:02d}" / f"mod{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        start = rng.randrange(0, len(pool) - size)
        (d / f"file{i:05d}.txt").write_bytes(pool[start:start + size])
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "synthetic")
    git(repo, "repack", "-a", "-d", "-q", "-f", "--window=0")
    git(repo, "prune-packed")
    git(repo, "status", "-s")  # a fresh index, as after normal use
    return repo


def du(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        total += sum(os.lstat(os.path.join(dirpath, n)).st_size for n in names)
    return total


def baseline(repo: Path, work: Path) -> dict[str, float]:
    out = work / "archive"
    out.mkdir()
    t0 = time.perf_counter()
    archive = subprocess.Popen(["git", "-C", str(repo), "archive", "HEAD"],
                               stdout=subprocess.PIPE, env=GIT_ENV)
    subprocess.run(["tar", "-x", "-C", str(out)], stdin=archive.stdout, check=True)
    assert archive.stdout is not None
    archive.stdout.close()
    if archive.wait() != 0:
        raise RuntimeError("git archive failed")
    total = time.perf_counter() - t0
    shutil.rmtree(out)
    return {"total_s": total}


def banger(repo: Path, work: Path, disk_bytes: int, *, tmpfs: bool) -> dict[str, float]:
    """What a VM start would do; ``tmpfs=False`` forces staging on disk next to the image."""
    img = work / "work.ext4"
    t0 = time.perf_counter()
    sel = workspace.select(repo)
    # The daemon stages in its own RAM scratch dir when the checkout fits there.
    ram = Scratch(work / "state").ram() if tmpfs else None
    parent = repostage.staging_parent(sel, work, ram) if tmpfs else work
    t1 = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="bgws-stage-", dir=parent))
    try:
        repostage.stage(sel, scratch / "repo")
        t2 = time.perf_counter()
        disks.build_work_disk(img, disk_bytes, {}, trees={"repo": scratch / "repo"})
        t3 = time.perf_counter()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if ram is not None:
            shutil.rmtree(ram, ignore_errors=True)
    img.unlink()
    return {"total_s": t3 - t0, "select_s": t1 - t0, "stage_s": t2 - t1,
            "work_disk_s": t3 - t2, "staged_on_tmpfs": float(parent != work)}


def clone_only(repo: Path, work: Path) -> dict[str, float]:
    """The history copy inside stage, alone: how much of stage is the .git."""
    t0 = time.perf_counter()
    subprocess.run(["git", "clone", "-q", "--mirror", "--no-hardlinks", str(repo),
                    str(work / "c.git")], check=True, env=GIT_ENV)
    total = time.perf_counter() - t0
    shutil.rmtree(work / "c.git")
    return {"total_s": total}


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    # Same filesystem as a real VM directory: staged tree and disk side by side.
    root = Path(tempfile.mkdtemp(prefix="bgws-", dir="/var/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="bgws-", dir=repostage.TMPFS))
    try:
        t0 = time.perf_counter()
        repo = make_repo(root, args.files, args.mib)
        setup_s = time.perf_counter() - t0
        work = root / "work"
        work.mkdir()
        sel = workspace.select(repo)
        sides: dict[str, Callable[[], dict[str, float]]] = {
            "git_archive_tar": lambda: baseline(repo, work),
            # Context only: the same extraction into tmpfs, where creates cost nothing.
            "git_archive_tar_tmpfs": lambda: baseline(repo, shm),
            "banger": lambda: banger(repo, work, 2 << 30, tmpfs=True),
            "banger_staged_on_disk": lambda: banger(repo, work, 2 << 30, tmpfs=False),
            "clone_mirror_only": lambda: clone_only(repo, work),
        }
        for side in sides.values():  # warm the page cache for everyone alike
            side()
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        for _ in range(args.runs):
            for name, side in sides.items():
                runs[name].append(side())
        med = {k: medians(v) for k, v in runs.items()}
        git_bytes = du(repo / ".git")
        result = {
            "files": len(sel.files), "worktree_bytes": sel.total_bytes,
            "git_dir_bytes": git_bytes, "runs": args.runs, "setup_s": round(setup_s, 1),
            "median": med,
            "ratio_banger_vs_archive": round(
                med["banger"]["total_s"] / med["git_archive_tar"]["total_s"], 2),
            "ratio_banger_staged_on_disk_vs_archive": round(
                med["banger_staged_on_disk"]["total_s"] / med["git_archive_tar"]["total_s"],
                2),
            "raw": runs,
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    write_result("workspace_copy", result)


if __name__ == "__main__":
    main()
