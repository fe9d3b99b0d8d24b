"""`banger image pull|import|list|show`: OCI images from a registry or from a local
archive or layout, next to banger's built-in images.

A pull or import prints its progress (one line per step, on stderr) while the daemon
copies with skopeo, applies the layers and builds the root disk; ``--json`` prints the
image's record on stdout at the end. What a registry or an archive names reaches the
terminal through :func:`banger.cli.safe.printable`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from banger.cli.common import handle_errors

if TYPE_CHECKING:
    from banger.client.types import ImageOut

IMAGE_COLUMNS = ("NAME", "KIND", "BUILT", "SIZE", "SOURCE")


@click.group("image")
def image() -> None:
    """Images VMs boot: banger's built-in ones and OCI images pulled or imported."""


def _progress(quiet: bool) -> Any:
    from banger.cli.safe import printable
    started = time.monotonic()

    def show(message: str) -> None:
        if not quiet:
            sys.stderr.write(f"[{time.monotonic() - started:5.1f}s] "
                             f"{printable(message, one_line=True)}\n")
            sys.stderr.flush()
    return show


def _done(img: ImageOut, as_json: bool) -> None:
    from banger.cli.safe import printable
    if as_json:
        from banger.cli.plain import print_json
        from banger.client.types import as_json as json_of
        print_json(json_of(img))
    else:
        sys.stdout.write(f"image {printable(img.name, one_line=True)} ready "
                         f"({img.size_bytes >> 20} MiB, {img.digest[:19]})\n")


@image.command("pull")
@click.argument("ref")
@click.option("--name", help="the image's name (default: from REF, e.g. python-3.12-slim)")
@click.option("--json", "as_json", is_flag=True, help="print the image's record as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress lines")
@handle_errors
def image_pull(ref: str, name: str | None, as_json: bool, quiet: bool) -> None:
    """Pull REF from an OCI registry (docker.io/library/busybox:1.36; TLS is verified
    except for a registry on loopback) and make a bootable image of it."""
    from banger.client.client import connect
    body: dict[str, Any] = {"ref": ref, **({"name": name} if name else {})}
    _done(connect().pull_image(body, _progress(quiet)), as_json)


@image.command("import")
@click.argument("path", type=click.Path(exists=True, file_okay=True, dir_okay=True))
@click.option("--name", help="the image's name (default: from PATH)")
@click.option("--json", "as_json", is_flag=True, help="print the image's record as JSON")
@click.option("--quiet", "-q", is_flag=True, help="no progress lines")
@handle_errors
def image_import(path: str, name: str | None, as_json: bool, quiet: bool) -> None:
    """Import PATH (a `docker save` tar, an OCI archive or an OCI layout directory) as a
    bootable image."""
    from banger.client.client import connect
    body: dict[str, Any] = {"path": os.path.abspath(path), **({"name": name} if name else {})}
    _done(connect().pull_image(body, _progress(quiet), archive=True), as_json)


@image.command("list")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def image_list(as_json: bool) -> None:
    """List images: built-in and OCI."""
    from banger.cli.plain import plain_table, print_json
    from banger.cli.safe import cell_text
    from banger.client.client import connect
    from banger.client.types import as_json as json_of

    images = connect().images()
    if as_json:
        print_json(json_of(images))
        return
    rows = [[cell_text(x) for x in (i.name, i.kind, "yes" if i.built else "no",
                                    f"{i.size_bytes >> 20} MiB" if i.size_bytes else "-",
                                    i.source)] for i in images]
    sys.stdout.write(plain_table(IMAGE_COLUMNS, rows)
                     or "".join("  ".join(r) + "\n" for r in [list(IMAGE_COLUMNS), *rows]))


@image.command("show")
@click.argument("name")
@handle_errors
def image_show(name: str) -> None:
    """Show one image's record as JSON: source, digest, and its config's Env, WorkingDir,
    Entrypoint, Cmd and User."""
    from banger.cli.plain import print_json
    from banger.client.client import connect
    from banger.client.types import as_json as json_of
    print_json(json_of(connect().image(name)))
