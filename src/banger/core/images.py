"""Images: list them, pull one from an OCI registry, import one from an archive or an OCI
layout (`banger image pull|import|list`). The work is the image port's (skopeo, the layer
application, the root disk); this module checks the request and names the image."""

from __future__ import annotations

from collections.abc import Callable

from banger.core.context import VMContext
from banger.model.errors import InvalidRequest, NotFoundError
from banger.model.images import IMAGE_NAME_RULE, image_name_from_ref, valid_image_name
from banger.ports import ImageRecord


def list_images(ctx: VMContext) -> list[ImageRecord]:
    return ctx.host.images.records()


def show_image(ctx: VMContext, name: str) -> ImageRecord:
    found = ctx.host.images.describe(name)
    if found is None:
        raise NotFoundError(f"no image {name!r}; known: {', '.join(ctx.host.images.known())}")
    return found


def pull_image(ctx: VMContext, ref: str, name: str | None, *, archive: bool,
               on_progress: Callable[[str], None]) -> ImageRecord:
    """``ref``: a registry reference (pull) or, with ``archive``, a path on the daemon's
    host (import: a docker save / OCI archive, or an OCI layout directory)."""
    if not ref or "\0" in ref or len(ref) > 4096:
        raise InvalidRequest("an image reference or path is required")
    if archive and not ref.startswith("/"):
        raise InvalidRequest(f"{ref!r}: an import names an absolute path")
    name = name or image_name_from_ref(ref)
    if not valid_image_name(name):
        raise InvalidRequest(f"image name {name!r}: {IMAGE_NAME_RULE}")
    return ctx.host.images.pull(ref, name, archive=archive, on_progress=on_progress)
