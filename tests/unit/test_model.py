from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from banger.model.vm import (
    TRANSITIONS,
    VM,
    InvalidSpec,
    InvalidTransition,
    ResourceNames,
    VMSpec,
    VMState,
    can_transition,
    new_vm_id,
    validate_name,
)


@pytest.mark.parametrize("name", ["box", "a", "web-1", "x" * 63, "0abc"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "Box", "a_b", "a.b", "x" * 64, "a b", "ü",
                                  "box\n"])
def test_invalid_names_refused_with_hint(name: str) -> None:
    with pytest.raises(InvalidSpec, match="DNS label"):
        validate_name(name)


@pytest.mark.parametrize(
    ("kw", "flag"),
    [({"vcpus": 0}, "--vcpu"), ({"vcpus": -1}, "--vcpu"), ({"vcpus": 1000}, "--vcpu"),
     ({"memory_mib": 0}, "--memory"), ({"memory_mib": -5}, "--memory"),
     ({"memory_mib": 10**9}, "--memory"), ({"work_disk_mib": 1}, "--disk-size")],
)
def test_absurd_specs_refused(kw: dict[str, int], flag: str) -> None:
    with pytest.raises(InvalidSpec, match=flag):
        VMSpec(**kw).validated()  # type: ignore[arg-type]


def test_with_changes_validates() -> None:
    spec = VMSpec()
    assert spec.with_changes(vcpus=2, memory_mib=1024).vcpus == 2
    with pytest.raises(InvalidSpec):
        spec.with_changes(memory_mib=-1)


def test_every_state_has_transitions() -> None:
    assert set(TRANSITIONS) == set(VMState)
    assert can_transition(VMState.STOPPED, VMState.STARTING)
    assert not can_transition(VMState.CREATED, VMState.RUNNING)


def test_with_state_enforces_the_state_machine() -> None:
    vm = VM(id="0123456789ab", name="box", spec=VMSpec(), state=VMState.CREATED,
            created_at=0.0, updated_at=0.0)
    with pytest.raises(InvalidTransition, match="from created to running"):
        vm.with_state(VMState.RUNNING, 1.0)
    stopped = vm.with_state(VMState.STOPPED, 1.0)  # a VM that never started, killed
    assert stopped.with_state(VMState.STOPPED, 2.0).updated_at == 2.0  # killed again
    assert stopped.with_state(VMState.STARTING, 3.0).state is VMState.STARTING


@given(st.integers(0, 2**48 - 1))
def test_tap_name_fits_ifnamsiz(n: int) -> None:
    vm_id = f"{n:012x}"
    assert len(ResourceNames(vm_id).tap) < 16


def test_ids_are_unique_hex() -> None:
    ids = {new_vm_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 12 and int(i, 16) >= 0 for i in ids)
