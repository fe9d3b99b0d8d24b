"""The one choke point for external commands.

Every process banger runs on the host goes through :func:`run`: argv lists only (never a
shell string), the argv, exit code and output are logged, and a failure raises
:class:`CommandError` carrying all of them so the message names what failed and why.
"""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandError(Exception):
    """An external command failed (non-zero exit, missing binary, or timeout)."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 reason: str | None = None) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason
        what = reason or f"exited with status {returncode}"
        tail = stderr.strip().splitlines()[-5:] if stderr else []
        detail = ("\n" + "\n".join(tail)) if tail else ""
        super().__init__(f"{shlex.join(self.argv)}: {what}{detail}")


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    input: str | bytes | None = None,
    timeout: float | None = None,
    env: Mapping[str, str | None] | None = None,
    cwd: Path | str | None = None,
) -> Completed:
    """Run ``argv`` to completion and return its output as text.

    ``env`` entries are added to the current environment rather than replacing it; an
    entry of None removes that variable.
    """
    argv = [os.fspath(a) for a in argv]
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        for key, value in env.items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
    data = input.encode() if isinstance(input, str) else input
    log.debug("run: %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            argv,
            input=data,
            capture_output=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, None, "", "", reason=f"command not found: {argv[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, None, _text(exc.stdout), _text(exc.stderr),
                           reason=f"timed out after {timeout} s") from exc
    out = Completed(tuple(argv), proc.returncode, _text(proc.stdout), _text(proc.stderr))
    log.debug("exit %d: %s", proc.returncode, argv[0])
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, out.stdout, out.stderr)
    return out


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode(errors="replace")
