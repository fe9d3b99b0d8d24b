"""Test images made locally: OCI layout directories written from tar layers (no network),
handed to skopeo like any other source or pushed into a registry on loopback (Debian's
docker-registry, its storage in a temp dir, on 127.0.0.1 at a free port)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import socket
import subprocess
import tarfile
import time
import urllib.request
from pathlib import Path

BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: runs with no libc


def tar_layer(entries: list[tuple[str, str, bytes | str, int]]) -> bytes:
    """(name, kind: file|dir|sym|hard, data or link target, mode) -> an uncompressed tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 1_700_000_000
            if kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind in ("sym", "hard"):
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = str(payload)
            else:
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            tar.addfile(info)
    return buf.getvalue()


def busybox_layer() -> bytes:
    """A rootfs with only a static busybox: /bin/busybox and /bin/sh, no libc."""
    return tar_layer([("bin", "dir", b"", 0o755),
                      ("bin/busybox", "file", BUSYBOX.read_bytes(), 0o755),
                      ("bin/sh", "sym", "busybox", 0o777),
                      ("bin/cat", "sym", "busybox", 0o777),
                      ("bin/ls", "sym", "busybox", 0o777),
                      ("etc", "dir", b"", 0o755),
                      ("etc/motd", "file", b"from the busybox layer\n", 0o644)])


def write_layout(dest: Path, layers: list[bytes], *, tag: str = "latest",
                 env: list[str] | None = None, workdir: str = "",
                 cmd: list[str] | None = None) -> Path:
    """An OCI image layout at ``dest`` holding one image made of ``layers`` (gzipped)."""
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest, len(data)

    layer_descs, diff_ids = [], []
    for raw in layers:
        diff_ids.append("sha256:" + hashlib.sha256(raw).hexdigest())
        d, n = put(gzip.compress(raw, compresslevel=1, mtime=0))
        layer_descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": d, "size": n})
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": env or ["PATH=/usr/local/bin:/usr/bin:/bin"],
                         "WorkingDir": workdir, "Cmd": cmd or ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cd, cn = put(json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": cd, "size": cn},
                "layers": layer_descs}
    md, mn = put(json.dumps(manifest).encode())
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": md, "size": mn,
                       "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return dest


class Registry:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = root / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n"
                          f"    rootdirectory: {root / 'data'}\n"
                          f"http:\n  addr: 127.0.0.1:{self.port}\n")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/v2/", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise AssertionError("docker-registry did not start") from None
                time.sleep(0.1)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def push(self, layers: list[bytes], repo: str, tmp: Path, **config: object) -> str:
        layout = write_layout(tmp / repo, layers, **config)  # type: ignore[arg-type]
        ref = f"{self.host}/{repo}:1"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{layout}:latest", f"docker://{ref}"], check=True, timeout=120)
        return ref

    def blob(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return (self.root / "data" / "docker" / "registry" / "v2" / "blobs" / "sha256"
                / hexd[:2] / hexd / "data")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
