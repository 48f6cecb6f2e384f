"""Scoring: the two tasks (what they read, encode, predict and measure) and `evaluate`, which scores
a trained adapter on a test file in-process (vbert.MultiTenantModel, the serving code path) or
against a running server (the tenant API), or a full fine-tuned checkpoint with transformers.

In-process and server evaluation see the same token ids: texts are cut the way the server cuts
them ([CLS] + the first limit-2 sub-tokens + [SEP], limit = min(max_length, the backbone's
positions)), and an NER sentence is sent as its words joined by spaces, which the BERT tokenizer
splits back into the same sub-tokens as the words (checked per sentence: a mismatch is an error).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from vbert import HeadKind

from .data import (IGNORE_INDEX, DataError, check_labels, encode_classification, encode_ner, label_list,
                   ner_label_list, read_classification, read_conll, word_level)
from .metrics import classification_metrics, ner_metrics

TRAINING_FILE = "training.json"
DEFAULT_MAX_LENGTH = 512


# -- the tasks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """What differs between sequence classification and token classification (NER)."""

    name: str
    head_kind: HeadKind
    metric: str                                  # the dev metric (model selection, early stopping)
    target_key: str                              # the encoded example's target: "label" or "labels"
    read: Callable                               # path -> examples
    labels: Callable                             # examples -> sorted label tuple
    encode: Callable                             # (tokenizer, examples, label_ids, max_length) -> [dict]
    text: Callable                               # example -> the text sent to a server
    gold: Callable                               # examples -> gold labels, as the metric takes them
    to_gold_form: Callable                       # (row prediction, encoded row, example) -> metric form
    score: Callable                              # (gold, pred) -> metrics dict


def _ner_prediction(token_labels: Sequence[str], encoded: dict, example) -> list[str]:
    return word_level(token_labels, encoded["word_ids"], len(example.words))


TASKS: dict[str, Task] = {
    "classification": Task(
        name="classification", head_kind=HeadKind.CLASSIFY, metric="macro_f1", target_key="label",
        read=read_classification, labels=lambda examples: label_list(ex.label for ex in examples),
        encode=encode_classification, text=lambda ex: ex.text, gold=lambda examples: [ex.label for ex in examples],
        to_gold_form=lambda pred, encoded, example: pred, score=classification_metrics),
    "ner": Task(
        name="ner", head_kind=HeadKind.TAG, metric="f1", target_key="labels",
        read=read_conll, labels=ner_label_list, encode=encode_ner, text=lambda ex: " ".join(ex.words),
        gold=lambda examples: [list(ex.tags) for ex in examples], to_gold_form=_ner_prediction, score=ner_metrics),
}
TASK_OF_HEAD = {task.head_kind: task for task in TASKS.values()}


def task_for_head(kind: HeadKind) -> Task:
    if kind not in TASK_OF_HEAD:
        raise ValueError(f"an adapter with a {kind.value} head cannot be scored (only classify and tag heads)")
    return TASK_OF_HEAD[kind]


# -- predictions ---------------------------------------------------------------------------------
Predictor = Callable[[list[list[int]]], list]   # token id rows -> per row: a label, or a label per token


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, L] (padded with pad_id) and attention_mask [B, L] (1 on real tokens)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, :len(r)] = 1
    return ids.to(device), mask.to(device)


def _by_length(rows: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Batches of row indices, rows of similar length together (less padding); stable order."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def model_logits(model, rows: Sequence[Sequence[int]], batch_size: int = 64) -> list[torch.Tensor]:
    """Logits of a training.model.TrainableModel, per row: classify [C], tag [len(row), C] (CPU float)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = model.backbone.config.pad_token_id or 0
    out: list[torch.Tensor | None] = [None] * len(rows)
    try:
        for idx in _by_length(rows, batch_size):
            ids, mask = pad_batch([rows[i] for i in idx], pad_id, device)
            logits = model(ids, mask).float().cpu()                      # [B, C] or [B, L, C]
            for j, i in enumerate(idx):
                out[i] = logits[j] if logits.dim() == 2 else logits[j, :len(rows[i])]
    finally:
        model.train(was_training)
    return out


