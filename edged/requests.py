"""Request types that several ops share, and the checks of the values in them.

Each type checks its own fields in ``__post_init__`` after its parent's (see
``protocol.Request``); the messages name the header key, since that is what a client got wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

from edged.errors import BadRequest
from edged.protocol import Request, is_int, is_number, valid_id

#: one day: longer is no deadline at all, and far longer overflows the clock arithmetic
MAX_DEADLINE_MS = 86_400_000


@dataclass(frozen=True, kw_only=True)
class ModelRequest(Request):
    """An op on one model, named by ``model``."""

    model: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.model, str):
            raise BadRequest("'model' must be a str")
        if not self.model:
            raise BadRequest(f"op {self.op!r} needs a 'model'")


@dataclass(frozen=True, kw_only=True)
class VersionedRequest(ModelRequest):
    """An op on one model that may name one of its versions (``None``: the active one)."""

    version: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.version is not None and not (is_int(self.version) and self.version >= 0):
            raise BadRequest("'version' must be a non-negative integer")


@dataclass(frozen=True, kw_only=True)
class InferenceRequest(VersionedRequest):
    """A request a model's runner serves: it may carry a deadline."""

    deadline_ms: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        deadline = self.deadline_ms
        if deadline is not None:
            if not (is_number(deadline) and 0 < deadline <= MAX_DEADLINE_MS):
                raise BadRequest(
                    f"'deadline_ms' must be a number above 0 and at most {MAX_DEADLINE_MS}"
                )
            object.__setattr__(self, "deadline_ms", float(deadline))


@dataclass(frozen=True, kw_only=True)
class Cancel(Request):
    """``cancel``: stop the request ``target`` sent earlier on the same connection."""

    target: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        if valid_id(self.target) is None:
            raise BadRequest("'target' must be the unsigned 64-bit id of the request to cancel")


def valid_path(value: Any) -> TypeGuard[str]:
    """A file path a client may name: a non-empty string the OS can take (no NUL byte)."""
    return type(value) is str and bool(value) and "\0" not in value


def check_bool(value: Any, key: str) -> None:
    if type(value) is not bool:
        raise BadRequest(f"'{key}' must be a boolean")
