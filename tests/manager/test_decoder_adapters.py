"""Decoder (generate) LoRA adapters through the manager: registry, store and tiered cache serve them
as encoder ones, on a DecoderLoraPool for a tiny random Llama; codec strictness; backbone checks."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from dispatcher.admin_service import adapter_pb
from manager.codec import METADATA_KEY, decode_artifact, encode_artifact
from manager.errors import CorruptAdapterError, FailedPreconditionError, NotFoundError
from manager.manager import Manager, ManagerConfig, require_backbone
from scheduler.residency import adapters_per_step
from tests.conftest import classify, tiny_pool_config
from vbert import BackboneConfig, ModelConfig, MultiTenantModel
from vbert.adapters import LoraAdapter, LoraWeights
from vbert.artifact import AdapterArtifact, load_artifact
from vbert.decoder import DecoderSpec
from vbert.decoder_lora import DECODER_LORA_GROUPS, DecoderLoraConfig, DecoderLoraPool
from vbert.device import DeviceContext
from vbert.heads import Head, HeadKind, HeadSpec

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from tests.vbert.test_decoder import _write_lora, write_tiny_decoder  # noqa: E402 - needs transformers + peft

CPU = DeviceContext.create("cpu", "float32")
MAX_RANK = 8
FILE_FIELDS = ("num_tensors", "num_bytes", "sha256")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A tiny Llama checkpoint, its spec and three PEFT CAUSAL_LM directories (ranks 4, 2, 8)."""
    root = tmp_path_factory.mktemp("decoder")
    write_tiny_decoder(root / "llama", "llama", tied=True, seed=1)
    spec = DecoderSpec.from_hf_config(json.loads((root / "llama" / "config.json").read_text()))
    dirs = []
    for r, seed in ((4, 1), (2, 2), (8, 3)):
        _write_lora(root / "llama", root / f"lora{seed}", r=r, seed=seed, alpha=2 * r)
        dirs.append(root / f"lora{seed}")
    return spec, dirs


def make_manager(tiny_checkpoint, path, spec=None, num_slots=2) -> Manager:
    model = MultiTenantModel(ModelConfig(BackboneConfig(path=str(tiny_checkpoint), device="cpu"),
                                         tiny_pool_config(num_lora_slots=2, num_bottleneck_slots=2)))
    pool = DecoderLoraPool(DecoderLoraConfig(num_slots=num_slots, max_rank=MAX_RANK), spec, CPU) if spec else None
    return Manager(ManagerConfig.under(str(path)), model, decoder_pool=pool)


@pytest.fixture
def mgr(tiny_checkpoint, tmp_path, decoder):
    m = make_manager(tiny_checkpoint, tmp_path / "var", decoder[0])
    yield m
    m.close()


def assert_slot_holds(pool: DecoderLoraPool, slot: int, adapter: LoraAdapter) -> None:
    """The slot's bank entries are the adapter's A and (scale * B)^T with its rank, zero-padded, in the banks'
    dtype (bfloat16 with the CPU kernel: rounded to nearest, exactly as torch rounds)."""
    for targets in DECODER_LORA_GROUPS.values():
        for target in targets:
            for layer in range(pool.shape.num_layers):
                a, b, rank = pool.entry(layer, slot, target)          # [R, in], [R, out]
                w = adapter.modules.get((layer, target))
                if w is None:
                    assert not a.any() and not b.any() and rank == 0
                    continue
                assert rank == w.rank
                torch.testing.assert_close(a[:w.rank], w.A.to(a.dtype), rtol=0, atol=0)
                torch.testing.assert_close(b[:w.rank], (w.B * w.scale).t().to(b.dtype), rtol=0, atol=0)
                assert not a[w.rank:].any() and not b[w.rank:].any()