def _decode(logits: torch.Tensor, labels: Sequence[str]):
    if logits.dim() == 1:
        return labels[int(logits.argmax())]
    return [labels[i] for i in logits.argmax(-1).tolist()]


def torch_predictor(model, batch_size: int = 64) -> Predictor:
    labels = model.head_spec.labels
    return lambda rows: [_decode(x, labels) for x in model_logits(model, rows, batch_size)]


def served_predictor(mt_model, slot: int, batch_size: int = 64) -> Predictor:
    """Predictions of an adapter loaded into a vbert.MultiTenantModel slot."""
    from vbert import EncodeRow

    def predict(rows):
        out = [None] * len(rows)
        for idx in _by_length(rows, batch_size):
            for i, row in zip(idx, mt_model.forward([EncodeRow(rows[i], slot) for i in idx])):
                out[i] = row.predicted()
        return out

    return predict


def score(task: Task, predict: Predictor, encoded: list[dict], examples: list) -> dict:
    """The task's metrics of `predict` on encoded examples."""
    preds = predict([e["input_ids"] for e in encoded])
    pred = [task.to_gold_form(p, e, ex) for p, e, ex in zip(preds, encoded, examples)]
    return task.score(task.gold(examples), pred)


def server_predictions(task: Task, client, adapter_name: str, examples: list, encoded: list[dict],
                       request_size: int = 32) -> list:
    """Predictions of an adapter on a running server (tenant API), in the predictor's form."""
    out = []
    for start in range(0, len(examples), request_size):
        chunk = examples[start:start + request_size]
        texts = [task.text(ex) for ex in chunk]
        if task.head_kind is HeadKind.CLASSIFY:
            out += [r["label"] for r in client.classify(adapter_name, texts)]
            continue
        for k, r in enumerate(client.tag(adapter_name, texts)):
            i = start + k
            labels = [t["label"] for t in r["tokens"]]
            if len(labels) != len(encoded[i]["input_ids"]):
                raise ValueError(f"sentence at line {examples[i].line}: the server tokenized it into {len(labels)} "
                                 f"tokens, this process into {len(encoded[i]['input_ids'])} (a different "
                                 f"backbone, or --max-length unlike the server's max_tokens_per_text?)")
            out.append(labels)
    return out


# -- evaluate ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvaluateConfig:
    adapter_dir: str
    test_path: str
    backbone: str | None = None          # None: training.json's backbone if it is a directory, else the default
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 64
    max_length: int = DEFAULT_MAX_LENGTH
    server: str | None = None            # host:port: score through the server's tenant API
    api_key: str | None = None
    tenant_adapter: str | None = None    # the adapter's name on the server (default: the directory's name)
    request_size: int = 32               # texts per server request
    tls_ca: str | None = None
    skip_shallow: str | None = None      # in-process skip mode: shallow layers (`vbert distill`) ...
    skip_table: str | None = None        # ... and their n-gram table file (None: computed, exact)
    skip_mode: str = "exact"
    skip_route: str = "table"            # table: the skip function itself; layers: the real lower layers

    def __post_init__(self) -> None:
        if not Path(self.adapter_dir).is_dir():
            raise ValueError(f"adapter {self.adapter_dir!r} is not a directory")
        if self.batch_size < 1 or self.request_size < 1:
            raise ValueError("batch_size and request_size must be >= 1")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.skip_table is not None and self.skip_shallow is None:
            raise ValueError("--skip-table needs --skip-shallow (the shallow layers it was built from)")
        if self.skip_shallow is not None and self.server is not None:
            raise ValueError("skip mode is the server's configuration; --skip-shallow is for in-process scoring")
        if self.server is not None and not self.api_key:
            raise ValueError("evaluating against a server needs the tenant's API key (--api-key or VBERT_API_KEY)")


def backbone_of(adapter_dir: str | Path, backbone: str | None) -> str | None:
    """The backbone to evaluate on: the one given, else the one training.json names (when it is
    still a directory here), else None (the embedded default)."""
    if backbone is not None:
        return backbone
    info = Path(adapter_dir) / TRAINING_FILE
    if info.is_file():
        try:
            path = json.loads(info.read_text()).get("backbone")
        except (json.JSONDecodeError, AttributeError):
            path = None
        if path and Path(path).is_dir():
            return path
    return None


