"""Adapters trained with Hugging Face PEFT serve unchanged; ours load in PEFT."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import classify, make_artifact
from vbert import AdapterError, EncodeRow, HeadKind, load_artifact, save_artifact
from vbert.peft_format import read_peft_lora


def _randomize_lora_b(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_peft_seq_cls_directory_serves_unchanged(tiny_model, tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(str(tiny_checkpoint), num_labels=4,
                                                         local_files_only=True).eval()
    cfg = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    pm = get_peft_model(base, cfg)
    _randomize_lora_b(pm, 0)
    pm.save_pretrained(str(tmp_path / "peft"))
    pm.eval()
    art = load_artifact(tmp_path / "peft")
    assert art.kind == "lora" and art.head.spec.kind is HeadKind.CLASSIFY and art.head.spec.num_labels == 4
    assert art.head.spec.pooling == "pooler"
    slot = tiny_model.load_adapter(art)
    ids = [[2, 7, 8, 9, 10, 3], [2, 11, 12, 3], [2] + list(range(20, 50)) + [3]]
    outs = tiny_model.forward([EncodeRow(i, slot) for i in ids])
    for i, out in zip(ids, outs):
        with torch.no_grad():
            exp = pm(input_ids=torch.tensor([i])).logits[0]
        torch.testing.assert_close(out.logits, exp, atol=1e-4, rtol=0)


def test_peft_feature_extraction_dir_with_rank_pattern(tiny_model, tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import BertModel

    base = BertModel.from_pretrained(str(tiny_checkpoint), local_files_only=True).eval()
    cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["query", "key", "value", "intermediate.dense"],
                     rank_pattern={"key": 2}, alpha_pattern={"value": 3.0}, use_rslora=True)
    pm = get_peft_model(base, cfg)
    _randomize_lora_b(pm, 1)
    pm.save_pretrained(str(tmp_path / "fe"))
    art = load_artifact(tmp_path / "fe")
    assert art.head.spec.kind is HeadKind.EMBED
    assert {w.rank for (_, t), w in art.adapter.modules.items() if t == "key"} == {2}
    slot = tiny_model.load_adapter(art)
    ids = [2, 7, 8, 9, 10, 11, 3]
    (out,) = tiny_model.forward([EncodeRow(ids, slot, normalize=False)])
    pm.eval()
    with torch.no_grad():
        exp = pm(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
    torch.testing.assert_close(out.embedding, exp, atol=1e-4, rtol=0)


def test_export_import_roundtrip_is_exact(tiny_model, tmp_path):
    art = make_artifact(tiny_model.spec.shape, "lora", classify(3), 5, rank=4, targets=("query", "ffn_out"))
    d = save_artifact(art, tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    back = load_artifact(d)
    assert back.adapter.modules.keys() == art.adapter.modules.keys()
    for k, w in art.adapter.modules.items():
        assert torch.equal(back.adapter.modules[k].A, w.A) and torch.equal(back.adapter.modules[k].B, w.B)
        assert back.adapter.modules[k].scale == pytest.approx(w.scale)
    assert torch.equal(back.head.weight, art.head.weight) and back.head.spec == art.head.spec


@pytest.mark.parametrize("change,message", [
    ({"use_dora": True}, "use_dora=True is not supported"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not LORA"),
])
def test_unsupported_peft_options_are_named(tiny_model, tmp_path, change, message):
    art = make_artifact(tiny_model.spec.shape, "lora", classify(2), 6, rank=2)
    d = save_artifact(art, tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(change)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=message):
        read_peft_lora(d)


def test_lora_on_unsupported_module_is_refused(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.pooler.dense.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.pooler.dense.lora_B.weight": torch.zeros(32, 2)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="pooler.dense.* is not supported"):
        read_peft_lora(tmp_path)
