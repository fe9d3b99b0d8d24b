"""The Debian mirrors an image is bootstrapped from: the machine's own apt configuration
(one-line ``.list`` and deb822 ``.sources`` files) or a mirror given explicitly, and the
apt options carried over to mmdebstrap."""

from __future__ import annotations

from pathlib import Path

from banger.host.runner import CommandError, run

SUITE = "bookworm"


class AptSourcesError(Exception):
    """No usable Debian mirror was found."""


def debian_sources(mirror: str | None = None) -> list[str]:
    """One-line apt sources for the bookworm suites.

    With ``mirror``, just ``bookworm main`` from it; otherwise the machine's own Debian
    entries (main suite, updates, security) as apt is configured.
    """
    if mirror is not None:
        return [f"deb {mirror} {SUITE} main"]
    found: list[str] = []
    apt = Path("/etc/apt")
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for f in files:
        if f.is_file():
            found += parse_one_line_sources(f.read_text())
    for f in sorted((apt / "sources.list.d").glob("*.sources")):
        found += parse_deb822_sources(f.read_text())
    wanted = [s for s in dict.fromkeys(found) if s.split()[2].startswith(SUITE)]
    if not wanted:
        raise AptSourcesError(f"no Debian {SUITE} mirror in the apt configuration under {apt}; "
                         "pass a mirror explicitly")
    return wanted


def parse_one_line_sources(text: str) -> list[str]:
    out = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 4 and words[0] == "deb":
            # Drop "[signed-by=...]" options: mmdebstrap works out signed-by itself.
            words = [w for w in words if not (w.startswith("[") or w.endswith("]")
                                              or "=" in w)]
            if len(words) >= 4:
                out.append(f"deb {words[1]} {words[2]} {' '.join(words[3:])}")
    return out


def parse_deb822_sources(text: str) -> list[str]:
    out = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        comps = fields.get("components", "")
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                out.append(f"deb {uri} {suite} {comps}")
    return out


def apt_options() -> list[str]:
    """Carry over the host's date checks: snapshot mirrors serve expired Release files."""
    opts = []
    for key in ("Acquire::Check-Valid-Until", "Acquire::Check-Date"):
        try:
            res = run(["apt-config", "shell", "V", key], check=False)
        except CommandError:
            continue
        value = res.stdout.strip().removeprefix("V=").strip("'\"")
        if value.lower() in ("false", "0", "no"):
            opts.append(f'--aptopt={key} "false"')
    return opts
