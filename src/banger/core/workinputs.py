"""What a new work disk needs from the host that costs a process each — a fresh ssh host
key for the guest and the user's git identity — asked for in the background as soon as
preflight has passed, so that both overlap the steps before the work disk (the runtime
cleanup, the root overlay) instead of running one after the other on the way to the
launch. Nothing here acquires anything a rollback would release: a fetch whose start
failed earlier just finishes and is dropped."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from banger.ports import GuestPort


@dataclass(frozen=True)
class WorkInputs:
    host_private: bytes  # the guest's ssh host key (file bytes)
    host_public: str     # and its public line
    identity: dict[str, str]  # user.name / user.email where the host user set them


class WorkInputsFetch:
    """Both asked for at once, on two threads; :meth:`result` waits for them."""

    def __init__(self, guest: GuestPort) -> None:
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="work-inputs")
        self._key = pool.submit(guest.new_host_key)
        self._identity = pool.submit(guest.git_identity)
        pool.shutdown(wait=False)

    def result(self) -> WorkInputs:
        """The inputs; what failed to be fetched raises here, as it would have inline."""
        private, public = self._key.result()
        return WorkInputs(private, public, self._identity.result())
