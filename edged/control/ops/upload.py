"""``upload``: append a chunk of a bundle (the frame after the header) at ``offset``, or,
without one, say how much of it has arrived: where a client that lost its connection goes on.
The reply to the chunk that completes it comes once the whole bundle is verified."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edged.errors import BadRequest, FrameMismatch
from edged.opunit import Op
from edged.protocol import Buffer, Limits, Request, given

if TYPE_CHECKING:
    from edged.control.service import ControlService
    from edged.replies import ReplyTo


@dataclass(frozen=True, kw_only=True)
class Upload(Request):
    sha256: str = ""
    size: int = 0
    offset: int | None = None
    #: the chunk: raw bytes in a frame of its own, since the header's size is bounded far
    #: below a chunk's
    data: Buffer | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sha256, str) or type(self.size) is not int or self.size < 1:
            raise BadRequest("'sha256' must be a string and 'size' a positive integer")
        if self.data is not None:
            if type(self.offset) is not int or self.offset < 0:
                raise BadRequest("a chunk needs its 'offset', a non-negative integer")
        elif self.offset is not None:
            raise BadRequest("'offset' goes with a chunk (the frame after the header)")

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        return frozenset({"sha256", "size", "offset"})

    @classmethod
    def from_wire(
        cls,
        envelope: dict[str, Any],
        header: Mapping[str, Any],
        frames: Sequence[Buffer],
        limits: Limits,
    ) -> Upload:
        if len(frames) > 1:
            raise FrameMismatch(f"op 'upload' takes one data frame at most, got {len(frames)}")
        return cls(**envelope, **given(header), data=frames[0] if frames else None)


def upload(control: ControlService, request: Upload, reply: ReplyTo, peer: bytes) -> None:
    uploads = control.ota().uploads
    chunk = None if request.data is None else (request.offset or 0, request.data)
    control.run(request, reply, uploads.receive(request.sha256, request.size, chunk))


OP = Op("upload", Upload, upload)
