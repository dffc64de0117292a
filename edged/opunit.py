"""An op as one unit: its request type, its handler, whether its work is long, and how edgectl
offers it (as circus declares a command's keys, checks, execution and help in one class).

Each socket serves an ``OpTable``, an explicit dict from op names to units: adding an op is a
module that declares its ``Op`` and one line in its socket's table (``edged/ops`` for the
inference socket, ``edged/control/ops`` for the control socket).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from edged.errors import UnknownOp
from edged.protocol import COMMON_KEYS, Request
from edged.replies import ReplyTo

#: what an op's handler works with: the service of the socket that serves it
Ctx = TypeVar("Ctx")
R = TypeVar("R", bound=Request)
#: a reply's keys, as ``edgectl`` prints them
Fields = dict[str, Any]


@dataclass(frozen=True)
class Arg:
    """One command-line argument of a control command: ``argparse``'s ``add_argument``
    arguments; its dest is the header key it fills."""

    flags: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    #: a file the daemon opens: edgectl makes it absolute (and refuses a relative one for a
    #: remote daemon, whose files are elsewhere)
    device_path: bool = False


def arg(*flags: str, device_path: bool = False, **options: Any) -> Arg:
    return Arg(flags, options, device_path)


@dataclass(frozen=True)
class Op(Generic[Ctx, R]):
    """One op: what it takes (``request``, which checks itself), what it does (``handle``:
    answer through the ``ReplyTo``, or raise an ``EdgedError``), and for a control op, how
    edgectl offers it (no ``help``: not a command of its own)."""

    name: str
    request: type[R]
    handle: Callable[[Ctx, R, ReplyTo, bytes], None]
    #: its reply comes once long work is done (a load, a swap, an install): clients wait longer
    long_running: bool = False
    help: str | None = None
    args: tuple[Arg, ...] = ()
    #: the reply as text (default: indented JSON)
    format: Callable[[Fields], str] | None = None
    #: whether a reply that came back reports a failure inside (edgectl exits 1)
    failed: Callable[[Fields], bool] | None = None


class OpTable(Generic[Ctx]):
    """The ops one socket serves; ``elsewhere`` completes the message for an op that another
    socket serves (``"is served on the control socket, not here"``)."""

    def __init__(
        self, ops: Mapping[str, Op[Ctx, Any]], elsewhere: Mapping[str, str] | None = None
    ) -> None:
        for name, op in ops.items():
            if name != op.name:
                raise ValueError(f"op {op.name!r} is registered as {name!r}")
        self.ops = dict(ops)
        self._types = {
            name: (op.request, COMMON_KEYS | op.request.wire_keys()) for name, op in ops.items()
        }
        self._elsewhere = dict(elsewhere or {})

    def request_type(self, op: str) -> tuple[type[Request], frozenset[str]]:
        found = self._types.get(op)
        if found is not None:
            return found
        where = self._elsewhere.get(op)
        raise UnknownOp(
            f"op {op!r} {where}"
            if where
            else f"unknown op {op!r}; known: {', '.join(sorted(self.ops))}"
        )

    def handle(self, ctx: Ctx, request: Request, reply: ReplyTo, peer: bytes) -> None:
        """Run ``request``'s op (decoded by this table, so it is one of its ops)."""
        self.ops[request.op].handle(ctx, request, reply, peer)
