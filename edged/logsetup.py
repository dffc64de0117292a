"""Where the daemon's log goes: the journal, with searchable fields, when systemd runs it;
stderr otherwise.

A record made with ``extra=log_fields(model=..., version=..., trace=..., code=...)`` reaches the
journal with MODEL, VERSION, TRACE_ID and ERROR_CODE, so ``journalctl -u edged MODEL=detector``
or ``journalctl TRACE_ID=...`` finds it. systemd says stderr is the journal by setting
``JOURNAL_STREAM`` to stderr's device and inode; systemd-python (the ``systemd`` extra) sends
the fields. Without it, stderr still reaches the journal as plain lines.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

#: record attribute -> journal field
JOURNAL_FIELDS = {"model": "MODEL", "version": "VERSION", "trace": "TRACE_ID", "code": "ERROR_CODE"}
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