# -- upload, versions, resolve, cache -------------------------------------------------------------
def test_upload_versions_activate_resolve_and_serve_from_the_decoder_cache(mgr, decoder):
    _, dirs = decoder
    tenant, _ = mgr.create_tenant("acme")
    arts = [load_artifact(d) for d in dirs[:2]]
    rec1 = mgr.upload_adapter("acme", "chat", arts[0])
    rec2 = mgr.upload_adapter("acme", "chat", arts[1], activate=False)
    assert (rec1.backbone, rec1.kind, rec1.version, rec1.is_active) == ("decoder", "lora", 1, True)
    assert (rec2.backbone, rec2.version, rec2.is_active) == ("decoder", 2, False)
    assert rec1.head == {"kind": "generate", "labels": [], "pooling": "mean", "normalize": False}
    assert mgr.store.get(rec1.sha256).backbone == "decoder"
    ref = mgr.resolve(tenant, "chat")
    assert (ref.adapter_id, ref.version, ref.kind, ref.backbone) == (rec1.id, 1, "lora", "decoder")
    assert ref.head.kind is HeadKind.GENERATE and ref.tenant_name == "acme"
    mgr.activate("acme", "chat", 2)
    ref2 = mgr.resolve(tenant, "chat")
    assert (ref2.adapter_id, ref2.version) == (rec2.id, 2)

    pool = mgr.decoder_pool
    assert mgr.caches == {"encoder": mgr.cache, "decoder": mgr.decoder_cache}
    assert adapters_per_step(mgr.decoder_cache, is_pipelined=False) == 2
    with mgr.decoder_cache.use([ref.adapter_id, ref2.adapter_id], timeout=30) as slots:
        assert sorted(slots) == [1, 2] and pool.num_free_slots == 0
        for slot, art in zip(slots, arts):
            assert_slot_holds(pool, slot, art.adapter)
    assert not mgr.cache.is_resident(ref.adapter_id)          # the encoder's cache never saw it
    assert mgr.decoder_cache.stats()["device"]["resident"] == 2

    # a third adapter: the least recently used one is evicted from the two slots
    rec3 = mgr.upload_adapter("acme", "poet", load_artifact(dirs[2]))
    mgr.decoder_cache.prefetch([rec3.id]).result(30)
    (slot3,) = mgr.decoder_cache.resolve([rec3.id])
    assert_slot_holds(pool, slot3, load_artifact(dirs[2]).adapter)
    mgr.decoder_cache.release([rec3.id])
    assert mgr.decoder_cache.stats()["device"]["evictions"] == 1
    assert not mgr.decoder_cache.is_resident(ref.adapter_id) and mgr.decoder_cache.is_resident(rec3.id)


def test_pin_and_delete_use_the_decoder_cache_and_remove_the_blob(mgr, decoder):
    mgr.create_tenant("acme")
    rec = mgr.upload_adapter("acme", "chat", load_artifact(decoder[1][0]))
    mgr.pin("acme", "chat").result(30)
    assert mgr.decoder_cache.is_pinned(rec.id) and mgr.decoder_cache.is_resident(rec.id)
    assert not mgr.cache.is_pinned(rec.id)
    listed = adapter_pb(rec, "acme", mgr.caches)              # the admin API's Adapter message
    assert (listed.backbone, listed.head_kind, listed.is_pinned, listed.is_resident) == ("decoder", "generate",
                                                                                         True, True)
    mgr.unpin("acme", "chat")
    assert not mgr.decoder_cache.is_pinned(rec.id) and mgr.decoder_cache.is_resident(rec.id)
    mgr.pin("acme", "chat").result(30)
    removed = mgr.delete_adapter("acme", "chat")
    assert [r.id for r in removed] == [rec.id]
    assert not mgr.decoder_cache.is_resident(rec.id) and not mgr.decoder_cache.is_pinned(rec.id)
    assert mgr.decoder_pool.num_free_slots == 2
    assert mgr.store.list_shas() == set() and not mgr.store.exists(rec.sha256)


# -- refusals ------------------------------------------------------------------------------------
def _with_module(art: AdapterArtifact, key, weights: LoraWeights) -> AdapterArtifact:
    modules = dict(art.adapter.modules)
    modules[key] = weights
    return AdapterArtifact(LoraAdapter(art.adapter.rank, art.adapter.alpha, modules), art.head)


def test_mismatched_decoder_adapters_are_refused_and_nothing_is_stored(mgr, decoder):
    spec, dirs = decoder
    mgr.create_tenant("acme")
    art = load_artifact(dirs[0])
    w = art.adapter.modules[(0, "k_proj")]
    kv = spec.num_kv_heads * spec.head_dim
    cases = [
        (_with_module(art, (0, "k_proj"), LoraWeights(w.A, torch.zeros(spec.hidden_size, w.rank), w.scale)),
         f"lora layer 0 k_proj lora_B: shape \\({spec.hidden_size}, 4\\) does not match expected \\({kv}, 4\\)"),
        (_with_module(art, (7, "q_proj"), art.adapter.modules[(0, "q_proj")]),
         "lora layer 7 q_proj: layer out of range, the decoder has 2 layers"),
        (_with_module(art, (1, "up_proj"), LoraWeights(torch.zeros(9, spec.hidden_size),
                                                       torch.zeros(spec.intermediate_size, 9), 1.0)),
         "lora layer 1 up_proj: rank 9 is not in \\[1, max_rank=8\\]"),
        (_with_module(art, (1, "o_proj"), LoraWeights(w.A[:, :3], w.B, w.scale)), "lora layer 1 o_proj lora_A"),
    ]
    for bad, words in cases:
        with pytest.raises(FailedPreconditionError, match=words):
            mgr.upload_adapter("acme", "chat", bad)
    assert mgr.store.list_shas() == set() and mgr.list_adapters("acme") == []
    head_only = AdapterArtifact(None, Head(HeadSpec(HeadKind.GENERATE)))
    with pytest.raises(FailedPreconditionError, match="must be LoRA .* got adapter kind 'none'"):
        mgr.upload_adapter("acme", "chat", head_only)
    assert mgr.store.list_shas() == set() and mgr.list_adapters("acme") == []


