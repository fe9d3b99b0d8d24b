"""The shell programs banger runs in a guest, kept as files in guest/sh/ beside the other
guest files (banger-init, banger-poweroff, banger-bootstrap) and read as package data.

Each program runs as the argv ``sh -c '<program>' <name> <arg>...`` through the guest
agent (no shell on the host, none parsing the arguments in the guest): they reach the
program as "$1", "$2"...
"""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def program(name: str) -> str:
    """The text of the guest program ``name`` (a file in banger/host/guest/sh/)."""
    return (resources.files("banger.host") / "guest" / "sh" / name).read_text()


def argv(name: str, *args: str) -> list[str]:
    """The argv that runs the guest program ``name`` with ``args``."""
    return ["sh", "-c", program(name), name, *args]
