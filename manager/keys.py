"""API keys: generation, parsing, salted scrypt hashes. Only the hash is ever stored.

A key reads `vb_<prefix>_<secret>`: the prefix (8 alphanumerics, stored in clear and indexed) finds
the key's row without scanning; the secret (32 random bytes, url-safe base64, 43 chars) is checked
against its salted scrypt hash with a constant-time comparison.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

KEY_SCHEME = "vb"
PREFIX_LENGTH = 8
SECRET_BYTES = 32
SALT_BYTES = 16
DIGEST_BYTES = 32
_PREFIX_ALPHABET = string.ascii_letters + string.digits
_KEY_RE = re.compile(r"vb_([A-Za-z0-9]{8})_([A-Za-z0-9_-]{43})")
KEY_LENGTH = 3 + PREFIX_LENGTH + 1 + 43


@dataclass(frozen=True)
class ScryptParams:
    n: int
    r: int
    p: int


@dataclass(frozen=True)
class IssuedKey:
    """A fresh key and what is stored of it. `key` is shown to its owner once, never stored."""

    key: str
    prefix: str
    salt: bytes
    digest: bytes
    params: ScryptParams

    def __repr__(self) -> str:  # never print the secret by accident
        return f"IssuedKey(prefix={self.prefix!r}, params={self.params})"


def new_prefix() -> str:
    return "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))


def issue_key(params: ScryptParams) -> IssuedKey:
    """A new random key with its salted hash."""
    prefix = new_prefix()
    key = f"{KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(SECRET_BYTES)}"
    salt = secrets.token_bytes(SALT_BYTES)
    return IssuedKey(key, prefix, salt, hash_key(key, salt, params), params)


def with_new_prefix(issued: IssuedKey) -> IssuedKey:
    """The same kind of key under another prefix (after a prefix collision); re-hashed."""
    secret = issued.key.split("_", 2)[2]
    prefix = new_prefix()
    key = f"{KEY_SCHEME}_{prefix}_{secret}"
    return IssuedKey(key, prefix, issued.salt, hash_key(key, issued.salt, issued.params), issued.params)


def parse_prefix(key: object) -> str | None:
    """The key's prefix, or None when the key is not well formed."""
    if not isinstance(key, str) or len(key) != KEY_LENGTH:
        return None
    match = _KEY_RE.fullmatch(key)
    return match.group(1) if match else None


def hash_key(key: str, salt: bytes, params: ScryptParams) -> bytes:
    maxmem = 128 * params.r * (params.n + params.p + 2) + (1 << 20)
    return hashlib.scrypt(key.encode(), salt=salt, n=params.n, r=params.r, p=params.p,
                          maxmem=maxmem, dklen=DIGEST_BYTES)


def verify_key(key: str, salt: bytes, digest: bytes, params: ScryptParams) -> bool:
    """Constant-time check of a key against its stored salted hash."""
    return hmac.compare_digest(hash_key(key, salt, params), digest)


_DUMMY_SALT = bytes(SALT_BYTES)


def burn_hash(params: ScryptParams) -> None:
    """Spend one hash's time, so an unknown prefix is refused as slowly as a wrong secret."""
    hash_key("vb_" + "0" * (KEY_LENGTH - 3), _DUMMY_SALT, params)
