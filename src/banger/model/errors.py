"""Errors of the use cases; the daemon maps each to an HTTP status and a JSON body."""

from __future__ import annotations


class BangerError(Exception):
    code = "error"
    status = 500

    def __init__(self, message: str, *, stage: str | None = None, op_id: str | None = None):
        super().__init__(message)
        self.message = message
        self.stage = stage
        self.op_id = op_id


class NotFoundError(BangerError):
    code = "not_found"
    status = 404


class ConflictError(BangerError):
    code = "conflict"
    status = 409


class InvalidRequest(BangerError):
    code = "invalid"
    status = 400


class OperationFailed(BangerError):
    """A lifecycle operation failed at ``stage``; the message carries the root cause."""

    code = "operation_failed"
    status = 500


class FailpointTriggered(RuntimeError):
    """Raised by a stage named in the BANGER_FAILPOINT test hook."""


class Cancelled(BangerError):
    """The operation was cancelled (by its client, or because its client went away);
    what it had set up was rolled back."""

    code = "cancelled"
    status = 409
