"""Property test: random step lists, failure points and failing undos keep the contract."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from banger.pipeline import Step, StepFailed, run_steps


class RunError(Exception):
    pass


class UndoError(Exception):
    pass


step_specs = st.lists(
    st.tuples(st.booleans(), st.booleans(), st.booleans()),  # has_undo, run_fails, undo_fails
    max_size=12,
)


@given(step_specs)
def test_contract_holds_for_any_plan(specs: list[tuple[bool, bool, bool]]) -> None:
    log: list[tuple[str, int]] = []
    steps: list[Step[None]] = []
    for i, (has_undo, run_fails, undo_fails) in enumerate(specs):

        def run(_: None, i: int = i, fails: bool = run_fails) -> None:
            log.append(("run", i))
            if fails:
                raise RunError(i)

        def undo(_: None, i: int = i, fails: bool = undo_fails) -> None:
            log.append(("undo", i))
            if fails:
                raise UndoError(i)

        steps.append(Step(f"s{i}", run, undo if has_undo else None))

    first_fail = next((i for i, s in enumerate(specs) if s[1]), None)
    try:
        run_steps(steps, None)
    except StepFailed as err:
        assert first_fail is not None
        ran = list(range(first_fail + 1))
        undone = [i for i in reversed(ran) if specs[i][0]]
        assert log == [("run", i) for i in ran] + [("undo", i) for i in undone]
        assert err.step == f"s{first_fail}"
        assert isinstance(err.exceptions[0], RunError)
        assert err.exceptions[0].args == (first_fail,)
        expected_undo_errors = [i for i in undone if specs[i][2]]
        assert [e.args[0] for e in err.exceptions[1:]] == expected_undo_errors
        assert all(isinstance(e, UndoError) for e in err.exceptions[1:])
    else:
        assert first_fail is None
        assert log == [("run", i) for i in range(len(specs))]
