"""Ed25519 keys that sign model bundles, and the directory of keys a device trusts.

A signing key is a PKCS#8 PEM file (kept off the device); its public half is a small PEM file
that goes into the device's trusted-keys directory. Several may be trusted at once, which is
how a fleet rotates keys. A key is named in a signature by its id: the first 16 hex digits of
the SHA-256 of its raw public bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edged.errors import BadSignature

PRIVATE_SUFFIX = ".ed25519"
PUBLIC_SUFFIX = ".pub"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.ed25519 (private, mode 0600) and NAME.pub; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    private_path = directory / f"{name}{PRIVATE_SUFFIX}"
    public_path = directory / f"{name}{PUBLIC_SUFFIX}"
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
    public_path.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise BadSignature(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BadSignature(f"{path} is not an Ed25519 private key")
    return key


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys in a directory, by id."""

    directory: Path

    def load(self) -> dict[str, Ed25519PublicKey]:
        keys = {}
        for path in sorted(self.directory.glob(f"*{PUBLIC_SUFFIX}")):
            try:
                key = serialization.load_pem_public_key(path.read_bytes())
            except (OSError, ValueError):
                continue  # not a key: it cannot vouch for anything
            if isinstance(key, Ed25519PublicKey):
                keys[key_id(key)] = key
        return keys

    def verify(self, signer: str, signature: bytes, message: bytes) -> None:
        """Raise ``BadSignature`` unless a trusted key ``signer`` signed ``message``."""
        key = self.load().get(signer)
        if key is None:
            raise BadSignature(
                f"signed by key {signer}, which is not among the trusted keys in {self.directory}"
            )
        try:
            key.verify(signature, message)
        except InvalidSignature:
            raise BadSignature(
                f"the signature by key {signer} does not match the manifest"
            ) from None
