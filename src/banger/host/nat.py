"""Host side of tap networking's firewall: NAT rules, the bridge's guard, ip_forward.

Every change goes through the one command runner (``nft``); state is read back as JSON
(``nft -j``) and nft changes are sent as JSON too, so no table or chain name is ever
spliced into nft's text syntax (which cannot quote identifiers). The links themselves
(bridge, taps) are :mod:`banger.host.net`.

What banger creates is marked so that cleanup and reconcile find it from the VM id alone
and never touch what is not theirs:

- the nft table ``inet banger`` is banger's alone (a ``postrouting`` nat chain and a
  ``forward`` filter chain);
- every rule carries the comment ``banger:<vm_id>``, also the accept rules banger has to
  insert into a foreign forward chain that drops by default (Docker's), so removing a
  VM's rules by id removes those too;
- ip_forward's value before banger turned it on is recorded, and put back once no VM
  needs forwarding any more.

Everything here acts on the network namespace of the calling thread.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from banger.host.net import NetworkError, check_ifname
from banger.host.runner import CommandError, Completed, run

NFT_FAMILY = "inet"
NFT_TABLE = "banger"
NAT_CHAIN = "postrouting"
FORWARD_CHAIN = "forward"
COMMENT_PREFIX = "banger:"
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")

_VM_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Families whose forward hook sees the guests' routed IPv4 traffic.
_IPV4_FAMILIES = ("ip", "inet")
_DOCKER_USER = "DOCKER-USER"

Json = dict[str, Any]


# --- ip_forward --------------------------------------------------------------------------


def ip_forward_enabled() -> bool:
    return IP_FORWARD.read_text().strip() == "1"


def ensure_ip_forward(record: Path | None = None) -> bool:
    """Turn on IPv4 forwarding (per network namespace) when it is off; returns whether it
    changed, so ``doctor`` can say banger turned it on.

    ``record``: a file where the value found is kept (durably, before the change, and only
    if no earlier value is recorded: after a crash the record still holds the original),
    for :func:`restore_ip_forward` once no VM needs forwarding any more.
    """
    if ip_forward_enabled():
        return False
    if record is not None and not record.exists():
        _write_durably(record, IP_FORWARD.read_text())
    IP_FORWARD.write_text("1\n")
    return True


def restore_ip_forward(record: Path) -> str | None:
    """Put back the forwarding value recorded by :func:`ensure_ip_forward` and forget it;
    returns the value restored (None: banger had not changed it)."""
    try:
        original = record.read_text().strip()
    except FileNotFoundError:
        return None
    if original not in ("0", "1"):
        raise NetworkError(f"{record} holds {original!r}, not an ip_forward value: remove it")
    IP_FORWARD.write_text(original + "\n")
    record.unlink()
    return original


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- nftables ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainRef:
    family: str
    table: str
    name: str

    def __str__(self) -> str:
        return f"{self.family} {self.table} {self.name}"


@dataclass(frozen=True)
class ForwardDrop:
    """A forward-hook chain outside banger's table that drops by default (``chain``), and
    the chain banger puts its accept rules in (``accept_in``: the chain itself, or Docker's
    ``DOCKER-USER`` when the chain jumps there)."""

    chain: ChainRef
    accept_in: ChainRef

    def describe(self) -> str:
        where = "at its top" if self.accept_in == self.chain else f"in {self.accept_in}"
        return (f"{self.chain} drops forwarded traffic by default (policy drop); banger "
                f"accepts its VMs' traffic {where}")


@dataclass(frozen=True)
class NatSetup:
    """What ``add_nat`` did, for logs and ``doctor``."""

    vm_id: str
    guest_ip: IPv4Address
    rules: int
    forward_drops: tuple[ForwardDrop, ...]

    def describe(self) -> list[str]:
        lines = [f"masquerade and forward {self.guest_ip} (VM {self.vm_id}) in "
                 f"{NFT_FAMILY} {NFT_TABLE}"]
        lines += [drop.describe() for drop in self.forward_drops]
        return lines


def ensure_nat_table() -> None:
    """Create banger's table and its two base chains if missing (nft ``add`` is idempotent)."""
    _nft([
        {"add": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}},
        {"add": {"chain": {"family": NFT_FAMILY, "table": NFT_TABLE, "name": NAT_CHAIN,
                           "type": "nat", "hook": "postrouting", "prio": 100,
                           "policy": "accept"}}},
        {"add": {"chain": {"family": NFT_FAMILY, "table": NFT_TABLE, "name": FORWARD_CHAIN,
                           "type": "filter", "hook": "forward", "prio": 0,
                           "policy": "accept"}}},
    ])


