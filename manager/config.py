"""Configs of the manager. Frozen, validated at construction with clear ValueErrors."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RegistryConfig:
    """Where the tenant registry lives and how API keys are hashed.

    data_dir: the server's data directory; created if missing. The database is data_dir/filename.
    scrypt_n, scrypt_r, scrypt_p: scrypt cost of the API-key hash. Keys are 256-bit random secrets, so
        the hash cannot be brute-forced whatever its cost; the KDF is only defense in depth against a
        leaked database, and must stay cheap: every registration and every uncached authentication pays
        one hash, and 10,000 registrations must take well under a minute. Measured on a 2-core Xeon:
        n=2**10, r=8 (1 MiB) ~2 ms per hash; n=2**12 ~8 ms (10,000 registrations ~95 s). Each key row
        records its own parameters, so changing them here affects new keys only.
    busy_timeout_ms: how long a connection waits for another writer's lock before failing.
    """

    data_dir: str = "./var"
    filename: str = "registry.sqlite3"
    scrypt_n: int = 2**10
    scrypt_r: int = 8
    scrypt_p: int = 1
    busy_timeout_ms: int = 10_000

    def __post_init__(self) -> None:
        if not isinstance(self.data_dir, str) or not self.data_dir:
            raise ValueError(f"data_dir must be a non-empty path, got {self.data_dir!r}")
        if not self.filename or Path(self.filename).name != self.filename or self.filename in (".", ".."):
            raise ValueError(f"filename must be a bare file name without directories, got {self.filename!r}")
        n = self.scrypt_n
        if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n & (n - 1):
            raise ValueError(f"scrypt_n must be a power of two >= 2, got {n!r}")
        for name in ("scrypt_r", "scrypt_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if 128 * self.scrypt_r * (n + self.scrypt_p) > 2**30:
            raise ValueError(f"scrypt memory 128*r*(n+p) exceeds 1 GiB "
                             f"(n={n}, r={self.scrypt_r}, p={self.scrypt_p})")
        if isinstance(self.busy_timeout_ms, bool) or not isinstance(self.busy_timeout_ms, int) \
                or self.busy_timeout_ms < 0:
            raise ValueError(f"busy_timeout_ms must be an integer >= 0, got {self.busy_timeout_ms!r}")

    @property
    def path(self) -> Path:
        """The database file."""
        return Path(self.data_dir) / self.filename


@dataclass(frozen=True)
class StoreConfig:
    """Where the adapter store keeps its files.

    data_dir: the server's data directory; created if missing. Blobs live under data_dir/subdir.
    subdir: a relative directory name inside data_dir (no absolute path, no '..').
    """

    data_dir: str = "./var"
    subdir: str = "adapters"

    def __post_init__(self) -> None:
        if not isinstance(self.data_dir, str) or not self.data_dir:
            raise ValueError(f"data_dir must be a non-empty path, got {self.data_dir!r}")
        parts = Path(self.subdir).parts if isinstance(self.subdir, str) else ()
        if not parts or Path(self.subdir).is_absolute() or ".." in parts:
            raise ValueError(f"subdir must be a relative path inside data_dir (not absolute, no '..'), "
                             f"got {self.subdir!r}")

    @property
    def root(self) -> Path:
        """The store's root directory."""
        return Path(self.data_dir) / self.subdir


@dataclass(frozen=True)
class ResponseLimits:
    """The server's limits that bound the largest response a head can produce (checked at upload by
    vbert.heads.check_response_size): texts per request, tokens per text, bytes per gRPC message."""

    max_texts_per_request: int = 64
    max_tokens_per_text: int = 512
    max_message_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        for name in ("max_texts_per_request", "max_tokens_per_text", "max_message_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
