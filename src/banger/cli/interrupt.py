"""Signals (Ctrl-C, SIGHUP, SIGTERM) while the CLI waits on the daemon.

During a streamed operation the first signal asks the daemon to cancel it: the stream
then reports the rollback and ends with an error of code "cancelled", which the command
prints. A second signal (or one before the daemon named the operation) leaves at once:
closing the stream makes the daemon cancel the operation itself (and delete a
`vm run --rm` VM). Around a guest command, SIGHUP and SIGTERM raise :class:`Interrupted`
like Ctrl-C raises KeyboardInterrupt, so `finally` blocks (the --rm delete) still run.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

from banger.cli.render import Progress, err_console, print_error
from banger.cli.safe import markup
from banger.client.client import ApiError, Client, DaemonUnavailable
from banger.client.types import VMOut

SIGNALS = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)
Handler = Callable[[int, FrameType | None], object] | int | None


class Interrupted(Exception):
    """The CLI was told to stop by a signal; it exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class Cancelling:
    signum: int | None = None  # the signal that asked for the cancel, once one did

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else 128 + self.signum


def _say(text: str) -> None:
    # The terminal may be gone (SIGHUP): the cancel matters, not the note.
    with contextlib.suppress(OSError):
        err_console.print(text, highlight=False)


@contextmanager
def _handlers(handler: Handler) -> Iterator[None]:
    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def cancel_on_signal(cancel: Callable[[str], object],
                     op_id: Callable[[], str | None]) -> Iterator[Cancelling]:
    """While the body streams an operation: signal -> cancel it, second signal -> leave."""
    state = Cancelling()

    def handler(signum: int, _frame: FrameType | None) -> None:
        oid = op_id()
        if state.signum is not None or oid is None:
            raise Interrupted(signum)
        state.signum = signum
        _say(f"cancelling {oid}: rolling back (press Ctrl-C again to leave now; bangerd "
             "then finishes the rollback on its own)")
        try:
            cancel(oid)
        except ApiError:
            pass  # it ended meanwhile: the stream says how
        except DaemonUnavailable as exc:
            raise Interrupted(signum) from exc

    with _handlers(handler):
        yield state


@contextmanager
def raise_on_signal() -> Iterator[None]:
    """SIGINT, SIGHUP and SIGTERM raise :class:`Interrupted` (finally blocks run)."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    with _handlers(handler):
        yield


@contextmanager
def signals_ignored() -> Iterator[None]:
    """For a short cleanup that must not be cut (the --rm delete)."""
    with _handlers(signal.SIG_IGN):
        yield


@contextmanager
def cancellable(client: Client, progress: Progress) -> Iterator[Cancelling]:
    """Show a streamed operation's progress; a signal cancels it."""
    # The cancel goes over its own connection: the stream's is busy, and the handler
    # runs between two reads of it.
    with progress, cancel_on_signal(lambda op: Client(client.socket_path).cancel(op),
                                    lambda: progress.op_id) as state:
        yield state


def streamed(client: Client, call: Callable[[Progress], VMOut], *,
             refused: Callable[[ApiError], Exception | None] = lambda _: None) -> VMOut:
    """Run one streamed operation under :func:`cancellable`; print its error and exit
    (128 + the signal after a cancel) when it fails. ``refused`` turns the daemon's
    refusal of the request into the error to raise instead (a usage error)."""
    progress = Progress()
    state = Cancelling()
    try:
        with cancellable(client, progress) as state:
            vm = call(progress)
    except ApiError as exc:
        instead = refused(exc)
        if instead is not None:
            raise instead from exc
        print_error(exc.body)
        sys.exit(state.exit_code or 1)
    if state.exit_code is not None:  # it finished as the cancel arrived
        sys.exit(state.exit_code)
    return vm


def delete_quietly(client: Client, ref: str) -> None:
    """Delete ``ref`` (the --rm cleanup), signals ignored meanwhile; a failure is said."""
    with signals_ignored():
        try:
            client.delete(ref)
        except (ApiError, DaemonUnavailable) as exc:
            err_console.print(f"[red]error:[/red] could not delete {markup(ref)}: "
                              f"{markup(str(exc))}")
