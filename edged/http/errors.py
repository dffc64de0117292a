"""The daemon's errors in OpenAI's shape, ``{"error": {message, type, param, code}}``, with
the HTTP status that fits each wire code.

``code`` is OpenAI's where it has one for the same thing (``model_not_found``,
``context_length_exceeded``, ``rate_limit_exceeded``), else the daemon's wire code in lower
case; ``param`` is the field a request's message names, when it names one.
"""

from __future__ import annotations

import re
from typing import Any

from edged.errors import (
    BadRequest,
    BudgetExceeded,
    BusyError,
    Cancelled,
    ContextOverflow,
    DeadlineExceeded,
    EdgedError,
    ModelLoadError,
    OpNotSupported,
    ShuttingDown,
    TooLarge,
    UnknownModel,
    UnknownOp,
)

#: wire code -> (HTTP status, OpenAI's code when it has its own)
STATUS: dict[str, tuple[int, str | None]] = {
    BadRequest.code: (400, None),
    UnknownOp.code: (400, None),
    OpNotSupported.code: (400, "model_not_supported"),
    ContextOverflow.code: (400, "context_length_exceeded"),
    UnknownModel.code: (404, "model_not_found"),
    TooLarge.code: (413, None),
    BusyError.code: (429, "rate_limit_exceeded"),
    BudgetExceeded.code: (503, None),
    ShuttingDown.code: (503, None),
    ModelLoadError.code: (503, None),
    Cancelled.code: (503, None),
    DeadlineExceeded.code: (504, None),
}
#: statuses a client may retry after a pause: they get a Retry-After
RETRYABLE = frozenset({429, 503})
RETRY_AFTER_S = "1"
#: the field a request's message starts with ('max_tokens' must be ...), by its OpenAI name
_PARAM = re.compile(r"^'([a-z_]+)'")
_OPENAI_NAMES = {"json_schema": "response_format", "texts": "input"}


def error_status(error: EdgedError) -> int:
    return STATUS.get(error.code, (500, None))[0]


def error_body(error: EdgedError) -> dict[str, Any]:
    status, code = STATUS.get(error.code, (500, None))
    return body(status, error.message, code or error.code.lower(), _param(error.message))


def body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object; its ``type`` follows from the status."""
    return {"error": {"message": message, "type": _kind(status), "param": param, "code": code}}


def _kind(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


def _param(message: str) -> str | None:
    found = _PARAM.match(message)
    if found is None:
        return None
    return _OPENAI_NAMES.get(found[1], found[1])
