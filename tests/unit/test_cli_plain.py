"""`banger vm list` to a pipe prints what rich would, without rich: the plain table is
rich's own output, byte for byte, for every VM list it draws."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from banger.cli.plain import PIPE_WIDTH, VM_COLUMNS, plain_table, vm_rows
from banger.cli.render import vm_table
from banger.client.types import Runtime, VMOut

ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
ANY = st.text(max_size=12)  # controls, wide and combining characters, bidi marks
TEXT = st.one_of(ASCII, ASCII, ANY)


@st.composite
def vms(draw: st.DrawFn) -> VMOut:
    runtime = draw(st.one_of(st.none(), st.builds(
        Runtime, pid=st.integers(1, 99999), ssh_port=st.one_of(st.none(), st.integers(1, 65535)),
        accel=st.just("tcg"), accel_reason=st.just("x"), vmm=st.just("qemu"),
        boot_id=st.just("b"), started_at=st.just(0.0), ssh_host=TEXT)))
    return VMOut(id=draw(TEXT), name=draw(TEXT), state=draw(TEXT), image=draw(TEXT),
                 vcpus=draw(st.integers(1, 64)), memory_mib=draw(st.integers(1, 1 << 20)),
                 disk_mib=draw(st.integers(1, 1 << 20)), network="user", nat=False,
                 created_at=draw(st.floats(0, 4e9)), updated_at=0.0, dir="d",
                 serial_log="s", guest_ip=draw(st.one_of(st.none(), TEXT)), runtime=runtime)


def rich_text(table: object) -> str:
    buf = io.StringIO()
    Console(file=buf, highlight=False, width=PIPE_WIDTH, emoji=False,
            force_terminal=False).print(table)
    return buf.getvalue()


@given(st.lists(vms(), max_size=5))
def test_the_plain_vm_table_is_what_rich_prints_to_a_pipe(listed: list[VMOut]) -> None:
    rows = vm_rows(listed)
    text = plain_table(VM_COLUMNS, rows)
    cells = [c for r in rows for c in r]
    if all(c.isascii() and c.isprintable() for c in cells):
        assert text == rich_text(vm_table(listed))
    else:
        assert text is None  # rich measures those


def test_an_empty_list_is_the_header_alone() -> None:
    assert plain_table(VM_COLUMNS, []) == rich_text(vm_table([])) == (
        "ID  NAME  STATE  IMAGE  IP  VCPU  MEM  DISK  SSH  CREATED\n")