def _fitting_model_config(artifact, backbone: str | None, device: str, dtype: str, config=None):
    """A MultiTenantModel config with one slot sized to this artifact (nothing else is allocated);
    in skip mode when config (an EvaluateConfig) names shallow layers."""
    from vbert import BackboneConfig, BottleneckAdapter, LoraAdapter, ModelConfig, PoolConfig
    from vbert.config import LORA_TARGETS, SkipConfig, SkipTableConfig

    a = artifact.adapter
    pool = PoolConfig(num_lora_slots=int(isinstance(a, LoraAdapter)),
                      num_bottleneck_slots=len(a.positions()) if isinstance(a, BottleneckAdapter) else 0,
                      max_lora_rank=a.max_rank if isinstance(a, LoraAdapter) else 1,
                      lora_targets=a.targets if isinstance(a, LoraAdapter) else LORA_TARGETS,
                      max_bottleneck_size=a.size if isinstance(a, BottleneckAdapter) else 1,
                      max_labels=max(1, artifact.head.spec.num_labels))
    skip = SkipConfig()
    if config is not None and config.skip_shallow is not None:
        name = artifact.skip_table or "default"
        skip = SkipConfig((SkipTableConfig(name, config.skip_shallow, config.skip_table),), mode=config.skip_mode,
                          route=config.skip_route)
    return ModelConfig(backbone=BackboneConfig(path=backbone, device=device, dtype=dtype), pool=pool, skip=skip)


def evaluate(config: EvaluateConfig) -> dict:
    """Metrics of the adapter (or full fine-tuned checkpoint) on the test file."""
    from transformers import AutoTokenizer

    from vbert import MultiTenantModel, load_artifact

    from .model import is_full_finetune_dir, load_full_finetune

    is_full = is_full_finetune_dir(config.adapter_dir)
    if is_full and config.server is not None:
        raise ValueError(f"{config.adapter_dir} is a full fine-tuned checkpoint, which a server does not serve")
    mt_model = full = artifact = None
    if is_full:
        full = load_full_finetune(config.adapter_dir)
        spec, tokenizer_path = full.head_spec, config.adapter_dir
        max_positions = full.backbone.config.max_position_embeddings
    else:
        artifact = load_artifact(config.adapter_dir)
        spec = artifact.head.spec
        backbone = backbone_of(config.adapter_dir, config.backbone)
        if config.server is None:
            mt_model = MultiTenantModel(_fitting_model_config(artifact, backbone, config.device, config.dtype,
                                                              config))
            tokenizer_path, max_positions = mt_model.path, mt_model.spec.max_position_embeddings
        else:
            from vbert.backbone import BackboneSpec
            from vbert.config import default_backbone_path

            tokenizer_path = backbone or default_backbone_path()
            max_positions = BackboneSpec.from_checkpoint(tokenizer_path).max_position_embeddings
    task = task_for_head(spec.kind)
    examples = task.read(config.test_path)
    check_labels(examples, spec.labels, config.test_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
    label_ids = {label: i for i, label in enumerate(spec.labels)}
    encoded = task.encode(tokenizer, examples, label_ids, min(config.max_length, max_positions))
    if config.server is not None:
        from dispatcher.client import Client

        name = config.tenant_adapter or Path(config.adapter_dir).resolve().name
        with Client(config.server, api_key=config.api_key, tls=config.tls_ca) as client:
            preds = server_predictions(task, client, name, examples, encoded, config.request_size)
        predict: Predictor = lambda rows: preds   # noqa: E731  (already computed, in row order)
    elif full is not None:
        from vbert.device import DeviceContext

        full.to(DeviceContext.create(config.device, "float32").device)
        predict = torch_predictor(full, config.batch_size)
    else:
        artifact.validate(mt_model.spec.shape)
        predict = served_predictor(mt_model, mt_model.load_adapter(artifact), config.batch_size)
    metrics = score(task, predict, encoded, examples)
    if mt_model is not None and mt_model.skip is not None:
        metrics["skip"] = mt_model.skip.stats()
    return metrics


__all__ = ["DataError", "EvaluateConfig", "IGNORE_INDEX", "TASKS", "Task", "evaluate", "model_logits", "score",
           "served_predictor", "torch_predictor"]
