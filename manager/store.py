"""The adapter store: content-addressed adapter files on local disk.

Layout under <data_dir>/adapters (StoreConfig.root):
  <sha[:2]>/<sha>.safetensors  every tensor of the artifact under a canonical name, float32, with the
                               artifact's config (kind, LoRA scales, bottleneck size, head spec) embedded
                               as safetensors metadata, so the sha covers all content, not only weights
  <sha[:2]>/<sha>.json         the same config plus num_tensors, num_bytes and sha256; its presence
                               marks the blob complete
sha = sha256 of the .safetensors bytes. Same content -> same bytes -> same sha: puts are idempotent.

The blob format (tensor names, embedded config) is manager.codec's.

Writes are atomic: a temporary file (.tmp-*) in the target directory, fsync, rename, fsync of the
directory; the safetensors first, then the JSON. Reads verify the checksum against the name and the
JSON, parse strictly and re-check finiteness: anything wrong is a CorruptAdapterError, never a result.
recover() at start-up removes temporary files, half-written blobs and blobs the registry does not keep.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path


from vbert.adapters import AdapterError, BackboneShape
from vbert.artifact import AdapterArtifact
from vbert.config import PoolConfig
from vbert.decoder_lora import DecoderAdapterLimits
from vbert.heads import DECODER
from vbert.pool import validate_artifact

from .codec import _embedded_content, _loads, _Problem, decode_artifact, encode_artifact
from .config import StoreConfig
from .errors import CorruptAdapterError, FailedPreconditionError, InvalidArgumentError, NotFoundError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
TENSOR_SUFFIX = ".safetensors"
CONFIG_SUFFIX = ".json"
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_SHARD_RE = re.compile(r"[0-9a-f]{2}")
_NUM_LOCK_STRIPES = 64


def check_sha256(sha: str) -> str:
    """Return sha if it is 64 lowercase hex characters, else raise InvalidArgumentError."""
    if not isinstance(sha, str) or not _SHA_RE.fullmatch(sha):
        raise InvalidArgumentError(f"adapter id {sha!r} is not a sha256 (64 lowercase hex characters)")
    return sha


@dataclass(frozen=True)
class StoredAdapter:
    sha256: str
    size: int        # bytes of the safetensors file
    kind: str        # "lora", "bottleneck" or "none"
    config: dict     # the JSON config written next to the tensors


@dataclass
class RecoveryReport:
    removed_temp: list[str] = field(default_factory=list)        # paths of temporary files removed
    removed_incomplete: list[str] = field(default_factory=list)  # shas of half-written blobs removed
    removed_orphans: list[str] = field(default_factory=list)     # shas of complete blobs not kept
    repaired: list[str] = field(default_factory=list)            # kept shas whose JSON was rebuilt
    missing: list[str] = field(default_factory=list)             # kept shas without a usable blob
    num_kept: int = 0

    @property
    def num_removed(self) -> int:
        return len(self.removed_temp) + len(self.removed_incomplete) + len(self.removed_orphans)


# -- files ---------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(directory: Path, name: str, data: bytes) -> None:
    """Write data to directory/name via a fsynced temporary file and a rename (the caller fsyncs the dir)."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, directory / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _config_bytes(config: dict) -> bytes:
    return (json.dumps(config, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


class AdapterStore:
    """Content-addressed adapter blobs under StoreConfig.root. Thread-safe; one store per directory
    per process (concurrent processes stay consistent too: every write is a rename of complete bytes)."""

    def __init__(self, config: StoreConfig):
        self.config = config
        self.root = config.root
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks = [threading.Lock() for _ in range(_NUM_LOCK_STRIPES)]

    def _lock(self, sha: str) -> threading.Lock:
        return self._locks[int(sha[:8], 16) % _NUM_LOCK_STRIPES]

    def paths(self, sha256: str) -> tuple[Path, Path]:
        """(tensor file, JSON config file) of a blob."""
        sha = check_sha256(sha256)
        d = self.root / sha[:2]
        return d / f"{sha}{TENSOR_SUFFIX}", d / f"{sha}{CONFIG_SUFFIX}"

    # -- write -------------------------------------------------------------------------------------
    def put(self, artifact: AdapterArtifact, shape: BackboneShape | None, pool_config: PoolConfig | None,
            decoder: DecoderAdapterLimits | None = None) -> StoredAdapter:
        """Validate against its backbone (nothing touches disk on failure), then store durably: an encoder
        artifact against `shape` and the pool limits (None: this server has no encoder,
        FailedPreconditionError), a decoder one (generate head) against `decoder` (the decoder's shape and
        max LoRA rank; None: this server has no decoder, FailedPreconditionError).
        Idempotent: the same content returns the same sha; an intact blob is not rewritten, a corrupt
        one is replaced."""
        if not isinstance(artifact, AdapterArtifact):
            raise InvalidArgumentError(f"expected an AdapterArtifact, got {type(artifact).__name__}")
        if artifact.backbone == DECODER and decoder is None:
            raise FailedPreconditionError("the adapter is for a decoder backbone (a generate head); this server "
                                          "loads no decoder backbone")
        if artifact.backbone != DECODER and (shape is None or pool_config is None):
            raise FailedPreconditionError(f"the adapter is for the encoder backbone (a {artifact.head.spec.kind.value} "
                                          f"head); this server loads no encoder backbone")
        try:
            if artifact.backbone == DECODER:
                decoder.validate(artifact)
            else:
                validate_artifact(artifact, shape, pool_config)
        except AdapterError as e:
            raise FailedPreconditionError(str(e)) from e
        data, config = encode_artifact(artifact)
        sha = config["sha256"]
        stored = StoredAdapter(sha, len(data), config["kind"], config)
        tensor_path, config_path = self.paths(sha)
        config_data = _config_bytes(config)
        with self._lock(sha):
            if _read(tensor_path) == data and _read(config_path) == config_data:
                return stored
            if tensor_path.exists() or config_path.exists():
                log.warning("adapter %s: stored blob is damaged or incomplete; rewriting it", sha)
            d = tensor_path.parent
            if not d.is_dir():
                d.mkdir(exist_ok=True)
                _fsync_dir(self.root)
            _atomic_write(d, tensor_path.name, data)
            _fsync_dir(d)
            _atomic_write(d, config_path.name, config_data)  # its presence marks the blob complete
            _fsync_dir(d)
        return stored

    def delete(self, sha256: str) -> bool:
        """Remove a blob (JSON first, so a crash leaves an incomplete blob that recover() removes).
        Returns whether anything was removed; a missing blob is fine."""
        tensor_path, config_path = self.paths(sha256)
        removed = False
        with self._lock(sha256):
            for p in (config_path, tensor_path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed = True
            if removed:
                _fsync_dir(tensor_path.parent)
        return removed

    # -- read --------------------------------------------------------------------------------------
    def get(self, sha256: str) -> AdapterArtifact:
        """The stored artifact, verified (checksum against the name and the JSON, strict parse,
        finiteness). NotFoundError if neither file exists, CorruptAdapterError for anything else wrong."""
        data, config = self._read_blob(sha256)
        return decode_artifact(data, config)

    def read_blob(self, sha256: str) -> tuple[bytes, dict]:
        """The blob's tensor bytes and JSON config, checked as get() checks them, undecoded: what another process
        (a Ray Serve replica) receives and decodes with codec.decode_artifact, which checks them again."""
        return self._read_blob(sha256)

    def verify(self, sha256: str) -> None:
        """Raise as get() would; return None if the blob is intact."""
        self.get(sha256)

    def exists(self, sha256: str) -> bool:
        """Both files present (the blob is complete; its content is not verified)."""
        return all(p.is_file() for p in self.paths(sha256))

    def size(self, sha256: str) -> int:
        """Bytes of the blob's tensor file."""
        if not self.exists(sha256):
            raise NotFoundError(f"adapter {sha256} is not in the store")
        return self.paths(sha256)[0].stat().st_size

    def list_shas(self) -> set[str]:
        """The shas of complete blobs."""
        out = set()
        for d in self._shard_dirs():
            for p in d.glob(f"*{CONFIG_SUFFIX}"):
                sha = p.name[:-len(CONFIG_SUFFIX)]
                if _SHA_RE.fullmatch(sha) and sha[:2] == d.name and (d / f"{sha}{TENSOR_SUFFIX}").is_file():
                    out.add(sha)
        return out

    def _shard_dirs(self) -> list[Path]:
        return sorted(d for d in self.root.iterdir() if d.is_dir() and _SHARD_RE.fullmatch(d.name))

    def _parse_config(self, sha: str, text: bytes) -> dict:
        try:
            config = _loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptAdapterError(f"adapter {sha}: the JSON config cannot be parsed ({e})") from None
        if not isinstance(config, dict):
            raise CorruptAdapterError(f"adapter {sha}: the JSON config is not an object")
        if config.get("sha256") != sha:
            raise CorruptAdapterError(f"adapter {sha}: the JSON config names sha256 "
                                      f"{config.get('sha256')!r}")
        return config

    def _read_blob(self, sha256: str) -> tuple[bytes, dict]:
        tensor_path, config_path = self.paths(sha256)
        with self._lock(sha256):      # a put or delete of this blob is not half done between the two reads
            data, text = _read(tensor_path), _read(config_path)
        if data is None and text is None:
            raise NotFoundError(f"adapter {sha256} is not in the store")
        if data is None:
            raise CorruptAdapterError(f"adapter {sha256}: the tensor file {tensor_path.name} is missing")
        if text is None:
            raise CorruptAdapterError(f"adapter {sha256}: incomplete, {config_path.name} is missing")
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise CorruptAdapterError(f"adapter {sha256}: checksum mismatch, the tensor file "
                                      f"({len(data)} bytes) hashes to {digest}")
        return data, self._parse_config(sha256, text)

    # -- start-up ----------------------------------------------------------------------------------
    def recover(self, keep: set[str]) -> RecoveryReport:
        """Clean up after a crash; call at start-up, before any put. Removes temporary files, half-written
        blobs (a tensor file without its JSON, or the reverse) and complete blobs whose sha is not in keep
        (stored but never registered). Never deletes anything of a sha in keep: a kept tensor file without
        its JSON gets the JSON rebuilt from the verified file (`repaired`); kept shas without a usable blob
        are reported as `missing`."""
        keep = {check_sha256(s) for s in keep}
        report = RecoveryReport()
        complete: set[str] = set()
        for d in self._shard_dirs():
            shas: dict[str, set[str]] = {}
            for p in sorted(d.iterdir()):
                if p.name.startswith(TEMP_PREFIX) and p.is_file():
                    p.unlink()
                    report.removed_temp.append(str(p))
                    continue
                for suffix in (TENSOR_SUFFIX, CONFIG_SUFFIX):
                    sha = p.name[:-len(suffix)]
                    if p.name.endswith(suffix) and _SHA_RE.fullmatch(sha) and sha[:2] == d.name:
                        shas.setdefault(sha, set()).add(suffix)
            for sha, present in sorted(shas.items()):
                if sha in keep:
                    if present == {TENSOR_SUFFIX} and self._repair(sha):
                        report.repaired.append(sha)
                    if self.exists(sha):
                        complete.add(sha)
                    continue
                for suffix in (CONFIG_SUFFIX, TENSOR_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        (d / f"{sha}{suffix}").unlink()
                (report.removed_orphans if len(present) == 2 else report.removed_incomplete).append(sha)
            _fsync_dir(d)
            with contextlib.suppress(OSError):
                d.rmdir()  # only succeeds when empty
        report.missing = sorted(keep - complete)
        report.num_kept = len(complete)
        if report.num_removed or report.repaired or report.missing:
            log.warning("adapter store recovery: %s", report)
        return report

    def _repair(self, sha: str) -> bool:
        """Rebuild a kept blob's missing JSON from its tensor file if that file verifies."""
        tensor_path, config_path = self.paths(sha)
        data = _read(tensor_path)
        if data is None or hashlib.sha256(data).hexdigest() != sha:
            return False
        try:
            content, num_tensors = _embedded_content(data)
            config = dict(content, num_tensors=num_tensors, num_bytes=len(data), sha256=sha)
            decode_artifact(data, config)
        except (_Problem, CorruptAdapterError):
            return False
        _atomic_write(tensor_path.parent, config_path.name, _config_bytes(config))
        _fsync_dir(tensor_path.parent)
        return True
