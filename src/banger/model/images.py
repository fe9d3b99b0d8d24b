"""What an OCI image's name may be, and the name a pull gives when none is asked for."""

from __future__ import annotations

import re

IMAGE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
IMAGE_NAME_RULE = ("1-63 characters of a-z, 0-9, '.', '_' and '-', starting with a letter "
                   "or digit")
_NAME = re.compile(IMAGE_NAME_PATTERN)


def valid_image_name(name: str) -> bool:
    return bool(_NAME.match(name))


def image_name_from_ref(ref: str) -> str:
    """``docker.io/library/python:3.12-slim`` -> ``python-3.12-slim``; a path's last part
    for an archive (``./app.tar`` -> ``app``)."""
    ref = ref.removeprefix("docker://").split("@", 1)[0].rstrip("/")
    last = ref.rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        last = last.removesuffix(ext)
    name = re.sub(r"[^a-z0-9._-]+", "-", last.replace(":", "-").lower()).strip("-._")
    return name[:63].rstrip("-._") or "image"
