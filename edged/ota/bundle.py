"""The model bundle: one tar archive that a fleet's OTA agent carries to a device (docs/OTA.md).

Members, in this order: ``manifest.json`` (what the bundle installs, each file's size and
sha256), ``manifest.sig`` (a detached Ed25519 signature over the manifest's bytes, with the id
of the key that made it), then the files under ``files/``. The signature comes before the data,
so a device rejects an untrusted bundle before it writes a byte of model. Extraction checks
every member against the signed manifest: no absolute paths, ``..``, links or devices, no file
missing or extra, sizes and hashes exact, nothing over the size limit.

Whatever is read before the signature is checked comes from anyone, so every such read is
bounded: the manifest and the signature by their size (checked in the tar header, before a
byte of them is read), and JSON nested too deep for ``json`` is refused; tar's own extended
headers (which ``tarfile`` reads whole, and chains by recursion) by size and number. Files are
only ever streamed, in chunks: ``sign`` too copies them from the old archive to the new one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import platform
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from edged import __version__, faults
from edged.errors import BadBundle, BadSignature, EdgedError, TooLarge
from edged.ota.keys import TrustedKeys, key_id, load_private
from edged.store import fsync_dir, sha256_of

FORMAT = "edged-bundle/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FILES = "files/"
#: what a bundle installs: a model version, or a collection's snapshot (a SQLite database)
KINDS = ("model", "collection")
BACKENDS = {"model": ("onnx", "gguf"), "collection": ("sqlite",)}
ROLES = {"model": ("model", "golden", "pipeline", "reference"), "collection": ("collection",)}
MAX_MANIFEST_BYTES = 1 << 20
#: a signature is 64 bytes, its JSON about 130: anything larger is not one
MAX_SIGNATURE_BYTES = 4096
#: one extended tar header (a PAX record set, a GNU long name); a bundle's need a few hundred
MAX_EXTENDED_HEADER_BYTES = 64 << 10
#: extended headers chained before one member
MAX_EXTENDED_HEADERS = 4
#: the highest version: a store directory name, so bounded
MAX_VERSION = 10**18 - 1
#: what a bundle file may hold beyond its files: the manifest, the signature, tar's headers,
#: padding and end-of-archive records
FRAMING_BYTES = MAX_MANIFEST_BYTES + (1 << 20)
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BundleFile:
    path: str
    size: int
    sha256: str
    role: str = "model"


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    backend: str
    files: tuple[BundleFile, ...]
    #: the oldest edged that can install it
    min_edged: str = "0.0.0"
    #: machine types (``platform.machine()``) it is for; empty means any
    architectures: tuple[str, ...] = ()
    created: str = ""
    format: str = FORMAT
    #: "model", or "collection": ``name`` is then a declared collection, and the one file its
    #: snapshot
    kind: str = "model"

    @property
    def model(self) -> BundleFile:
        """The model file; a collection bundle's snapshot."""
        main_role = ROLES[self.kind][0]
        return next(f for f in self.files if f.role == main_role)

    @property
    def golden(self) -> BundleFile | None:
        return next((f for f in self.files if f.role == "golden"), None)

    @property
    def pipeline(self) -> BundleFile | None:
        return next((f for f in self.files if f.role == "pipeline"), None)

    @property
    def reference(self) -> BundleFile | None:
        return next((f for f in self.files if f.role == "reference"), None)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        if self.kind == "model":  # a model bundle stays readable by an edged without kinds
            del data["kind"]
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def parse(cls, raw: bytes) -> Manifest:
        data = _load_json(raw, BadBundle, "the manifest")
        try:
            files = tuple(BundleFile(**entry) for entry in data.pop("files"))
            manifest = cls(
                files=files,
                architectures=tuple(data.pop("architectures", ())),
                **data,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise BadBundle(f"the manifest is not valid: {exc}") from None
        manifest.check()
        return manifest

    def check(self) -> None:
        """The manifest's own consistency (what it says about the device comes later)."""
        if self.format != FORMAT:
            raise BadBundle(f"bundle format {self.format!r}; this edged reads {FORMAT}")
        text = [self.name, self.min_edged, self.created, self.kind, *self.architectures]
        text += [value for entry in self.files for value in (entry.path, entry.sha256, entry.role)]
        if not all(isinstance(value, str) for value in text):
            raise BadBundle("the manifest's names, versions, hashes and roles must be strings")
        if self.kind not in KINDS:
            raise BadBundle(f"kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not _FILE_NAME.fullmatch(self.name):
            raise BadBundle(f"{self.kind} name {self.name!r} is not a valid {self.kind} name")
        if type(self.version) is not int or not 1 <= self.version <= MAX_VERSION:
            raise BadBundle(
                f"version must be an integer from 1 to {MAX_VERSION}, got {self.version!r}"
            )
        backends, roles = BACKENDS[self.kind], ROLES[self.kind]
        if self.backend not in backends:
            raise BadBundle(
                f"a {self.kind} bundle's backend {self.backend!r} is not one of "
                f"{', '.join(backends)}"
            )
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise BadBundle("the manifest lists a file twice")
        for entry in self.files:
            if not _FILE_NAME.fullmatch(entry.path):
                raise BadBundle(f"file name {entry.path!r} is not a plain file name")
            if entry.role not in roles or type(entry.size) is not int or entry.size < 0:
                raise BadBundle(f"file {entry.path!r}: bad role or size")
            if not re.fullmatch(r"[0-9a-f]{64}", entry.sha256):
                raise BadBundle(f"file {entry.path!r}: sha256 must be 64 hex digits")
        if [f.role for f in self.files].count(roles[0]) != 1:
            raise BadBundle(f"a {self.kind} bundle holds exactly one {roles[0]} file")
        for role, what in (
            ("golden", "golden vectors file"),
            ("pipeline", "pipeline file"),
            ("reference", "drift reference"),
        ):
            if [f.role for f in self.files].count(role) > 1:
                raise BadBundle(f"a bundle holds at most one {what}")

    def check_device(self) -> None:
        """Refuse a bundle made for another machine type or a newer edged."""
        machine = platform.machine()
        if self.architectures and machine not in self.architectures:
            raise BadBundle(
                f"bundle is for {', '.join(self.architectures)}; this device is {machine}"
            )
        if _version_tuple(self.min_edged) > _version_tuple(__version__):
            raise BadBundle(f"bundle needs edged {self.min_edged} or newer; this is {__version__}")


def build(
    out: Path,
    name: str,
    version: int,
    model: Path,
    *,
    backend: str | None = None,
    golden: Path | None = None,
    pipeline: Path | None = None,
    reference: Path | None = None,
    min_edged: str = "0.0.0",
    architectures: tuple[str, ...] = (),
    kind: str = "model",
) -> Manifest:
    """Write an unsigned bundle at ``out``; ``sign`` it before shipping. A ``collection`` bundle
    carries ``model``, a collection's snapshot (``edgectl collections snapshot``)."""
    if kind == "collection" and (golden or pipeline or reference):
        raise BadBundle("a collection bundle carries the collection's snapshot and nothing else")
    sources = [(model, ROLES[kind][0])] + [
        (path, role)
        for path, role in ((golden, "golden"), (pipeline, "pipeline"), (reference, "reference"))
        if path
    ]
    files = tuple(
        BundleFile(source.name, source.stat().st_size, sha256_of(source), role)
        for source, role in sources
    )
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if kind == "collection":
        backend = "sqlite"
    backend = backend or ("gguf" if model.suffix.lower() == ".gguf" else "onnx")
    manifest = Manifest(name, version, backend, files, min_edged, architectures, created, kind=kind)
    manifest.check()
    _write(out, manifest.to_bytes(), None, _local_files([source for source, _ in sources]))
    return manifest


def sign(bundle: Path, private_key: Path) -> str:
    """Add (or replace) the bundle's signature; returns the signing key's id. The files are
    copied from the old archive to the new one in chunks, never whole in memory."""
    key = load_private(private_key)
    with _open(bundle) as old:
        manifest_bytes, _, pending = _head(old)
        Manifest.parse(manifest_bytes)
        signature = {
            "key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(manifest_bytes)).decode(),
        }
        try:
            _write(bundle, manifest_bytes, signature, _archived_files(old, pending))
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise BadBundle(f"cannot rewrite {bundle}: {exc}") from None
    return str(signature["key_id"])


@dataclass(frozen=True)
class Verified:
    """An open bundle whose signature checked out: its manifest, trusted, and its files,
    not read yet (a stream: read once, in order)."""

    manifest: Manifest
    archive: tarfile.TarFile
    pending: list[tarfile.TarInfo]

    def extract(self, staging: Path, max_bytes: int) -> None:
        """Write the files into ``staging`` (which must exist, empty), checking each against
        the manifest as it streams; fsynced when this returns."""
        expected = {f.path: f for f in self.manifest.files}
        if sum(f.size for f in self.manifest.files) > max_bytes:
            raise BadBundle(f"bundle files total more than the limit of {max_bytes} bytes")
        seen: set[str] = set()
        for member in _members(self.archive, self.pending):
            name = _file_name(member)
            entry = expected.get(name)
            if entry is None or name in seen:
                raise BadBundle(f"member {member.name!r} is not in the signed manifest")
            seen.add(name)
            _extract_file(self.archive, member, entry, staging / name)
            faults.point("ota.extracting")
        missing = expected.keys() - seen
        if missing:
            raise BadBundle(f"file(s) missing from the bundle: {', '.join(sorted(missing))}")
        fsync_dir(staging)


@contextlib.contextmanager
def verified(bundle: Path, trusted: TrustedKeys) -> Iterator[Verified]:
    """Open ``bundle`` and check its signature against the trusted keys: what an install
    decides on before it writes a byte of model."""
    with _open(bundle) as archive:
        manifest_bytes, signature, pending = _head(archive)
        _check_signature(manifest_bytes, signature, trusted)
        yield Verified(Manifest.parse(manifest_bytes), archive, pending)


def verify(bundle: Path, trusted: TrustedKeys) -> Manifest:
    """Check the signature against the trusted keys; the manifest it vouches for."""
    with verified(bundle, trusted) as opened:
        return opened.manifest


def extract(bundle: Path, trusted: TrustedKeys, staging: Path, max_bytes: int) -> Manifest:
    """Verify, then write the bundle's files into ``staging`` (``Verified.extract``)."""
    with verified(bundle, trusted) as opened:
        opened.extract(staging, max_bytes)
        return opened.manifest


def inspect(bundle: Path) -> dict[str, Any]:
    """What the bundle says, without trusting it."""
    with _open(bundle) as archive:
        manifest_bytes, signature, _ = _head(archive)
    manifest = Manifest.parse(manifest_bytes)
    return {
        "manifest": asdict(manifest),
        "signed_by": signature.get("key_id") if signature else None,
    }


def archive_limit(max_bytes: int) -> int:
    """The largest bundle file whose files may total ``max_bytes``."""
    return max_bytes + FRAMING_BYTES


def check_file_size(bundle: Path, max_bytes: int) -> None:
    """Refuse a file too large to be a bundle whose files total at most ``max_bytes``,
    before reading a byte of it."""
    try:
        size = bundle.stat().st_size
    except (OSError, ValueError) as exc:
        raise BadBundle(f"{bundle} is not a readable bundle: {exc}") from None
    limit = archive_limit(max_bytes)
    if size > limit:
        raise TooLarge(
            f"{bundle} is {size} bytes, over this device's limit of {limit} bytes for a bundle "
            f"(ota.max_bundle_mb = {max_bytes >> 20}, plus {FRAMING_BYTES} bytes of manifest "
            f"and archive framing)"
        )


# -- reading ----------------------------------------------------------------------------------


class _Header(tarfile.TarInfo):
    """A member's header, read with bounds: ``tarfile`` reads an extended header (PAX records,
    a GNU long name) whole into memory, chains the next header by recursion, and collects
    sparse maps block by block; a bundle needs none of that at any size."""

    def _proc_member(self, archive: Any) -> Any:  # tarfile's documented hook for subclasses
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise BadBundle(f"member {self.name!r} is a sparse file, not a plain file")
        if self.type in _EXTENDED:
            if self.size > MAX_EXTENDED_HEADER_BYTES:
                raise BadBundle(
                    f"an extended tar header of {self.size} bytes; at most "
                    f"{MAX_EXTENDED_HEADER_BYTES} are read"
                )
            archive.extended_headers += 1
            if archive.extended_headers > MAX_EXTENDED_HEADERS:
                raise BadBundle(f"more than {MAX_EXTENDED_HEADERS} extended tar headers in a row")
        else:
            archive.extended_headers = 0
        parent: Any = super()
        return parent._proc_member(archive)


class _Archive(tarfile.TarFile):
    tarinfo = _Header
    #: extended headers read since the last member's own header (``_Header``)
    extended_headers = 0


_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _open(bundle: Path) -> tarfile.TarFile:
    try:
        return _Archive.open(bundle, mode="r|")  # a stream: members are read in order, once
    except (OSError, tarfile.TarError) as exc:
        raise BadBundle(f"{bundle} is not a readable bundle: {exc}") from None


def _head(archive: tarfile.TarFile) -> tuple[bytes, dict[str, Any] | None, list[tarfile.TarInfo]]:
    """The manifest's bytes and the signature, which must be the first members, and the
    member read after the manifest when it was not a signature (a stream cannot step back)."""
    first = _next(archive)
    if first is None or first.name != MANIFEST or not first.isfile():
        raise BadBundle(f"a bundle starts with {MANIFEST}")
    if first.size > MAX_MANIFEST_BYTES:
        raise BadBundle(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes")
    manifest_bytes = _read_member(archive, first)
    second = _next(archive)
    if second is None or second.name != SIGNATURE:
        return manifest_bytes, None, [] if second is None else [second]
    if second.size > MAX_SIGNATURE_BYTES:
        raise BadSignature(
            f"{SIGNATURE} is {second.size} bytes; a signature is at most {MAX_SIGNATURE_BYTES}"
        )
    signature = _load_json(_read_member(archive, second), BadSignature, SIGNATURE)
    if not isinstance(signature, dict):
        raise BadSignature(f"{SIGNATURE} is not valid: not a JSON object")
    return manifest_bytes, signature, []


def _load_json(raw: bytes, error: type[EdgedError], what: str) -> Any:
    """``raw`` parsed, or ``error``. ``json`` recurses once per level of nesting: JSON nested
    too deep for it is refused as such (its size is bounded before it is read)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise error(f"{what} nests too deep") from None
    except ValueError as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None


def _check_signature(
    manifest: bytes, signature: dict[str, Any] | None, trusted: TrustedKeys
) -> None:
    if signature is None:
        raise BadSignature("the bundle is not signed")
    try:
        signer = str(signature["key_id"])
        raw = base64.b64decode(signature["signature"], validate=True)
    except (KeyError, TypeError, ValueError):
        raise BadSignature(f"{SIGNATURE} is not valid") from None
    trusted.verify(signer, raw, manifest)


def _members(archive: tarfile.TarFile, pending: list[tarfile.TarInfo]) -> Any:
    yield from pending
    while (member := _next(archive)) is not None:
        yield member


def _next(archive: tarfile.TarFile) -> tarfile.TarInfo | None:
    try:
        return archive.next()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BadBundle(f"the bundle is damaged or truncated: {exc}") from None


def _file_name(member: tarfile.TarInfo) -> str:
    name = member.name
    if not name.startswith(FILES) or "/" in name[len(FILES) :] or name in (FILES, f"{FILES}."):
        raise BadBundle(f"member {name!r} is outside {FILES} or not a plain file name")
    if not member.isreg():
        raise BadBundle(f"member {name!r} is a link, device or directory, not a file")
    return name[len(FILES) :]


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    stream = archive.extractfile(member)
    if stream is None:
        raise BadBundle(f"member {member.name!r} is not a file")
    try:
        data = stream.read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BadBundle(f"the bundle is damaged or truncated: {exc}") from None
    if len(data) != member.size:
        raise BadBundle(f"the bundle is truncated inside {member.name!r}")
    return data


def _extract_file(
    archive: tarfile.TarFile, member: tarfile.TarInfo, entry: BundleFile, target: Path
) -> None:
    if member.size != entry.size:
        raise BadBundle(
            f"file {entry.path!r} is {member.size} bytes; the manifest says {entry.size}"
        )
    stream = archive.extractfile(member)
    assert stream is not None  # a regular file, checked above
    digest, written = hashlib.sha256(), 0
    with target.open("xb") as out:
        try:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                written += len(chunk)
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise BadBundle(f"the bundle is damaged or truncated: {exc}") from None
        out.flush()
        os.fsync(out.fileno())
    if written != entry.size:
        raise BadBundle(f"the bundle is truncated inside {entry.path!r}")
    if digest.hexdigest() != entry.sha256:
        raise BadBundle(f"file {entry.path!r} does not match its sha256 in the manifest")


# -- writing ----------------------------------------------------------------------------------


def _write(
    out: Path,
    manifest_bytes: bytes,
    signature: dict[str, Any] | None,
    files: Iterable[tuple[str, int, IO[bytes]]],
) -> None:
    """Write the archive to a temporary name, then rename: never a half-written bundle.
    ``files`` are (name, size, stream), each copied through in chunks."""
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as archive:
            _add(archive, MANIFEST, len(manifest_bytes), io.BytesIO(manifest_bytes))
            if signature is not None:
                data = json.dumps(signature).encode()
                _add(archive, SIGNATURE, len(data), io.BytesIO(data))
            for name, size, stream in files:
                _add(archive, FILES + name, size, stream)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out)


def _add(archive: tarfile.TarFile, name: str, size: int, stream: IO[bytes]) -> None:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    archive.addfile(info, stream)


def _local_files(sources: list[Path]) -> Iterator[tuple[str, int, IO[bytes]]]:
    for source in sources:
        with source.open("rb") as stream:
            yield source.name, os.fstat(stream.fileno()).st_size, stream


def _archived_files(
    archive: tarfile.TarFile, pending: list[tarfile.TarInfo]
) -> Iterator[tuple[str, int, IO[bytes]]]:
    """The file members of a bundle being read, each a stream over its data."""
    for member in _members(archive, pending):
        name = _file_name(member)
        stream = archive.extractfile(member)
        assert stream is not None  # a regular file, checked by _file_name
        yield name, member.size, stream


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])
