"""vbert: one shared BERT backbone, thousands of per-tenant adapters, mixed-tenant batches."""
from .adapters import AdapterError, BackboneShape, BottleneckAdapter, LoraAdapter
from .artifact import AdapterArtifact, load_artifact, save_artifact
from .config import BackboneConfig, BatchingConfig, ModelConfig, PoolConfig
from .heads import Head, HeadKind, HeadSpec
from .model import EncodeRow, InputError, MultiTenantModel, RowOutput
from .pool import AdapterPool, PoolFullError

__all__ = [
    "AdapterArtifact", "AdapterError", "AdapterPool", "BackboneConfig", "BackboneShape", "BatchingConfig",
    "BottleneckAdapter", "EncodeRow", "Head", "HeadKind", "HeadSpec", "InputError", "LoraAdapter",
    "ModelConfig", "MultiTenantModel", "PoolConfig", "PoolFullError", "RowOutput", "load_artifact",
    "save_artifact",
]