def test_a_decoder_upload_without_a_decoder_backbone_is_refused(tiny_checkpoint, tmp_path, decoder):
    m = make_manager(tiny_checkpoint, tmp_path / "var")
    try:
        assert m.decoder_cache is None and list(m.caches) == ["encoder"]
        m.create_tenant("acme")
        with pytest.raises(FailedPreconditionError, match="this server loads no decoder backbone"):
            m.upload_adapter("acme", "chat", load_artifact(decoder[1][0]))
        assert m.store.list_shas() == set() and m.list_adapters("acme") == []
    finally:
        m.close()


def test_decoder_records_survive_a_restart_without_a_decoder(tiny_checkpoint, tmp_path, decoder):
    """A server restarted without its decoder keeps the records and blobs; pinning says why it cannot."""
    m = make_manager(tiny_checkpoint, tmp_path / "var", decoder[0])
    m.create_tenant("acme")
    rec = m.upload_adapter("acme", "chat", load_artifact(decoder[1][0]))
    m.close()
    m = make_manager(tiny_checkpoint, tmp_path / "var")
    try:
        assert m.store.exists(rec.sha256) and m.list_adapters("acme")[0].backbone == "decoder"
        with pytest.raises(FailedPreconditionError, match="'chat' version 1 is on the decoder backbone; this server "
                                                          "loads no decoder backbone"):
            m.pin("acme", "chat")
        m.delete_adapter("acme", "chat")
        assert m.store.list_shas() == set()
    finally:
        m.close()


# -- resolve and require_backbone ---------------------------------------------------------------------
def test_resolve_default_per_backbone_and_require_backbone(mgr, decoder):
    tenant, _ = mgr.create_tenant("acme")
    mgr.upload_adapter("acme", "chat", load_artifact(decoder[1][0]))
    enc = mgr.resolve(tenant, "default")
    dec = mgr.resolve(tenant, "default", default_backbone="decoder")
    assert (enc.backbone, enc.adapter_id, enc.version, enc.kind) == ("encoder", None, 0, "none")
    assert enc.head == mgr.model.pool.head(0).spec and enc.head.kind is HeadKind.EMBED
    assert (dec.backbone, dec.adapter_id, dec.version, dec.kind) == ("decoder", None, 0, "none")
    assert dec.head == HeadSpec(HeadKind.GENERATE)
    with pytest.raises(ValueError, match="default_backbone 'gpu'"):
        mgr.resolve(tenant, "default", default_backbone="gpu")
    chat = mgr.resolve(tenant, "chat", default_backbone="encoder")   # a named adapter: its record decides
    assert chat.backbone == "decoder"
    require_backbone(chat, "decoder", "Generate")
    require_backbone(enc, "encoder", "Embed")
    with pytest.raises(FailedPreconditionError) as e:
        require_backbone(chat, "encoder", "Classify")
    assert str(e.value) == ("adapter 'chat' of tenant 'acme' is on the decoder backbone; Classify needs an encoder "
                            "adapter (use Generate)")
    with pytest.raises(FailedPreconditionError, match="adapter 'default' of tenant 'acme' is on the encoder backbone; "
                                                      "Generate needs a decoder adapter \\(use Classify, Tag or Embed\\)"):
        require_backbone(enc, "decoder", "Generate")
    with pytest.raises(NotFoundError):
        mgr.resolve(tenant, "nope")


# -- the canonical blob ------------------------------------------------------------------------------
def _reforge(data: bytes, config: dict, edit) -> tuple[bytes, dict]:
    """The blob with its embedded config edited, self-consistent (name, JSON and bytes agree)."""
    content = {k: v for k, v in config.items() if k not in FILE_FIELDS}
    edit(content)
    new = st_save(st_load(data), metadata={METADATA_KEY: json.dumps(content)})
    return new, dict(content, num_tensors=config["num_tensors"], num_bytes=len(new),
                     sha256=hashlib.sha256(new).hexdigest())


