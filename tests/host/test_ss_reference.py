"""parse_ss: the guest's `ss -H -l -n -t -u -p` output, from real samples."""

from __future__ import annotations

import pytest
from ss_reference import SsParseError, SsSocket, parse_ss, split_local

# iproute2 6.1 (Debian bookworm, the guest image): sshd on both families, a dual-stack
# and a v6-only listener, loopback on both families, UDP with a scope and a wildcard.
SAMPLE = """\
udp   UNCONN 0      0             0.0.0.0:38127      0.0.0.0:*    users:(("python3",pid=1366,fd=7))
udp   UNCONN 0      0           127.0.0.5:38129      0.0.0.0:*    users:(("python3",pid=1366,fd=9))
udp   UNCONN 0      0                   *:38128            *:*    users:(("python3",pid=1366,fd=8))
udp   UNCONN 0      0       127.0.0.53%lo:53    0.0.0.0:* users:(("systemd-resolve",pid=301,fd=13))
udp   UNCONN 0      0        0.0.0.0%eth0:68         0.0.0.0:*    users:(("dhclient",pid=412,fd=7))
udp   UNCONN 0      0     [fe80::5054:ff:fe12:3456%eth0]:123  [::]:*  users:(("ntpd",pid=9,fd=20))
tcp   LISTEN 0      128           0.0.0.0:22         0.0.0.0:*    users:(("sshd",pid=123,fd=3))
tcp   LISTEN 0      128              [::]:22            [::]:*    users:(("sshd",pid=123,fd=4))
tcp   LISTEN 0      128         127.0.0.1:38123      0.0.0.0:*    users:(("python3",pid=1366,fd=3))
tcp   LISTEN 0      128             [::1]:38126         [::]:*    users:(("python3",pid=1366,fd=6))
tcp   LISTEN 0      4096    *:8080  *:*  users:(("nginx",pid=77,fd=6),("nginx",pid=76,fd=6))
tcp   LISTEN 0      511     [::ffff:127.0.0.1]:9000  [::]:*  users:(("tmux: server",pid=5,fd=3))
"""


def test_parses_every_form_ss_prints() -> None:
    got = parse_ss(SAMPLE)
    assert got == [
        SsSocket("tcp", "0.0.0.0", 22, "sshd"),
        SsSocket("tcp", "::", 22, "sshd"),
        SsSocket("tcp", "*", 8080, "nginx"),
        SsSocket("tcp", "::ffff:127.0.0.1", 9000, "tmux: server"),
        SsSocket("tcp", "127.0.0.1", 38123, "python3"),
        SsSocket("tcp", "::1", 38126, "python3"),
        SsSocket("udp", "127.0.0.53", 53, "systemd-resolve"),
        SsSocket("udp", "0.0.0.0", 68, "dhclient"),
        SsSocket("udp", "fe80::5054:ff:fe12:3456", 123, "ntpd"),
        SsSocket("udp", "0.0.0.0", 38127, "python3"),
        SsSocket("udp", "*", 38128, "python3"),
        SsSocket("udp", "127.0.0.5", 38129, "python3"),
    ]


def test_duplicates_are_merged_with_every_process() -> None:
    text = (
        'tcp LISTEN 0 128 0.0.0.0:80 0.0.0.0:* users:(("nginx",pid=2,fd=6))\n'
        'tcp LISTEN 0 128 0.0.0.0:80 0.0.0.0:* users:(("nginx",pid=3,fd=6))\n'
        'tcp LISTEN 0 128 0.0.0.0:80 0.0.0.0:* users:(("caddy",pid=4,fd=6))\n'
        'udp UNCONN 0 0 0.0.0.0:80 0.0.0.0:* users:(("dnsd",pid=5,fd=6))\n'
    )
    assert parse_ss(text) == [SsSocket("tcp", "0.0.0.0", 80, "nginx,caddy"),
                              SsSocket("udp", "0.0.0.0", 80, "dnsd")]


def test_missing_process_blank_lines_and_other_netids() -> None:
    text = ("\n"
            "tcp LISTEN 0 128 0.0.0.0:22 0.0.0.0:*\n"
            "raw UNCONN 0 0 *:ipv6-icmp *:*\n"
            "   \n")
    assert parse_ss(text) == [SsSocket("tcp", "0.0.0.0", 22, None)]
    assert parse_ss("") == []


@pytest.mark.parametrize("local,expected", [
    ("0.0.0.0:22", ("0.0.0.0", 22)),
    ("[::]:22", ("::", 22)),
    ("*:68", ("*", 68)),
    ("127.0.0.53%lo:53", ("127.0.0.53", 53)),
    ("[fe80::1%eth0]:123", ("fe80::1", 123)),
    ("[::1]:65535", ("::1", 65535)),
])
def test_split_local(local: str, expected: tuple[str, int]) -> None:
    assert split_local(local) == expected


@pytest.mark.parametrize("line", [
    "tcp LISTEN 0 128 0.0.0.0:ssh 0.0.0.0:*",   # not numeric
    "tcp LISTEN 0 128 [::1:22 [::]:*",          # unbalanced
    "tcp LISTEN 0 128 0.0.0.0:99999 0.0.0.0:*",  # out of range
    "tcp LISTEN 0 128",                          # truncated
    "tcp LISTEN 0 128 :22 0.0.0.0:*",            # no address
])
def test_unreadable_lines_are_errors_not_guesses(line: str) -> None:
    with pytest.raises(SsParseError):
        parse_ss(line)