GUARD_PREFIX = "banger-guard:"


def ensure_guard(bridge: str) -> bool:
    """Close ``bridge`` off for routed traffic: guests without --nat get nothing forwarded
    in or out even when ip_forward is on (another VM's --nat, Docker, a router host).
    Two drop rules at the end of banger's forward chain; each VM's accept rules
    (:func:`add_nat`) are inserted ahead of them. Idempotent; True when added."""
    check_ifname(bridge)
    ensure_nat_table()
    comment = GUARD_PREFIX + bridge
    chain = ChainRef(NFT_FAMILY, NFT_TABLE, FORWARD_CHAIN)
    if any(rule.get("comment") == comment for rule in _rules_in(list_ruleset(), chain)):
        return False
    new = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["new"]}}
    _nft([
        _rule("add", chain, [_eq(_meta("iifname"), bridge), _ne(_meta("oifname"), bridge),
                             {"drop": None}], comment),
        _rule("add", chain, [_eq(_meta("oifname"), bridge), _ne(_meta("iifname"), bridge),
                             new, {"drop": None}], comment),
    ])
    return True


def add_nat(vm_id: str, guest_ip: IPv4Address, bridge: str,
            out_iface: str | None = None) -> NatSetup:
    """Give the guest at ``guest_ip`` behind ``bridge`` outbound access through the host.

    Masquerades its traffic leaving through any interface but the bridge (only
    ``out_iface`` when given), accepts it in banger's forward chain and, where a foreign
    forward chain drops by default, there too. Routed traffic from a guest enters the
    forward hook on the bridge, not on its tap, so rules match the bridge plus the guest
    address. Idempotent: the VM's previous rules are replaced in the same transaction.
    In a foreign chain the return rule cannot use ``ct state`` (iptables-nft would refuse
    the table): there it accepts by destination alone.
    """
    _check_vm_id(vm_id)
    check_ifname(bridge)
    if out_iface is not None:
        check_ifname(out_iface)
    ensure_nat_table()
    ruleset = list_ruleset()
    drops = tuple(forward_drop_chains(ruleset))
    comment = COMMENT_PREFIX + vm_id
    ip = str(guest_ip)
    leaving = [] if out_iface is None else [_eq(_meta("oifname"), out_iface)]
    entering = [] if out_iface is None else [_eq(_meta("iifname"), out_iface)]
    outbound = [_eq(_meta("iifname"), bridge), _eq(_ip("saddr"), ip), *leaving,
                {"accept": None}]
    inbound = [*entering, _eq(_meta("oifname"), bridge), _eq(_ip("daddr"), ip)]
    replies = {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                         "right": ["established", "related"]}}
    masquerade = [_eq(_ip("saddr"), ip), *(leaving or [_ne(_meta("oifname"), bridge)]),
                  {"masquerade": None}]
    adds = [
        _rule("add", ChainRef(NFT_FAMILY, NFT_TABLE, NAT_CHAIN), masquerade, comment),
        # Inserted: ahead of the bridge's guard (ensure_guard) at the end of the chain.
        _rule("insert", ChainRef(NFT_FAMILY, NFT_TABLE, FORWARD_CHAIN), outbound, comment),
        _rule("insert", ChainRef(NFT_FAMILY, NFT_TABLE, FORWARD_CHAIN),
              [*inbound, replies, {"accept": None}], comment),
    ]
    for drop in drops:
        # Foreign chains are usually iptables-nft's: a native ct expression there makes
        # iptables-nft (1.8.9) refuse the whole table ("incompatible"), which would break
        # Docker; so the return rule there matches on addresses alone. "insert" puts the
        # rules ahead of whatever drops.
        adds.append(_rule("insert", drop.accept_in, outbound, comment))
        adds.append(_rule("insert", drop.accept_in, [*inbound, {"accept": None}], comment))
    _nft([*(_delete_rule(rule) for rule in _rules_of(ruleset, vm_id)), *adds])
    return NatSetup(vm_id, guest_ip, len(adds), drops)


def remove_nat(vm_id: str) -> int:
    """Delete every rule tagged ``banger:<vm_id>``, in banger's table and in foreign chains.
    Returns how many were removed (0 when already gone)."""
    _check_vm_id(vm_id)
    rules = list(_rules_of(list_ruleset(), vm_id))
    if rules:
        _nft([_delete_rule(rule) for rule in rules])
    return len(rules)


def nat_vm_ids() -> set[str]:
    """Ids of the VMs that have NAT rules (for reconcile)."""
    return {rule["comment"][len(COMMENT_PREFIX):] for rule in _banger_rules(list_ruleset())}


