"""OCI images fetched with skopeo into one shared OCI layout, and read back from it.

``skopeo copy`` (Debian's, no registry client of banger's own) brings a registry image or
an archive (``docker save`` tar, OCI archive, OCI layout directory) into the layout under
banger's state directory: blobs are stored once by digest and shared by every image, and
skopeo verifies them as it copies. Reading back walks index -> manifest (the linux/amd64
one of a manifest list) -> config -> layers, and checks every blob again (the cache is a
directory anyone with the user's rights could have touched): the index, manifest and config
here, a layer's size here and its sha256 as it is applied (host/ocilayers.py, one read). TLS is
verified except for registries on loopback (the tests' local registry).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from banger.host.runner import CommandError, run

MAX_JSON = 4 << 20  # an index, manifest or config
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
PLATFORM = ("linux", "amd64")
TRANSPORTS = ("docker://", "docker-archive:", "oci-archive:", "oci:")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
COPY_TIMEOUT = 3600


class OciError(Exception):
    """An image could not be fetched or read; the message says which and why."""


@dataclass(frozen=True)
class Layer:
    digest: str
    media_type: str
    size: int


@dataclass(frozen=True)
class ImageConfig:
    """What a container user expects from the image's config."""

    env: tuple[str, ...] = ()
    working_dir: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"env": list(self.env), "working_dir": self.working_dir,
                "entrypoint": list(self.entrypoint), "cmd": list(self.cmd), "user": self.user}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageConfig:
        return cls(env=tuple(d.get("env", ())), working_dir=str(d.get("working_dir", "")),
                   entrypoint=tuple(d.get("entrypoint", ())), cmd=tuple(d.get("cmd", ())),
                   user=str(d.get("user", "")))


@dataclass(frozen=True)
class Image:
    manifest_digest: str
    config_digest: str
    layers: tuple[Layer, ...]
    config: ImageConfig = field(default_factory=ImageConfig)


def is_loopback_ref(ref: str) -> bool:
    """True when a registry reference names a registry on this machine's loopback."""
    host = ref.split("/", 1)[0] if "/" in ref else ""
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def source(ref_or_path: str, *, archive: bool) -> tuple[str, list[str]]:
    """skopeo's source argument and options for a registry ref or a local path."""
    if archive:
        if ref_or_path.startswith(TRANSPORTS[1:]):
            return ref_or_path, []
        p = Path(ref_or_path)
        if ":" in str(p.absolute()):
            # skopeo splits "oci:PATH:TAG" at the colon: the path would be cut short.
            raise OciError(f"{p.absolute()}: a path with ':' in it cannot be imported "
                           "(skopeo reads what follows the ':' as a tag); rename it or "
                           "copy it to a path without ':'")
        if p.is_dir():
            return f"oci:{p.absolute()}", []
        if not p.is_file():
            raise OciError(f"{ref_or_path}: no such file or directory")
        # A docker save tar has manifest.json at its top; an OCI archive has index.json.
        kind = "docker-archive" if _tar_has(p, "manifest.json") else "oci-archive"
        return f"{kind}:{p.absolute()}", []
    ref = ref_or_path.removeprefix("docker://")
    if not ref or ref.startswith(("-", "/")) or any(c.isspace() for c in ref):
        raise OciError(f"{ref_or_path!r} is not an image reference")
    opts = ["--src-tls-verify=false"] if is_loopback_ref(ref) else []
    return f"docker://{ref}", opts


def copy(src: str, opts: list[str], layout: Path, tag: str) -> None:
    """skopeo copy of one image (this host's platform) into the shared layout."""
    if not _TAG.match(tag):
        raise OciError(f"{tag!r} cannot be a tag in the layout")
    layout.mkdir(parents=True, exist_ok=True)
    argv = ["skopeo", "--override-os", PLATFORM[0], "--override-arch", PLATFORM[1], "copy",
            "--quiet", "--retry-times", "2", *opts, src, f"oci:{layout}:{tag}"]
    try:
        run(argv, timeout=COPY_TIMEOUT)
    except CommandError as exc:
        raise OciError(f"skopeo could not copy {src}: {exc}") from exc


