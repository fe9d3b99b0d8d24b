"""FILE_PUT and FILE_GET throughput of the real banger-agent, on this host, over a Unix
socketpair (the agent in its ``--fd`` test mode): the protocol, the agent's tar reader
and writer and the host's flow control, without a VM's transport.

    uv run python bench/agent_files.py [--mib 200] [--files 2000] [--runs 3]

The tree: ``--files`` files summing to ``--mib`` MiB (random bytes, a few large files and
many small ones, in nested directories). put: a tar made by Python's tarfile (streamed
from a pipe, like ``vm cp -``) into a fresh directory. get: the agent's tar of that
directory, read by the host and thrown away. Caches are warm. Medians of ``--runs`` runs,
in MB/s (10^6 bytes of file content per second). Writes JSON to stdout and
bench/results/agent_files.json.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from benchlib import write_result

from banger.host.agent_client import AgentConnection
from banger.host.agentbin import ensure_agent


def make_tree(root: Path, n_files: int, total_mib: int) -> int:
    rng = random.Random(7)
    total = total_mib << 20
    big = total * 3 // 4 // 4  # four big files hold three quarters
    sizes = [big] * 4 + [max(1, (total - 4 * big) // max(1, n_files - 4))] * (n_files - 4)
    for i, size in enumerate(sizes):
        path = root / f"d{i % 17}" / f"e{i % 5}" / f"file{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(size))
    return sum(sizes)


def tar_stream(top: Path) -> Iterator[bytes]:
    """tarfile writing into a pipe in a thread; the chunks as they come."""
    r, w = os.pipe()

    def write() -> None:
        with os.fdopen(w, "wb") as out, tarfile.open(fileobj=out, mode="w|",
                                                     format=tarfile.PAX_FORMAT) as tf:
            tf.add(top, arcname="tree")

    t = threading.Thread(target=write)
    t.start()
    with os.fdopen(r, "rb") as src:
        while data := src.read(1 << 18):
            yield data
    t.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=200)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    binary = ensure_agent(Path.home() / ".cache" / "banger-test")
    work = Path(tempfile.mkdtemp(prefix="bench-agent-files-"))
    try:
        size = make_tree(work / "src", args.files, args.mib)
        host, guest = socket.socketpair()
        proc = subprocess.Popen([str(binary), "--fd", str(guest.fileno())],
                                pass_fds=[guest.fileno()])
        guest.close()
        put_s: list[float] = []
        get_s: list[float] = []
        with AgentConnection(host, name="bench") as conn:
            conn.wait_hello(10)
            for run in range(args.runs):
                dest = work / f"dest{run}"
                start = time.monotonic()
                conn.put_tar(str(dest), tar_stream(work / "src"), timeout=60)
                put_s.append(time.monotonic() - start)
                start = time.monotonic()
                got = sum(len(c) for c in conn.get_tar(str(dest / "tree"), timeout=60))
                get_s.append(time.monotonic() - start)
                assert got > size, "the tar holds every byte"
                shutil.rmtree(dest)
        proc.wait(10)
        write_result("agent_files", {
            "bytes": size, "files": args.files, "runs": args.runs,
            "put_s": put_s, "get_s": get_s,
            "put_median_s": statistics.median(put_s), "get_median_s": statistics.median(get_s),
            "put_mb_per_s": round(size / 1e6 / statistics.median(put_s), 1),
            "get_mb_per_s": round(size / 1e6 / statistics.median(get_s), 1),
            "transport": "socketpair, agent --fd mode (no VM)",
        })
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
