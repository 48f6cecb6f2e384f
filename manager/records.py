"""Plain records of the registry (no SQL, no protobuf) and the checks of their fields."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from manager.errors import InvalidArgumentError
from vbert.adapters import AdapterError
from vbert.heads import BACKBONES, ENCODER, HeadSpec

TENANT_STATUSES = ("active", "suspended")
ADAPTER_KINDS = ("lora", "bottleneck", "none")
ADAPTER_STATES = ("active", "inactive")   # a quarantined version is inactive and has a problem
MAX_PROBLEM_CHARS = 1000
MAX_PAGE_SIZE = 1000
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_UNAUTHENTICATED = "invalid or expired API key"


def validate_name(name: object, what: str = "tenant") -> str:
    """Tenant and adapter names: 1-64 chars of [a-z0-9._-], starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgumentError(f"{what} name {name!r} is invalid: use 1-64 characters of a-z, 0-9, "
                                   f"'.', '_' or '-', starting with a letter or digit")
    return name


def _check_int(what: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) \
            or (hi is not None and value > hi):
        bounds = "" if lo is None else f" in {lo}..{'' if hi is None else hi}"
        raise InvalidArgumentError(f"{what} must be an integer{bounds}, got {value!r}")
    return value


def _check_number(what: str, value: object, is_zero_ok: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not is_zero_ok):
        raise InvalidArgumentError(f"{what} must be a finite number {'>= 0' if is_zero_ok else '> 0'}, "
                                   f"got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits: a token bucket (rate, burst), a cap on tokens per request, a fair-share weight."""

    requests_per_s: float = 50.0
    burst: int = 100
    max_tokens_per_request: int = 512
    weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "requests_per_s", _check_number("quota requests_per_s", self.requests_per_s))
        _check_int("quota burst", self.burst, 1)
        _check_int("quota max_tokens_per_request", self.max_tokens_per_request, 1)
        object.__setattr__(self, "weight", _check_number("quota weight", self.weight))


@dataclass(frozen=True)
class Tenant:
    id: int
    name: str
    created: float
    status: str
    quotas: Quotas

    @property
    def is_active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True)
class AdapterRecord:
    """One version of a tenant's named adapter; the artifact itself lives in the store under sha256."""

    id: int
    tenant_id: int
    name: str
    version: int
    kind: str
    config: dict = field(hash=False)
    head: dict = field(hash=False)
    sha256: str
    size: int
    created: float
    state: str
    problem: str | None = None   # set: quarantined (unusable for good; why, in words)
    backbone: str = ENCODER      # vbert.heads.BACKBONES: the backbone the adapter runs on

    @property
    def is_active(self) -> bool:
        return self.state == "active"

    @property
    def is_quarantined(self) -> bool:
        return self.problem is not None


@dataclass(frozen=True)
class AuditEntry:
    id: int
    time: float
    actor: str
    action: str
    target: str
    detail: dict = field(hash=False)


def _tenant(row: Mapping) -> Tenant:
    quotas = Quotas(row["requests_per_s"], row["burst"], row["max_tokens_per_request"], row["weight"])
    return Tenant(row["id"], row["name"], row["created"], row["status"], quotas)


def _check_quotas(quotas: object) -> Quotas:
    if not isinstance(quotas, Quotas):
        raise InvalidArgumentError(f"quotas must be a Quotas, got {type(quotas).__name__}")
    return quotas


def _json_object(text: object) -> dict:
    """A JSON object stored in a row; damaged text reads as {} so that one bad row never breaks a listing
    (the start-up check then quarantines a record whose head is {})."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _adapter(row: Mapping) -> AdapterRecord:
    return AdapterRecord(row["id"], row["tenant_id"], row["name"], row["version"], row["kind"],
                         _json_object(row["config"]), _json_object(row["head"]), row["sha256"], row["size"],
                         row["created"], row["state"], row["problem"], row["backbone"])


def _json(what: str, value: object) -> str:
    if not isinstance(value, dict):
        raise InvalidArgumentError(f"{what} must be a JSON object (dict), got {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{what} is not JSON-serializable: {e}") from None


def check_backbone(backbone: object) -> str:
    if backbone not in BACKBONES:
        raise InvalidArgumentError(f"adapter backbone {backbone!r} is not one of {BACKBONES}")
    return backbone


def check_head(head: object, backbone: str | None = None) -> dict:
    """A head spec's JSON against the schema of vbert.heads (types, enums, labels) and, given a backbone,
    the head kind against it (a generate head on the decoder, the others on the encoder); InvalidArgumentError."""
    if backbone is not None:
        check_backbone(backbone)
    try:
        spec = HeadSpec.from_json(head)
    except AdapterError as e:
        raise InvalidArgumentError(f"head spec: {e}") from None
    if backbone is not None and spec.backbone != backbone:
        raise InvalidArgumentError(f"a {spec.kind.value} head belongs on the {spec.backbone} backbone, "
                                   f"not the {backbone}")
    return head
