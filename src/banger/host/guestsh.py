"""The shell programs banger runs in a guest over ssh, kept as files in guest/sh/ beside
the other guest files (banger-init, banger-poweroff, banger-bootstrap) and read as
package data.

ssh hands its command line to the guest user's login shell. Each program goes there as
``sh -c '<program>' <name> <arg>...``, every word quoted, so arguments reach the program
as "$1", "$2"... and nothing a path or URL holds is parsed by a shell.
"""

from __future__ import annotations

import functools
import shlex
from importlib import resources


@functools.cache
def program(name: str) -> str:
    """The text of the guest program ``name`` (a file in banger/host/guest/sh/)."""
    return (resources.files("banger.host") / "guest" / "sh" / name).read_text()


def command(name: str, *args: str) -> str:
    """The ssh command line that runs the guest program ``name`` with ``args``."""
    return shlex.join(["sh", "-c", program(name), name, *args])
