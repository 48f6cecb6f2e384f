"""Shared factories: tiny random BERT checkpoints on disk, models over them, random artifacts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import dispatcher  # noqa: F401  (first: it turns gRPC's fork handlers off before a test imports grpc or ray)
from vbert import (AdapterArtifact, BackboneConfig, BottleneckAdapter, Head, HeadKind, HeadSpec, LoraAdapter,
                   ModelConfig, MultiTenantModel, PoolConfig)

TINY_WORDS = ("the a of and to in is was patient disease gene protein cell with for on by this that "
              "results method we show study cancer tumor expression level high low increased reduced").split()


def has_cuda() -> bool:
    return torch.cuda.is_available()


# make test runs two pytest-xdist workers (Makefile). The tests that start a local Ray cluster (every test of these
# modules, and these tests of others) run one after another on one of them: a second cluster beside one would
# compete for the 2 cores, and test_scaleout_join's `ray stop` ends every Ray process here. (xdist's own --dist
# loadgroup does not group on pytest 9.2: it renames item._nodeid, which pytest no longer reads.)
RAY_TESTS = frozenset(f"tests/dispatcher/{name}" for name in (
    "test_scaleout.py", "test_scaleout_decoder.py", "test_scaleout_decoder_autoscale.py", "test_scaleout_join.py",
    "test_autoscaling.py::test_a_server_scales_its_replicas_up_under_load_and_back_down_when_it_stops",
    "test_server_process.py::test_sigterm_drains_the_ray_serve_replicas_too",
    "test_server_process.py::test_decoder_replicas_serve_the_default_decoder_and_drain"))


def pytest_configure(config):
    """Under make test's two xdist workers each worker computes on one intra-op thread (two cores in all): with
    torch's two each, the workers' matrix products starved the servers, processes and Ray clusters the other worker's
    tests start (a local Ray cluster's raylet must register within 30 s; it did not once). Child processes keep
    torch's default."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class RayTogether(LoadScopeScheduling):
        """Every test its own unit of work, except the Ray tests: one unit, in their order."""

        def _split_scope(self, nodeid: str) -> str:
            test = nodeid.split("[", 1)[0]
            return "ray" if test in RAY_TESTS or test.split("::", 1)[0] in RAY_TESTS else nodeid

    return RayTogether(config, log)


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_tiny_checkpoint(path: Path, seed: int = 0, num_layers: int = 3, hidden: int = 32, heads: int = 4,
                          intermediate: int = 64, with_pooler: bool = True) -> Path:
    """A random BERT checkpoint (config.json + model.safetensors + tokenizer) in Hugging Face layout.
    LayerNorm and bias parameters are randomized too, so a wrong term anywhere shows in outputs."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS + [f"w{i}" for i in range(80)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=num_layers,
                     num_attention_heads=heads, intermediate_size=intermediate, max_position_embeddings=64,
                     type_vocab_size=2, pad_token_id=0)
    model = BertModel(cfg, add_pooling_layer=with_pooler)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "LayerNorm.weight" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(path), safe_serialization=True)
    # transformers 5: `vocab=` (a path) builds the vocabulary; `vocab_file=` would be ignored
    tok = BertTokenizerFast(vocab=str(path / "vocab.txt"))
    if len(tok) != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens, expected {len(vocab)}")
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def default_checkpoint() -> str:
    from vbert.config import default_backbone_path

    return default_backbone_path()


ALL_TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


def tiny_pool_config(**kw) -> PoolConfig:
    base = dict(num_lora_slots=16, num_bottleneck_slots=16, max_lora_rank=8, lora_targets=ALL_TARGETS,
                max_bottleneck_size=16, max_labels=8)
    base.update(kw)
    return PoolConfig(**base)


@pytest.fixture
def tiny_model(tiny_checkpoint) -> MultiTenantModel:
    return MultiTenantModel(ModelConfig(backbone=BackboneConfig(path=str(tiny_checkpoint), device="cpu"),
                                        pool=tiny_pool_config()))


def make_artifact(shape, kind: str, head: HeadSpec, seed: int, **kw) -> AdapterArtifact:
    g = torch.Generator().manual_seed(seed)
    if kind == "lora":
        adapter = LoraAdapter.random(shape, generator=g, std=0.2, **kw)
    elif kind == "bottleneck":
        adapter = BottleneckAdapter.random(shape, generator=g, std=0.2, **kw)
    else:
        adapter = None
    return AdapterArtifact(adapter, Head.random(head, shape.hidden_size, generator=g))


def labels(n: int, prefix: str = "L") -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(n))


def classify(n: int, pooling: str = "mean") -> HeadSpec:
    return HeadSpec(HeadKind.CLASSIFY, labels(n), pooling=pooling)


def tag(n: int) -> HeadSpec:
    return HeadSpec(HeadKind.TAG, labels(n, "T"))


def embed_head(pooling: str = "mean", normalize: bool = True) -> HeadSpec:
    return HeadSpec(HeadKind.EMBED, pooling=pooling, normalize=normalize)


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub


def shared_tmp(tmp_path_factory) -> Path:
    """The run's temporary directory that every xdist worker sees (the workers' parent), else the basetemp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def data_dir_with_models(data_dir: Path, models: Path) -> Path:
    """A server or training data dir whose models/ is the run's shared conversion cache (smollm2[0]): the default
    decoder found there converted, as a second start finds it."""
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "models").symlink_to(models, target_is_directory=True)
    return data_dir


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(cache dir, path) of the real default decoder, SmolLM2-135M-Instruct, converted once per run (about 17 s;
    both xdist workers share the conversion, the second waits on its lock) into the models/ directory the server
    tests' data dirs link to (data_dir_with_models)."""
    from vbert import decoder_checkpoint

    try:
        decoder_checkpoint.packaged_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cache = shared_tmp(tmp_path_factory) / "smollm2-var" / "models"
    return cache, decoder_checkpoint.default_decoder_path(cache)
