"""One error hierarchy for the daemon and its clients.

Every error that can reach a client carries a stable wire ``code``; the daemon turns errors into
replies in exactly one place (``server``), and the client turns error replies back into the same
classes, so ``except BusyError`` works on both sides of the socket.
"""

from __future__ import annotations


class EdgedError(Exception):
    """Base of all edged errors; ``code`` is the stable identifier sent on the wire."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(EdgedError):
    """The message is not a valid request: not msgpack, missing fields, bad types, limits."""

    code = "BAD_REQUEST"


class UnsupportedVersion(EdgedError):
    """The request speaks a protocol version this daemon does not."""

    code = "UNSUPPORTED_VERSION"


class UnknownOp(EdgedError):
    code = "UNKNOWN_OP"


class FrameMismatch(EdgedError):
    """Tensor frames disagree with the header: count, or byte length vs dtype and shape."""

    code = "FRAME_MISMATCH"


class TooLarge(EdgedError):
    code = "TOO_LARGE"


class UnknownModel(EdgedError):
    code = "UNKNOWN_MODEL"


class UnknownCollection(EdgedError):
    """No collection of that name is declared."""

    code = "UNKNOWN_COLLECTION"


class OpNotSupported(EdgedError):
    """The model does not serve this op: ``generate`` on an ONNX model, ``infer`` on a GGUF one."""

    code = "OP_NOT_SUPPORTED"


class ContextOverflow(EdgedError):
    """Prompt tokens plus ``max_tokens`` (or a text to embed) exceed the model's ``n_ctx``."""

    code = "CONTEXT_OVERFLOW"


class UnknownRequest(EdgedError):
    """``cancel`` names an id that is neither queued nor running for this connection."""

    code = "UNKNOWN_REQUEST"


class Cancelled(EdgedError):
    """An ``embed`` request was cancelled before its result was ready (a cancelled ``generate``
    ends normally instead, with ``finish_reason`` "cancelled" and the text so far)."""

    code = "CANCELLED"


class InputMismatch(EdgedError):
    """Input names differ from the model's: one is missing or one is not the model's."""

    code = "INPUT_MISMATCH"


class DtypeMismatch(EdgedError):
    code = "DTYPE_MISMATCH"


class ShapeMismatch(EdgedError):
    code = "SHAPE_MISMATCH"


class BusyError(EdgedError):
    """The model's admission queue is full; retry later."""

    code = "BUSY"


class BudgetExceeded(EdgedError):
    """The model does not fit in the memory budget even after evicting idle models."""

    code = "BUDGET_EXCEEDED"


class SwapInProgress(BusyError):
    """A swap or rollback of this model is already running; retry once it is done."""


class SwapRejected(EdgedError):
    """The new version failed validation (interface, warm-up, golden vectors); the old one
    keeps serving."""

    code = "SWAP_REJECTED"


class Unhealthy(EdgedError):
    """An installed version failed its health gate on live traffic (errors or latency) and
    was rolled back."""

    code = "UNHEALTHY"


class BadBundle(EdgedError):
    """A model bundle is malformed, incomplete, tampered with, or not for this device."""

    code = "BAD_BUNDLE"


class BadSignature(EdgedError):
    """A bundle's signature is missing, invalid, or by a key this device does not trust."""

    code = "BAD_SIGNATURE"


class DeadlineExceeded(EdgedError):
    """The request's deadline passed before its run could start."""

    code = "DEADLINE_EXCEEDED"


class RunFailed(EdgedError):
    """The backend raised while running the model (bad values, not bad shapes)."""

    code = "RUN_FAILED"


class BadRegion(EdgedError):
    """A shared-memory region is unusable: its fd is not a memfd sealed against shrinking, it
    is empty, or a tensor does not fit in it where a request places it."""

    code = "BAD_REGION"


class UnknownRegion(EdgedError):
    """A request names a region that is not registered, or that another connection registered."""

    code = "UNKNOWN_REGION"


class RegionLimit(EdgedError):
    """A region would take its connection past ``server.max_regions``, or the daemon's mapped
    regions past ``server.max_region_mb``."""

    code = "REGION_LIMIT"


class ShuttingDown(EdgedError):
    code = "SHUTTING_DOWN"


class InternalError(EdgedError):
    code = "INTERNAL"


class ModelLoadError(EdgedError):
    """A model file could not be loaded (missing, corrupt, unsupported operator)."""

    code = "LOAD_FAILED"


class AlreadyRunning(EdgedError):
    """Another daemon holds this runtime directory's sockets."""

    code = "ALREADY_RUNNING"


class StoreError(EdgedError):
    """A model store entry is missing or unreadable."""

    code = "STORE"


class ClientTimeout(EdgedError):
    """Raised by the client alone: no reply within the timeout (daemon down or message refused).
    Its subclasses say why no reply can come, so code that retries on timeouts retries them too."""

    code = "TIMEOUT"


class NoDaemon(ClientTimeout):
    """Raised by the client alone: nothing listens at an IPC endpoint (no socket file there, or
    one left behind by a daemon that is gone)."""

    code = "NO_DAEMON"


class SocketAccessDenied(ClientTimeout):
    """Raised by the client alone: this user may not open an IPC socket (or a directory above
    it); the message names the path, its mode, owner and group."""

    code = "ACCESS_DENIED"


class ConfigError(EdgedError):
    """The configuration is invalid; the message names the file and the key."""

    code = "CONFIG"


ERRORS_BY_CODE: dict[str, type[EdgedError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnsupportedVersion,
        UnknownOp,
        FrameMismatch,
        TooLarge,
        UnknownModel,
        UnknownCollection,
        OpNotSupported,
        ContextOverflow,
        UnknownRequest,
        Cancelled,
        InputMismatch,
        DtypeMismatch,
        ShapeMismatch,
        BusyError,
        BudgetExceeded,
        SwapRejected,
        Unhealthy,
        BadBundle,
        BadSignature,
        DeadlineExceeded,
        RunFailed,
        BadRegion,
        UnknownRegion,
        RegionLimit,
        ShuttingDown,
        InternalError,
        ModelLoadError,
        ConfigError,
        ClientTimeout,
    )
}


def error_from_code(code: str, message: str) -> EdgedError:
    """Rebuild the typed error for a wire code; unknown codes (a newer daemon) stay generic."""
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        err = EdgedError(message)
        err.code = code
        return err
    return cls(message)
