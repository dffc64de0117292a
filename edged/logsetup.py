"""Where the daemon's log goes: the journal, with searchable fields, when systemd runs it;
stderr otherwise.

A record made with ``extra=log_fields(model=..., version=..., trace=..., code=...)`` reaches the
journal with MODEL, VERSION, TRACE_ID and ERROR_CODE, so ``journalctl -u edged MODEL=detector``
or ``journalctl TRACE_ID=...`` finds it. systemd says stderr is the journal by setting
``JOURNAL_STREAM`` to stderr's device and inode; systemd-python (the ``systemd`` extra) sends
the fields. Without it, stderr still reaches the journal as plain lines.

Every error reply the daemon sends is logged through ``log_error_reply`` (logger
``edged.replies``), with those fields, at most once a second per (model, code).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

#: record attribute -> journal field
JOURNAL_FIELDS = {"model": "MODEL", "version": "VERSION", "trace": "TRACE_ID", "code": "ERROR_CODE"}
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: error replies that say the daemon or a model failed, not the request: WARNING, the rest INFO
FAULT_CODES = frozenset({"RUN_FAILED", "LOAD_FAILED", "BUDGET_EXCEEDED", "INTERNAL", "STORE"})
#: how much of an error message a record quotes (a client's bad header can be 64 KiB)
MAX_QUOTED = 300


def log_fields(
    *,
    model: str | None = None,
    version: int | None = None,
    trace: object = None,
    code: str | None = None,
) -> dict[str, Any]:
    """A log call's ``extra=``: what the journal indexes (and ``edgectl logs`` shows)."""
    given = {"model": model, "version": version, "trace": trace, "code": code}
    return {key: value for key, value in given.items() if value is not None}


class ErrorReplyLog:
    """Logs error replies, at most one record per (model, code) each ``interval_s``, so that a
    flood of ``BUSY`` costs the journal one record a second; the next record says how many
    were left out. Called on the event loop only (no lock: it runs once per error reply)."""

    #: keys remembered at most; past it the memory starts over (keys are bounded by the
    #: configured models and the wire codes: this only guards against a bug)
    max_keys = 4096

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        #: (model, code) -> [when the next record may go, replies left out since the last]
        self._keys: dict[tuple[str, str], list[Any]] = {}

    def log(
        self,
        code: str,
        message: str,
        *,
        model: str | None = None,
        version: int | None = None,
        trace: str | None = None,
        request_id: int | None = None,
    ) -> None:
        now = self._clock()
        key = (model or "", code)
        state = self._keys.get(key)
        if state is not None and now < state[0]:
            state[1] += 1
            return
        left_out = state[1] if state is not None else 0
        if len(self._keys) >= self.max_keys:
            self._keys.clear()
        self._keys[key] = [now + self._interval_s, 0]
        level = logging.WARNING if code in FAULT_CODES else logging.INFO
        more = f" ({left_out} more like it left out)" if left_out else ""
        self._logger.log(
            level,
            "error reply %s to request %s%s: %s%s [trace %s]",
            code,
            request_id,
            f" for model {model}" if model else "",
            message[:MAX_QUOTED],
            more,
            trace,
            extra=log_fields(model=model or None, version=version, trace=trace, code=code),
        )


#: the daemon's one error-reply log
log_error_reply = ErrorReplyLog(logging.getLogger("edged.replies")).log


def configure(level: str) -> str:
    """Send the log to the journal or to stderr; returns which."""
    handler = _journal_handler() if stderr_is_journal() else None
    if handler is None:
        logging.basicConfig(level=level.upper(), format=STDERR_FORMAT, stream=sys.stderr)
        return "stderr"
    root = logging.getLogger()
    root.setLevel(level.upper())
    root.addHandler(handler)
    return "journal"


def stderr_is_journal() -> bool:
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


class _JournalFields(logging.Filter):
    """Copy the record's fields to the journal's names (journald takes upper case only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for attribute, field in JOURNAL_FIELDS.items():
            value = getattr(record, attribute, None)
            if value is not None:
                setattr(record, field, str(value))
        return True


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="edged")
    handler.addFilter(_JournalFields())
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    return handler
