"""The wire's constants, stdlib only: the CLI's client imports them without loading the
pydantic schema (:mod:`banger.api.schema`), which only the daemon needs at run time."""

from __future__ import annotations

API_VERSION = "v1"
PREFIX = f"/{API_VERSION}"
NDJSON = "application/x-ndjson"
# An idle progress stream carries a heartbeat line this often, so a client can tell a
# daemon that is gone (no line for STREAM_SILENCE_LIMIT seconds) from a slow boot.
HEARTBEAT_SECONDS = 5.0
STREAM_SILENCE_LIMIT = 60.0
