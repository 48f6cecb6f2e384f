"""Straightforward per-request references the batched model is checked against.

One request at a time through a plain Hugging Face BertModel, the tenant's adapter applied with
forward hooks that add the textbook formula to the module's output:
  LoRA on module M:     M(x) + scale * (x @ A.T) @ B.T
  bottleneck on layer i: D(x) + up(gelu(down(D(x)))),  D = attention.output.dense (placement
                         attn_out) or output.dense (the feed-forward output, ffn_out), or at
                         both (Houlsby)
and the head computed from the model's last hidden state / pooler output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vbert import AdapterArtifact, BottleneckAdapter, HeadKind, LoraAdapter
from vbert.peft_format import HF_MODULE


def hf_model(path):
    from transformers import BertModel

    return BertModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager").eval()


def _hooks(model, adapter):
    handles = []
    if isinstance(adapter, LoraAdapter):
        for (layer, target), w in adapter.modules.items():
            mod = model.get_submodule(f"encoder.layer.{layer}.{HF_MODULE[target]}")

            def hook(m, inp, out, w=w):
                return out + w.scale * (inp[0] @ w.A.T) @ w.B.T

            handles.append(mod.register_forward_hook(hook))
    elif isinstance(adapter, BottleneckAdapter):
        for position, weights in adapter.positions().items():      # placement "both": the two
            where = {"attn_out": "attention.output.dense", "ffn_out": "output.dense"}[position]
            for layer, w in weights.items():
                mod = model.get_submodule(f"encoder.layer.{layer}.{where}")

                def hook(m, inp, out, w=w):
                    return out + F.gelu(out @ w.down_w.T + w.down_b) @ w.up_w.T + w.up_b

                handles.append(mod.register_forward_hook(hook))
    return handles


def head_output(artifact: AdapterArtifact, hidden: torch.Tensor, pooler_out: torch.Tensor | None,
                normalize: bool | None = None) -> torch.Tensor:
    """hidden [L, H] of one request -> classify logits [C], tag logits [L, C] or embedding [H]."""
    spec, head = artifact.head.spec, artifact.head
    if spec.kind is HeadKind.TAG:
        return hidden @ head.weight.T + head.bias
    pooled = {"mean": hidden.mean(0), "cls": hidden[0], "pooler": pooler_out}[spec.pooling]
    if spec.kind is HeadKind.CLASSIFY:
        return head.weight @ pooled + head.bias
    norm = spec.normalize if normalize is None else normalize
    return F.normalize(pooled, dim=-1) if norm else pooled


@torch.no_grad()
def reference_row(model, artifact: AdapterArtifact, input_ids, token_type_ids=None, normalize=None) -> torch.Tensor:
    handles = _hooks(model, artifact.adapter)
    try:
        ids = torch.tensor([list(input_ids)])
        tt = torch.tensor([list(token_type_ids)]) if token_type_ids is not None else None
        out = model(input_ids=ids, token_type_ids=tt, attention_mask=torch.ones_like(ids))
    finally:
        for h in handles:
            h.remove()
    pooler = out.pooler_output[0] if out.pooler_output is not None else None
    return head_output(artifact, out.last_hidden_state[0], pooler, normalize)
