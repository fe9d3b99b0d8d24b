"""What every benchmark here does the same way: write its JSON, and stop what it started."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def write_result(name: str, result: dict[str, Any]) -> None:
    """Print ``result`` as JSON and keep it as bench/results/<name>.json."""
    out = json.dumps(result, indent=2)
    print(out)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(out + "\n")


def kill_banger_processes(home: Path, sig: int = signal.SIGTERM) -> None:
    """Signal every process started with BANGER_HOME=``home`` (the daemon, its VMs)."""
    marker = f"BANGER_HOME={home}".encode()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and marker in (d / "environ").read_bytes():
                os.kill(int(d.name), sig)
        except OSError:
            pass


def throwaway_home(prefix: str, images: Path) -> tuple[Path, dict[str, str]]:
    """A BANGER_HOME of its own under /tmp (short: socket paths), and the environment
    that points banger at it and at the prebuilt ``images``."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BANGER_")}
    env.update(BANGER_HOME=str(home), BANGER_IMAGES_DIR=str(images))
    return home, env


def remove_home(home: Path) -> None:
    """Stop everything started under ``home`` (TERM, then KILL a second later), then
    delete it."""
    kill_banger_processes(home, signal.SIGTERM)
    time.sleep(1)
    kill_banger_processes(home, signal.SIGKILL)
    shutil.rmtree(home, ignore_errors=True)