def delete_nat_table() -> bool:
    """Remove banger's table and its rules in foreign chains; False when nothing was there."""
    ruleset = list_ruleset()
    commands = [_delete_rule(rule) for rule in _banger_rules(ruleset)
                if (rule["family"], rule["table"]) != (NFT_FAMILY, NFT_TABLE)]
    has_table = any("table" in item and item["table"]["family"] == NFT_FAMILY
                    and item["table"]["name"] == NFT_TABLE for item in ruleset)
    if has_table:
        commands.append({"delete": {"table": {"family": NFT_FAMILY, "name": NFT_TABLE}}})
    if commands:
        _nft(commands)
    return bool(commands)


def forward_drop_chains(ruleset: Sequence[Json] | None = None) -> list[ForwardDrop]:
    """Foreign IPv4 forward-hook chains with policy drop (Docker's ``ip filter FORWARD``, a
    hardened ``inet filter forward``): guest traffic dies there unless accepted there."""
    if ruleset is None:
        ruleset = list_ruleset()
    chains = [item["chain"] for item in ruleset if "chain" in item]
    found = []
    for chain in chains:
        if (chain.get("hook") != "forward" or chain.get("policy") != "drop"
                or chain["family"] not in _IPV4_FAMILIES
                or (chain["family"], chain["table"]) == (NFT_FAMILY, NFT_TABLE)):
            continue
        ref = ChainRef(chain["family"], chain["table"], chain["name"])
        # Docker jumps from FORWARD to DOCKER-USER first and documents that chain as the
        # place for the user's rules; its own rules in FORWARD are rewritten on restart.
        jumps = any(_jumps_to(rule, _DOCKER_USER) for rule in _rules_in(ruleset, ref))
        found.append(ForwardDrop(ref, ChainRef(ref.family, ref.table, _DOCKER_USER)
                                 if jumps else ref))
    return found


def list_ruleset() -> list[Json]:
    """``nft -j list ruleset`` without the metainfo entry."""
    out = _run_nft(["nft", "-j", "list", "ruleset"])
    items: list[Json] = json.loads(out.stdout).get("nftables", [])
    return [item for item in items if "metainfo" not in item]


def _rules_in(ruleset: Iterable[Json], chain: ChainRef) -> Iterator[Json]:
    for item in ruleset:
        rule = item.get("rule")
        if rule and (rule["family"], rule["table"], rule["chain"]) == (
                chain.family, chain.table, chain.name):
            yield rule


def _banger_rules(ruleset: Iterable[Json]) -> Iterator[Json]:
    for item in ruleset:
        rule = item.get("rule")
        if rule and str(rule.get("comment", "")).startswith(COMMENT_PREFIX):
            yield rule


def _rules_of(ruleset: Iterable[Json], vm_id: str) -> list[Json]:
    return [rule for rule in _banger_rules(ruleset) if rule["comment"] == COMMENT_PREFIX + vm_id]


def _jumps_to(rule: Json, target: str) -> bool:
    return any(expr.get("jump", {}).get("target") == target
               for expr in rule.get("expr", []) if isinstance(expr, dict))


def _rule(verb: str, chain: ChainRef, expr: list[Json], comment: str) -> Json:
    return {verb: {"rule": {"family": chain.family, "table": chain.table,
                            "chain": chain.name, "expr": expr, "comment": comment}}}


def _delete_rule(rule: Json) -> Json:
    return {"delete": {"rule": {"family": rule["family"], "table": rule["table"],
                                "chain": rule["chain"], "handle": rule["handle"]}}}


def _eq(left: Json, right: str) -> Json:
    return {"match": {"op": "==", "left": left, "right": right}}


def _ne(left: Json, right: str) -> Json:
    return {"match": {"op": "!=", "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _ip(field: str) -> Json:
    return {"payload": {"protocol": "ip", "field": field}}


def _nft(commands: list[Json]) -> None:
    """Apply ``commands`` as one nft transaction: all or nothing."""
    _run_nft(["nft", "-j", "-f", "-"], input=json.dumps({"nftables": commands}))


def _run_nft(argv: list[str], input: str | None = None) -> Completed:
    try:
        return run(argv, input=input)
    except CommandError as exc:
        if exc.returncode is None and exc.reason and "not found" in exc.reason:
            raise NetworkError("nft not found: install nftables (tap networking needs it; "
                               "banger never uses iptables-legacy)") from exc
        raise


def _check_vm_id(vm_id: str) -> None:
    if not _VM_ID.match(vm_id):
        raise NetworkError(f"invalid VM id {vm_id!r} for a rule comment")
