"""A user ssh_config that forwards everything, and the check that none of it applies."""

from __future__ import annotations

# A user's ssh_config that forwards everything it can to whatever host it reaches.
HOSTILE_USER_CONFIG = """\
Host *
    ForwardAgent yes
    ForwardX11 yes
    ForwardX11Trusted yes
    LocalForward 18080 localhost:80
    RemoteForward 19090 localhost:22
    DynamicForward 11080
    IdentityAgent /tmp/x
    Tunnel yes
    PermitLocalCommand yes
    LocalCommand touch /tmp/banger-should-not-exist
    ControlMaster auto
    ControlPath /tmp/cm-%C
    UpdateHostKeys yes
"""


def assert_forwards_nothing(ssh_g_output: str) -> None:
    """``ssh -G`` output shows no way for the guest to reach the host."""
    opts: dict[str, list[str]] = {}
    for line in ssh_g_output.splitlines():
        key, _, value = line.partition(" ")
        opts.setdefault(key, []).append(value)
    assert opts["forwardagent"] == ["no"]
    assert opts["forwardx11"] == ["no"] and opts["forwardx11trusted"] == ["no"]
    assert opts["clearallforwardings"] == ["yes"]
    for key in ("localforward", "remoteforward", "dynamicforward"):
        assert key not in opts, (key, opts.get(key))
    assert opts["identityagent"] == ["none"]
    assert opts["tunnel"] == ["false"] and opts["permitlocalcommand"] == ["no"]
    assert opts["controlmaster"] == ["false"] and "controlpath" not in opts
    assert opts["updatehostkeys"] == ["false"]
