"""`vbert evaluate` for a decoder adapter: greedy outputs on a test file (training.generation_data's format),
scored against the completions by exact match, token-level F1 and ROUGE-L F (the rouge-score package).

In-process the serving code runs: our decoder (vbert.decoder_backbone.DecoderBackbone), the adapter in its
LoRA slot pool, vbert.generation.generate_greedy (which a test holds to Hugging Face PEFT's `generate`).
Against a server each example is one greedy Generate call (temperature 0) on the registered adapter, with
the same prompt (or messages) and max_new_tokens; prompts beyond the limit keep their last tokens in both.

Scores (fractions, like the encoder's): text is compared after stripping surrounding whitespace; token F1
is SQuAD's (lower-cased whitespace tokens, bag overlap); ROUGE-L is rouge_scorer's (its own tokenizer,
lower-cased alphanumerics, no stemming). An empty gold and an empty prediction match.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .generation_data import GenerationExample, read_generation

DEFAULT_MAX_NEW_TOKENS = 64
DEFAULT_MAX_PROMPT_TOKENS = 512   # in-process: a longer prompt keeps its last tokens (the server: its context's worth)


def is_generation_adapter(path: str | Path) -> bool:
    """Whether a directory holds a decoder adapter (a generate head, or a plain PEFT CAUSAL_LM LoRA); reads
    only the JSON files."""
    path = Path(path)
    for name, key in (("vbert_adapter.json", ("head", "kind")), ("adapter_config.json", ("task_type",))):
        try:
            value = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        for k in key:
            value = value.get(k) if isinstance(value, dict) else None
        return value in ("generate", "CAUSAL_LM")
    return False


# -- metrics ----------------------------------------------------------------------------------------
def token_f1(gold: str, pred: str) -> float:
    g, p = gold.lower().split(), pred.lower().split()
    if not g or not p:
        return float(g == p)
    common = sum((Counter(g) & Counter(p)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(gold: Sequence[str], pred: Sequence[str]) -> dict:
    """{"exact_match", "token_f1", "rougeL_f", "num_examples"}: means over the examples."""
    from rouge_score import rouge_scorer

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} completions but {len(pred)} predictions")
    if not gold:
        raise ValueError("no examples to evaluate")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    em = f1 = rouge = 0.0
    for g, p in zip(gold, pred):
        g, p = g.strip(), p.strip()
        em += float(g == p)
        f1 += token_f1(g, p)
        rouge += scorer.score(g, p)["rougeL"].fmeasure if (g or p) else 1.0
    n = len(gold)
    return {"exact_match": em / n, "token_f1": f1 / n, "rougeL_f": rouge / n, "num_examples": n,
            "items": item_f1(gold, pred), "label_macro_f1": label_macro_f1(gold, pred)}


ITEM_SEPARATOR = " ; "      # = the list completions of training.generation_data (NCBI-disease mentions)
NO_ITEMS = "none"


def _items(text: str) -> Counter:
    text = text.strip()
    if not text or text.lower() == NO_ITEMS:
        return Counter()
    return Counter(t.strip() for t in text.split(ITEM_SEPARATOR.strip()) if t.strip())


def item_f1(gold: Sequence[str], pred: Sequence[str]) -> dict:
    """Micro precision / recall / F1 over the items of list-valued completions ("a ; b", "none" = no item),
    exact item text: for generative NER, mention-level F1 (the encoder's span F1 compares spans by position
    instead, so a mention repeated in a sentence counts once per occurrence here too)."""
    tp = fp = fn = 0
    for g, p in zip(gold, pred):
        gi, pi = _items(g), _items(p)
        tp += sum((gi & pi).values())
        fp += sum((pi - gi).values())
        fn += sum((gi - pi).values())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def label_macro_f1(gold: Sequence[str], pred: Sequence[str]) -> float:
    """Macro-F1 over the distinct gold completions as labels (label-as-text tasks such as sci-cite; any
    other prediction counts as wrong for every label)."""
    labels = sorted({g.strip() for g in gold})
    scores = []
    for label in labels:
        tp = sum(g.strip() == label and p.strip() == label for g, p in zip(gold, pred))
        fp = sum(g.strip() != label and p.strip() == label for g, p in zip(gold, pred))
        fn = sum(g.strip() == label and p.strip() != label for g, p in zip(gold, pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


# -- evaluate ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationEvaluateConfig:
    """backbone None: the decoder training.json names (when it is a directory here), else the default
    SmolLM2 (converted into cache_dir). batch_size: prompts generated together in-process."""

    adapter_dir: str
    test_path: str
    backbone: str | None = None
    cache_dir: str = "./var/models"
    device: str = "cpu"
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    batch_size: int = 8
    server: str | None = None
    api_key: str | None = None
    tenant_adapter: str | None = None
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        if not Path(self.adapter_dir).is_dir():
            raise ValueError(f"adapter {self.adapter_dir!r} is not a directory")
        for name in ("max_new_tokens", "max_prompt_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.server is not None and not self.api_key:
            raise ValueError("evaluating against a server needs the tenant's API key (--api-key or VBERT_API_KEY)")


def _in_process(config: GenerationEvaluateConfig, examples: list[GenerationExample]) -> list[str]:
    from vbert import load_artifact
    from vbert.decoder import DecoderSpec
    from vbert.decoder_backbone import DecoderBackbone, DecoderBackboneConfig
    from vbert.device import DeviceContext
    from vbert.generation import generate_greedy
    from vbert.kv_cache import KVCacheConfig

    from .evaluate import backbone_of
    from .generation import decoder_checkpoint_path

    artifact = load_artifact(config.adapter_dir)
    path, _ = decoder_checkpoint_path(backbone_of(config.adapter_dir, config.backbone), config.cache_dir)
    spec = DecoderSpec.from_hf_config(json.loads((Path(path) / "config.json").read_text()))
    limit = min(config.max_prompt_tokens, spec.max_position_embeddings - config.max_new_tokens)
    if limit < 1:
        raise ValueError(f"max_new_tokens {config.max_new_tokens} leaves no room for a prompt in the decoder's "
                         f"context of {spec.max_position_embeddings}")
    block, token_bytes = 16, 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4    # K and V, fp32
    backbone = DecoderBackbone.load(       # one KV block here; the cache is sized below, to the prompts
        DecoderBackboneConfig(path=str(path), kv_cache_bytes=block * token_bytes, block_size=block, num_lora_slots=1,
                              max_lora_rank=max(w.rank for w in artifact.adapter.modules.values())),
        DeviceContext.create(config.device, "float32"))
    slot = backbone.lora.load(artifact)
    eos = backbone.tokenizer.eos_token_id if backbone.tokenizer.eos_token_id is not None else backbone.eos_token_ids[0]
    prompts = []
    for ex in examples:
        text = ex.prompt if ex.messages is None else backbone.render_chat(ex.messages)
        prompts.append(backbone.tokenize_prompt(text, limit, truncate=True, is_chat=ex.is_chat))
    # a KV cache that holds one batch of the longest prompts at their longest
    per_sequence = -(-(max(len(p) for p in prompts) + config.max_new_tokens) // block)
    cache = backbone.model.new_cache(KVCacheConfig(block_size=block,
                                                   num_blocks=per_sequence * min(config.batch_size, len(prompts)),
                                                   staging_bytes=backbone.kv.config.staging_bytes))
    out = []
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start:start + config.batch_size]
        generated = generate_greedy(backbone.model, chunk, cache, adapter_slots=[slot] * len(chunk),
                                    max_new_tokens=config.max_new_tokens, lora=backbone.lora, chunk_size=512,
                                    token_budget=4096, eos_token_id=eos)
        for ids in generated:
            cut = next((i for i, t in enumerate(ids) if t in backbone.eos_token_ids), len(ids))
            out.append(backbone.tokenizer.decode(ids[:cut], skip_special_tokens=True))
    return out


def _on_server(config: GenerationEvaluateConfig, examples: list[GenerationExample]) -> list[str]:
    from dispatcher.client import Client

    name = config.tenant_adapter or Path(config.adapter_dir).resolve().name
    out = []
    with Client(config.server, api_key=config.api_key, tls=config.tls_ca) as client:
        for ex in examples:
            text = "".join(event["text"] for event in client.generate(
                **ex.request(), adapter=name, max_new_tokens=config.max_new_tokens, temperature=0.0,
                truncate_prompt=True))
            out.append(text)
    return out


def evaluate_generation(config: GenerationEvaluateConfig) -> tuple[dict, list[dict]]:
    """(metrics, predictions: [{"line", "completion", "prediction"}]) of the adapter on the test file."""
    examples = read_generation(config.test_path)
    preds = _in_process(config, examples) if config.server is None else _on_server(config, examples)
    metrics = generation_metrics([ex.completion for ex in examples], preds)
    metrics.update(task="generation", max_new_tokens=config.max_new_tokens,
                   mode="in-process" if config.server is None else f"server {config.server}")
    return metrics, [{"line": ex.line, "completion": ex.completion, "prediction": p} for ex, p in zip(examples, preds)]


__all__ = ["GenerationEvaluateConfig", "evaluate_generation", "generation_metrics", "is_generation_adapter",
           "token_f1"]
