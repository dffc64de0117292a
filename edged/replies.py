"""Where one request's replies go, and the one place they become wire frames.

The ops and the model runners say what to answer (result keys and output tensors, a stream
piece, an error); a ``ReplyTo`` made for the request when it was decoded turns that into frames
(adding the request's id and trace) and hands them to its connection. Nothing else encodes a
reply, so a new op or runner cannot get the envelope wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from edged import protocol
from edged.errors import EdgedError
from edged.logsetup import log_error_reply

#: an output's dtype and shape, a dimension ``None`` where the run decides it
OutputShape = tuple[np.dtype[Any], tuple[int | None, ...]]
#: sends one message's frames; ``False`` when it was dropped (the client has gone or stopped
#: reading)
FrameSink = Callable[[list[Any]], bool]


class ReplyTo:
    __slots__ = ("_locate", "_send", "request_id", "trace")

    #: whether ``place`` may give a destination: a run asks only when it is so
    places_outputs = False

    def __init__(self, send: FrameSink, request_id: int | None, trace: str | None) -> None:
        self._send = send
        self.request_id = request_id
        self.trace = trace
        #: which outputs were written into the client's regions (and so get no frame)
        self._locate: protocol.Locate | None = None

    def ok(
        self,
        fields: dict[str, Any],
        outputs: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ) -> bool:
        """A success reply (or, with ``more``, a stream piece): ``fields`` are the op's result
        keys; the request's trace is added. Outputs that cannot be sent become the error."""
        if self.trace is not None:
            fields["trace"] = self.trace
        try:
            frames = protocol.encode_reply(self.request_id, fields, outputs, self._locate)
        except EdgedError as exc:  # an output of a dtype the wire has no name for
            log_error_reply(exc.code, exc.message, trace=self.trace, request_id=self.request_id)
            return self.fail(exc)
        return self._send(frames)

    def place(self, outputs: Mapping[str, OutputShape]) -> dict[str, np.ndarray[Any, Any]]:
        """Where the run itself is to write outputs (views on a client's shared memory), given
        every output's dtype and shape (``None`` where not known before the run); the rest
        are returned, and sent, as usual. Asked only when ``places_outputs``."""
        return {}

    def fail(self, error: EdgedError) -> bool:
        """An error reply."""
        return self._send(protocol.encode_error(self.request_id, error, self.trace))
