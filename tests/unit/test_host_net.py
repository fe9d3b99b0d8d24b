"""Pure parts of banger.host.nat: reading nft's JSON ruleset (no commands run)."""

from __future__ import annotations

from typing import Any

from banger.host.nat import ChainRef, ForwardDrop, forward_drop_chains


def chain(family: str, table: str, name: str, **base: Any) -> dict[str, Any]:
    return {"chain": {"family": family, "table": table, "name": name, "handle": 1, **base}}


def rule(family: str, table: str, chain: str, *expr: Any) -> dict[str, Any]:
    return {"rule": {"family": family, "table": table, "chain": chain, "handle": 9,
                     "expr": list(expr)}}


DROP = {"type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}


def test_only_foreign_ipv4_forward_chains_with_policy_drop() -> None:
    ruleset = [
        chain("inet", "banger", "forward", **DROP),  # ours: never reported
        chain("ip6", "filter", "FORWARD", **DROP),  # guests are IPv4
        chain("inet", "filter", "input", **{**DROP, "hook": "input"}),
        chain("inet", "filter", "forward", **{**DROP, "policy": "accept"}),
        chain("inet", "fw", "forward", **DROP),
    ]
    ref = ChainRef("inet", "fw", "forward")
    assert forward_drop_chains(ruleset) == [ForwardDrop(ref, ref)]


def test_docker_user_is_used_when_forward_jumps_there() -> None:
    ruleset = [
        chain("ip", "filter", "FORWARD", **DROP),
        chain("ip", "filter", "DOCKER-USER"),
        rule("ip", "filter", "FORWARD", {"counter": None}, {"jump": {"target": "DOCKER-USER"}}),
    ]
    [drop] = forward_drop_chains(ruleset)
    assert drop.accept_in == ChainRef("ip", "filter", "DOCKER-USER")
    assert "ip filter FORWARD" in drop.describe() and "DOCKER-USER" in drop.describe()
