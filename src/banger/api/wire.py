"""The wire's constants, stdlib only: the CLI's client imports them without loading the
pydantic schema (:mod:`banger.api.schema`), which only the daemon needs at run time."""

from __future__ import annotations

API_VERSION = "v1"
PREFIX = f"/{API_VERSION}"
NDJSON = "application/x-ndjson"
# The body of a files upload and the answer of a download (`/v1/vms/{ref}/files`).
TAR = "application/x-tar"
# An idle progress stream carries a heartbeat line this often, so a client can tell a
# daemon that is gone (no line for STREAM_SILENCE_LIMIT seconds) from a slow boot.
HEARTBEAT_SECONDS = 5.0
STREAM_SILENCE_LIMIT = 60.0

# The exec WebSocket (`/v1/vms/{ref}/exec`, docs/api.md): a binary message is one byte
# naming its stream, then the bytes.
EXEC_STDIN = 0
EXEC_STDOUT = 1
EXEC_STDERR = 2
# The largest message either side sends (a client's stdin chunk; the daemon's output
# messages are the agent's frames, 64 KiB at most).
EXEC_MAX_MESSAGE = 1 << 20
# The client's stdin in flight: it sends no more than this many bytes the daemon has not
# acknowledged (`{"type": "stdin_ack", "bytes": n}` once they reached the guest), so the
# daemon always reads the socket (a signal or a hang-up never waits behind stdin) and
# holds at most this much of it.
EXEC_STDIN_WINDOW = 1 << 20
