"""The collection ops' requests (``upsert``, ``search``, ``delete``, ``get``, ``count``), each
checking itself. Vectors travel as tensor frames, as ``infer``'s inputs do (``inputs``: one
tensor named ``vectors`` float32[n, dim], or ``vector`` float32[dim] for a search); texts to be
embedded by the collection's model travel as strings instead."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np

from edged.errors import BadRequest
from edged.protocol import Buffer, Limits, Request, decode_tensors, given, is_int

MAX_ITEMS = 1024
MAX_K = 1000
MAX_ID_CHARS = 256
#: a collection's name: as a model's
NAME = re.compile(r"[A-Za-z0-9._\-]{1,64}")
R = TypeVar("R", bound="CollectionRequest")
Array = np.ndarray[Any, Any]


def _strings(value: Any, key: str, limit: int, max_chars: int | None = None) -> tuple[str, ...]:
    if (
        not isinstance(value, (list, tuple))
        or not 0 < len(value) <= limit
        or not all(isinstance(s, str) and s for s in value)
        or (max_chars is not None and any(len(s) > max_chars for s in value))
    ):
        longest = f" of at most {max_chars} characters" if max_chars else ""
        raise BadRequest(f"'{key}' must be an array of 1 to {limit} non-empty strings{longest}")
    return tuple(value)


@dataclass(frozen=True, kw_only=True)
class CollectionRequest(Request):
    collection: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.collection, str) or not NAME.fullmatch(self.collection):
            raise BadRequest("'collection' must be a collection's name")

    @classmethod
    def from_wire(
        cls: type[R],
        envelope: dict[str, Any],
        header: Mapping[str, Any],
        frames: Sequence[Buffer],
        limits: Limits,
    ) -> R:
        values = given(header)
        specs = values.pop("inputs", None)
        request = cls(**envelope, **values)
        if specs is not None or frames:
            request.take(decode_tensors(specs if specs is not None else [], frames, limits))
        return request

    def take(self, tensors: dict[str, Array]) -> None:
        """The request's tensors, checked (while it is being made: it is frozen after)."""
        raise BadRequest(f"'{self.op}' takes no tensors")


@dataclass(frozen=True, kw_only=True)
class Upsert(CollectionRequest):
    """Items by id: vectors (a tensor ``vectors`` [n, dim]) or texts, and metadata maps."""

    ids: tuple[str, ...] = ()
    texts: tuple[str, ...] | None = None
    metadata: tuple[Mapping[str, Any], ...] | None = None
    tensors: Mapping[str, Array] = field(default_factory=dict)

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        return frozenset({"collection", "ids", "texts", "metadata", "inputs"})

    def __post_init__(self) -> None:
        super().__post_init__()
        ids = _strings(self.ids, "ids", MAX_ITEMS, MAX_ID_CHARS)
        if len(set(ids)) != len(ids):
            raise BadRequest("'ids' must not repeat an id")
        object.__setattr__(self, "ids", ids)
        if self.texts is not None:
            object.__setattr__(self, "texts", _strings(self.texts, "texts", MAX_ITEMS))
        metadata = self.metadata
        if metadata is not None:
            if not isinstance(metadata, (list, tuple)) or not all(
                isinstance(m, Mapping) for m in metadata
            ):
                raise BadRequest("'metadata' must be an array of maps, one per id")
            object.__setattr__(self, "metadata", tuple(dict(m) for m in metadata))
        self._check_counts()

    def _check_counts(self) -> None:
        n = len(self.ids)
        if self.metadata is not None and len(self.metadata) != n:
            raise BadRequest(f"'metadata' has {len(self.metadata)} maps for {n} ids")
        if self.texts is not None and len(self.texts) != n:
            raise BadRequest(f"'texts' has {len(self.texts)} strings for {n} ids")

    def take(self, tensors: dict[str, Array]) -> None:
        vectors = tensors.get("vectors")
        if set(tensors) != {"vectors"} or vectors is None:
            raise BadRequest("'upsert' takes one tensor, named 'vectors'")
        if self.texts is not None:
            raise BadRequest("give 'texts' or a 'vectors' tensor, not both")
        if vectors.ndim != 2 or len(vectors) != len(self.ids):
            raise BadRequest(
                f"'vectors' must be [{len(self.ids)}, dim] (one row per id), "
                f"got {list(vectors.shape)}"
            )
        object.__setattr__(self, "tensors", {"vectors": as_vectors(vectors)})

    @property
    def vectors(self) -> Array | None:
        return self.tensors.get("vectors")


@dataclass(frozen=True, kw_only=True)
class Search(CollectionRequest):
    """The ``k`` nearest items to a vector (a tensor ``vector``) or a text, optionally only
    those whose metadata equals ``where``."""

    k: int = 10
    text: str | None = None
    where: Mapping[str, Any] | None = None
    tensors: Mapping[str, Array] = field(default_factory=dict)

    @classmethod
    def wire_keys(cls) -> frozenset[str]:
        return frozenset({"collection", "k", "text", "where", "inputs"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (is_int(self.k) and 1 <= self.k <= MAX_K):
            raise BadRequest(f"'k' must be an integer from 1 to {MAX_K}")
        if self.text is not None and not (isinstance(self.text, str) and self.text):
            raise BadRequest("'text' must be a non-empty string")
        if self.where is not None and not isinstance(self.where, Mapping):
            raise BadRequest("'where' must be a map of metadata fields to values")

    def take(self, tensors: dict[str, Array]) -> None:
        vector = tensors.get("vector")
        if set(tensors) != {"vector"} or vector is None:
            raise BadRequest("'search' takes one tensor, named 'vector'")
        if self.text is not None:
            raise BadRequest("give 'text' or a 'vector' tensor, not both")
        if vector.ndim == 2 and len(vector) == 1:
            vector = vector[0]
        elif vector.ndim != 1:
            raise BadRequest(f"'vector' must be [dim] or [1, dim], got {list(vector.shape)}")
        object.__setattr__(self, "tensors", {"vector": as_vectors(vector)})

    @property
    def vector(self) -> Array | None:
        return self.tensors.get("vector")


@dataclass(frozen=True, kw_only=True)
class Delete(CollectionRequest):
    ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "ids", _strings(self.ids, "ids", MAX_ITEMS, MAX_ID_CHARS))


@dataclass(frozen=True, kw_only=True)
class Get(Delete):
    """The items of ``ids`` that exist: ids and metadata, and their vectors as a tensor."""


@dataclass(frozen=True, kw_only=True)
class Count(CollectionRequest):
    pass


def as_vectors(value: Array) -> Array:
    """Rows of float32, whatever float type they came as."""
    if value.dtype.kind != "f":
        raise BadRequest(f"vectors must be floating point, got {value.dtype.name}")
    return cast(Array, np.ascontiguousarray(value, dtype=np.float32))