def read(layout: Path, tag: str) -> Image:
    """The image tagged ``tag`` in the layout, every blob checked."""
    index = _json(layout / "index.json", "the layout's index.json")
    found = [m for m in index.get("manifests", ())
             if isinstance(m, dict)
             and m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if not found:
        raise OciError(f"no image tagged {tag!r} in {layout}")
    desc = found[-1]
    seen = 0
    while str(desc.get("mediaType")) in INDEX_TYPES:
        seen += 1
        if seen > 4:
            raise OciError("manifest lists nested too deep")
        desc = _platform(_blob_json(layout, desc, "manifest list"))
    manifest = _blob_json(layout, desc, "manifest")
    cdesc = manifest.get("config")
    if not isinstance(cdesc, dict):
        raise OciError(f"manifest {desc.get('digest')} has no config")
    config = _blob_json(layout, cdesc, "config")
    layers = []
    for ld in manifest.get("layers", ()):
        layer = Layer(str(ld.get("digest")), str(ld.get("mediaType", "")), int(ld.get("size", -1)))
        _check_size(layout, layer)  # its digest is checked as it is applied (one read)
        layers.append(layer)
    return Image(manifest_digest=str(desc["digest"]), config_digest=str(cdesc["digest"]),
                 layers=tuple(layers), config=parse_config(config))


def parse_config(config: dict[str, Any]) -> ImageConfig:
    c = config.get("config") or {}
    if not isinstance(c, dict):
        raise OciError("the image config's 'config' is not an object")

    def strs(key: str) -> tuple[str, ...]:
        v = c.get(key) or []
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise OciError(f"the image config's {key} is not a list of strings")
        return tuple(v)

    env = strs("Env")
    for e in env:
        if "=" not in e or "\0" in e:
            raise OciError(f"the image config's Env has {e[:80]!r}, not NAME=VALUE")
    return ImageConfig(env=env, working_dir=str(c.get("WorkingDir") or ""),
                       entrypoint=strs("Entrypoint"), cmd=strs("Cmd"),
                       user=str(c.get("User") or ""))


def blob_path(layout: Path, digest: str) -> Path:
    if not _DIGEST.match(digest):
        raise OciError(f"unsupported or malformed digest {digest[:80]!r}")
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def verify_blob(layout: Path, digest: str, size: int, what: str) -> Path:
    path = blob_path(layout, digest)
    h = hashlib.sha256()
    n = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
    except OSError as exc:
        raise OciError(f"{what} {digest}: missing from the cache ({exc.strerror})") from exc
    if n != size or "sha256:" + h.hexdigest() != digest:
        drop_blob(path)
        raise OciError(f"{what} {digest}: the cached blob does not match its digest "
                       f"({n} bytes, sha256:{h.hexdigest()}): removed from the cache, "
                       "pull again")
    return path


def drop_blob(path: Path) -> None:
    """Remove a damaged blob (the caller holds the layout's lock): skopeo would reuse it
    on every later pull; without it, the next pull fetches it again."""
    path.unlink(missing_ok=True)


def _check_size(layout: Path, layer: Layer) -> None:
    try:
        size = blob_path(layout, layer.digest).stat().st_size
    except OSError as exc:
        raise OciError(f"layer {layer.digest}: missing from the cache ({exc.strerror})"
                       ) from exc
    if size != layer.size:
        drop_blob(blob_path(layout, layer.digest))
        raise OciError(f"layer {layer.digest}: {size} bytes in the cache, the manifest says "
                       f"{layer.size}: removed from the cache, pull again")


def _platform(index: dict[str, Any]) -> dict[str, Any]:
    for m in index.get("manifests", ()):
        p = m.get("platform") or {}
        if (p.get("os"), p.get("architecture")) == PLATFORM:
            return dict(m)
    raise OciError(f"the manifest list has no {'/'.join(PLATFORM)} image")


def _blob_json(layout: Path, desc: dict[str, Any], what: str) -> dict[str, Any]:
    size = int(desc.get("size", -1))
    if not 0 <= size <= MAX_JSON:
        raise OciError(f"{what} {desc.get('digest')}: size {size} out of bounds")
    return _json(verify_blob(layout, str(desc.get("digest")), size, what), what)


def _json(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise OciError(f"{what} is over {MAX_JSON} bytes")
        doc = json.loads(data)
    except (OSError, ValueError) as exc:
        raise OciError(f"{what} unreadable: {exc}") from exc
    if not isinstance(doc, dict):
        raise OciError(f"{what} is not a JSON object")
    return doc


def _tar_has(path: Path, name: str) -> bool:
    import tarfile
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for i, m in enumerate(tar):
                if m.name.lstrip("./") == name:
                    return True
                if i > 10_000:
                    break
    except (tarfile.TarError, OSError):
        return False
    return False