def test_codec_round_trips_decoder_artifacts_byte_for_byte_and_stays_strict(decoder):
    art = load_artifact(decoder[1][1])
    data, config = encode_artifact(art)
    assert config["backbone"] == "decoder" and config["kind"] == "lora" and config["head"]["kind"] == "generate"
    assert "lora.0.q_proj.A" in st_load(data) and "head.weight" not in st_load(data)
    back = decode_artifact(data, config)
    assert back.backbone == "decoder" and back.head.spec == HeadSpec(HeadKind.GENERATE)
    assert encode_artifact(back) == (data, config)

    cases = [(lambda c: c.pop("backbone"), "backbone 'encoder' does not fit the generate head"),
             (lambda c: c.update(backbone="encoder"), "backbone 'encoder' is not 'decoder'"),
             (lambda c: c.update(head={"kind": "embed"}), "backbone 'decoder' does not fit the embed head"),
             (lambda c: c.update(skip_table="t"), "a decoder adapter must be LoRA without a skip table")]
    for edit, words in cases:
        bad, bad_config = _reforge(data, config, edit)
        with pytest.raises(CorruptAdapterError, match=words):
            decode_artifact(bad, bad_config)


def test_decoder_targets_only_with_a_generate_head_in_the_codec(decoder):
    art = load_artifact(decoder[1][1])
    with pytest.raises(FailedPreconditionError, match="lora layer 0 down_proj: not a target of an encoder adapter"):
        encode_artifact(AdapterArtifact(art.adapter, Head(HeadSpec(HeadKind.EMBED))))
    # an encoder blob whose module list names a decoder target is corrupt
    shape_lora = LoraAdapter(2, 4.0, {(0, "query"): LoraWeights(torch.ones(2, 32), torch.ones(32, 2), 2.0)})
    data, config = encode_artifact(AdapterArtifact(shape_lora, Head(HeadSpec(HeadKind.EMBED))))

    def retarget(c):
        c["lora"]["modules"][0]["target"] = "q_proj"

    bad, bad_config = _reforge(data, config, retarget)
    with pytest.raises(CorruptAdapterError, match="target is not one of the encoder's"):
        decode_artifact(bad, bad_config)


def _t(*shape, k: float = 1.0) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    return torch.arange(n, dtype=torch.float32).reshape(shape) * 0.01 * k - 0.3


def test_encoder_blobs_keep_their_bytes_and_sha256():
    """Recorded before decoder adapters existed: encoder blobs have no backbone field, same sha256."""
    from vbert.adapters import BottleneckAdapter, BottleneckWeights
    lora = LoraAdapter(2, 4.0, {(0, "query"): LoraWeights(_t(2, 8), _t(8, 2, k=2), 2.0),
                                (1, "ffn_in"): LoraWeights(_t(1, 8), _t(12, 1, k=3), 4.0)})
    bottleneck = BottleneckAdapter(4, {0: BottleneckWeights(_t(4, 8), _t(4), _t(8, 4), _t(8))})
    cases = {
        "da6ae470268eb7dc6c3f5ab30d040facec279c9353d8216abb19cd101b5e3723":
            AdapterArtifact(lora, Head(HeadSpec(HeadKind.CLASSIFY, ("neg", "pos")), _t(2, 8), _t(2))),
        "7d7c0af6825cd781319d0efbf6a88ff65ee673294c3b369b80ed3a7194631d18":
            AdapterArtifact(bottleneck, Head(HeadSpec(HeadKind.EMBED, normalize=True))),
        "43a81107579cbf48f95d3fa1d1e965ef28e19094a976ddfb854f9d511ad653ca":
            AdapterArtifact(None, Head(HeadSpec(HeadKind.TAG, ("O", "B")), _t(2, 8), _t(2))),
    }
    for sha, art in cases.items():
        data, config = encode_artifact(art)
        assert config["sha256"] == sha and "backbone" not in config
        assert decode_artifact(data, config).backbone == "encoder"


def test_encoder_uploads_are_unchanged(mgr, tiny_checkpoint):
    from tests.conftest import make_artifact
    mgr.create_tenant("acme")
    rec = mgr.upload_adapter("acme", "tickets", make_artifact(mgr.model.spec.shape, "lora", classify(2), 1, rank=2))
    assert rec.backbone == "encoder" and "backbone" not in rec.config
    mgr.pin("acme", "tickets").result(30)
    assert mgr.cache.is_pinned(rec.id) and not mgr.decoder_cache.is_pinned(rec.id)
