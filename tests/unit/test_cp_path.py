"""`vm cp`'s operand notation (scp's `box:/path`), cli/cppath.py."""

from __future__ import annotations

import pytest

from banger.cli.cppath import Operand, pair, parse


@pytest.mark.parametrize(("arg", "want"), [
    ("box:/root/out", Operand("box", "/root/out")),
    ("box:out", Operand("box", "/root/out")),
    ("box:", Operand("box", "/root")),
    ("box:/", Operand("box", "/")),
    ("box:a/b/", Operand("box", "/root/a/b", dir_hint=True)),
    ("box:/x/../y/./z", Operand("box", "/y/z")),
    ("box://etc", Operand("box", "/etc")),
    ("0123abcd:/tmp", Operand("0123abcd", "/tmp")),
    ("./a:b", Operand(None, "./a:b")),
    ("/tmp/x:y", Operand(None, "/tmp/x:y")),
    (":x", Operand(None, ":x")),
    ("plain", Operand(None, "plain")),
    ("dir/", Operand(None, "dir/", dir_hint=True)),
    ("-", Operand(None, "-")),
])
def test_operands(arg: str, want: Operand) -> None:
    assert parse(arg) == want


def test_stream_operand() -> None:
    assert parse("-").stream and not parse("box:-").stream and not parse("./-").stream


def test_exactly_one_side_is_in_a_vm() -> None:
    s, d = pair("./f", "box:/root")
    assert s.vm is None and d.vm == "box"
    with pytest.raises(ValueError, match="both operands"):
        pair("a:/x", "b:/y")
    with pytest.raises(ValueError, match="neither operand"):
        pair("a", "./b:c")
    with pytest.raises(ValueError, match="empty"):
        parse("")
