"""The daemon is the one validator of a VM spec; the CLI says its refusal in the user's
terms: the flag, and the value as typed."""

from __future__ import annotations

from banger.cli.common import usage_error
from banger.client.client import ApiError
from banger.client.types import ErrorBody


def refusal(message: str, status: int = 422, code: str = "invalid") -> ApiError:
    return ApiError(ErrorBody(code=code, message=message), status)


def test_each_refused_field_is_named_by_its_flag_and_value() -> None:
    sent = {"name": "Bad_Name", "vcpus": 0, "memory_mib": 99, "image": "x",
            "workspace": {"path": "/r", "branch": "b"}}
    err = usage_error(refusal(
        "invalid request: name: String should match pattern '^x$'; vcpus: Input should be "
        "greater than or equal to 1; memory_mib: too small; workspace.branch: bad; "
        "mystery: what"), sent)
    assert err is not None
    assert err.message == (
        "--name 'Bad_Name': not a DNS label: 1-63 characters of a-z, 0-9 and '-', starting "
        "and ending with a letter or digit; --vcpu 0: Input should be greater than or equal "
        "to 1; --memory 99 MiB: too small; --branch 'b': bad; mystery: what")


def test_other_errors_stay_the_daemons() -> None:
    # A use case's own "invalid" (a PATH outside a git work tree) says it all already.
    assert usage_error(refusal("/r is not inside a git work tree", status=400), {}) is None
    assert usage_error(refusal("invalid request: vcpus: x", code="conflict", status=409),
                       {}) is None
