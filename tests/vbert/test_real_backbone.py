"""The real default backbone (all-MiniLM-L6-v2, loaded offline from its PyPI package)."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import classify, make_artifact, tag
from tests.reference import hf_model, reference_row
from vbert import BackboneConfig, EncodeRow, HeadKind, ModelConfig, MultiTenantModel, PoolConfig

SENTENCES = [
    "Aspirin reduces the risk of myocardial infarction.",
    "We follow the method of Smith et al. for the alignment.",
    "short",
    "BRCA1 mutations are associated with hereditary breast and ovarian cancer syndrome in many families.",
    "The results, shown in Table 2, indicate a strong effect of the treatment on survival.",
]


@pytest.fixture(scope="module")
def real_model():
    return MultiTenantModel(ModelConfig(backbone=BackboneConfig(device="cpu"),
                                        pool=PoolConfig(num_lora_slots=4, num_bottleneck_slots=4)))


def test_default_embeddings_equal_sentence_transformers(real_model):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(real_model.path), device="cpu")
    expected = st.encode(SENTENCES, convert_to_tensor=True, batch_size=len(SENTENCES))
    outs = real_model.forward([EncodeRow(ids) for ids in real_model.tokenize(SENTENCES)])
    got = torch.stack([o.embedding for o in outs])
    torch.testing.assert_close(got, expected.cpu(), atol=1e-5, rtol=0)
    assert real_model.info()["backbone"] == "all-MiniLM-L6-v2"


def test_real_backbone_mixed_adapters_equal_reference(real_model):
    shape = real_model.spec.shape
    arts = [make_artifact(shape, "lora", classify(3), 11, rank=8),
            make_artifact(shape, "bottleneck", tag(5), 12, size=32, top_layers=3),
            make_artifact(shape, "lora", tag(2), 13, rank=16, layers=(4, 5))]
    slots = [real_model.load_adapter(a) for a in arts]
    ids = real_model.tokenize(SENTENCES)
    rows = [EncodeRow(i, slots[k % 3]) for k, i in enumerate(ids)] + [EncodeRow(ids[0], 0)]
    outs = real_model.forward(rows)
    ref = hf_model(real_model.path)
    for k, (row, out) in enumerate(zip(rows[:-1], outs)):
        exp = reference_row(ref, arts[k % 3], row.input_ids)
        torch.testing.assert_close(out.logits, exp, atol=1e-4, rtol=0)
    assert outs[-1].kind is HeadKind.EMBED
    for s in slots:
        real_model.unload_adapter(s)


def test_tokenize_truncation(real_model):
    long = " ".join(["word"] * 600)
    (ids,) = real_model.tokenize([long])
    assert len(ids) == real_model.max_length and ids[0] == 101 and ids[-1] == 102
    with pytest.raises(ValueError, match="text 1 has .* tokens, above the limit of 512"):
        real_model.tokenize(["fine", long], truncate=False)
    with pytest.raises(ValueError, match="text 0 is empty"):
        real_model.tokenize(["  "])
