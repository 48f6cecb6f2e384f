"""Fine-tune a decoder LoRA (causal LM) on prompt/completion pairs or chats, and write a servable decoder
adapter directory: PEFT files (task_type CAUSAL_LM, which Hugging Face PEFT loads and `vbert adapter upload`
takes unchanged) plus vbert_adapter.json (a generate head) and training.json.

    vbert train --task generation --train train.jsonl --dev dev.jsonl --out runs/my-lora
    (training/cli.py turns its options into a GenerationTrainConfig)

The model is Hugging Face transformers' causal LM of the checkpoint (for the default decoder, SmolLM2
dequantized once into `cache_dir`, the same directory the server converts it into) with PEFT LoRA on the
chosen projections; the backbone stays frozen. The loss is the cross-entropy of the completion's tokens and
the end-of-sequence token after them (training.generation_data: -100 on the prompt). The rest is the
encoder recipe's loop (training/train.py): seeded init and data order, AdamW, a linear schedule with
warm-up, gradient clipping at 1, tqdm bars; the epoch with the lowest dev loss (mean over the dev
completions' tokens) is the one written, and `patience` stops after that many epochs without a lower one.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, split_dev
from .evaluate import TRAINING_FILE
from .generation_data import collate, encode_generation, read_generation
from .recipes import GENERATION_RECIPE
from .train import SCHEDULES, TrainResult, check_output_dir, epoch_batches, lr_lambda, torch_threads

# = vbert.decoder_lora.DECODER_LORA_TARGETS (vbert is imported when training runs, not by the config)
DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_DECODER_NAME = "SmolLM2-135M-Instruct"
_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


@dataclass(frozen=True)
class GenerationTrainConfig:
    """One decoder-LoRA training run. backbone: a local Hugging Face Llama-family checkpoint directory
    (None: the default SmolLM2-135M-Instruct, converted once into cache_dir). epochs, lr, rank and targets
    left None take training.recipes.GENERATION_RECIPE (not measured yet); alpha None = 2 * rank. The
    resolved values are what training.json records. dropout: LoRA dropout while training."""

    train_path: str
    out: str
    dev_path: str | None = None
    backbone: str | None = None
    cache_dir: str = "./var/models"
    epochs: int | None = None
    seed: int = 0
    lr: float | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None
    dropout: float = 0.0
    schedule: str = "linear"
    warmup: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 8
    max_length: int = 512
    patience: int | None = None
    threads: int | None = None
    device: str = "cpu"
    dev_fraction: float = 0.1
    group_by_length: bool = True
    show_progress: bool = True

    def __post_init__(self) -> None:
        r = GENERATION_RECIPE
        for name, value in (("epochs", r.epochs), ("lr", r.lr), ("rank", r.rank), ("targets", r.targets)):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(2 * self.rank))
        unknown = [t for t in self.targets if t not in DECODER_LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets {self.targets!r}: give distinct names among {DECODER_LORA_TARGETS}")
        for name in ("epochs", "batch_size", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("lr", "alpha"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not 0.0 < self.dev_fraction < 1.0:
            raise ValueError(f"dev_fraction must be in (0, 1), got {self.dev_fraction}")
        if self.backbone is not None and not (Path(self.backbone) / "config.json").is_file():
            raise ValueError(f"backbone {self.backbone!r} is not a Hugging Face checkpoint directory "
                             f"(no config.json)")

    def to_json(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["task"] = "generation"
        return d


def decoder_checkpoint_path(backbone: str | None, cache_dir: str) -> tuple[Path, str]:
    """(checkpoint directory, name): the one given, or the default decoder converted into cache_dir."""
    if backbone is not None:
        return Path(backbone), Path(backbone).name
    from vbert.decoder_checkpoint import default_decoder_path

    return default_decoder_path(cache_dir), DEFAULT_DECODER_NAME


def eos_token_id(tokenizer, path: Path) -> int:
    """The token a completion ends with: the tokenizer's end-of-sequence token (else config.json's)."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    value = json.loads((path / "config.json").read_text()).get("eos_token_id")
    value = value[0] if isinstance(value, list) and value else value
    if not isinstance(value, int):
        raise ValueError(f"decoder {path}: neither its tokenizer nor its config.json names an end-of-sequence token")
    return value


def lora_of(model, rank: int, alpha: float):
    """The PEFT model's LoRA (adapter "default") as a vbert LoraAdapter keyed (layer, target)."""
    from peft.tuners.lora import LoraLayer

    from vbert import LoraAdapter
    from vbert.adapters import LoraWeights

    modules = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        m = _MODULE.search(name)
        if m is None or m.group(2) not in DECODER_LORA_TARGETS:
            raise ValueError(f"LoRA on module {name!r}, which the server cannot serve")
        modules[int(m.group(1)), m.group(2)] = LoraWeights(
            module.lora_A["default"].weight.detach().float().cpu().clone(),
            module.lora_B["default"].weight.detach().float().cpu().clone(), float(module.scaling["default"]))
    return LoraAdapter(rank=rank, alpha=alpha, modules=modules)


def _batch_loss(model, rows: list[dict], pad_id: int, device) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy of the completion tokens, their number) of one batch."""
    ids, mask, labels = (t.to(device) for t in collate(rows, pad_id))
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]         # [B, L-1, V]
    targets = labels[:, 1:]                                                     # [B, L-1]
    keep = targets != IGNORE_INDEX
    loss = F.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
    return loss, int(keep.sum())


@torch.no_grad()
def dev_loss(model, encoded: list[dict], pad_id: int, device, batch_size: int) -> float:
    """Mean cross-entropy per completion token over the dev examples (eval mode)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    total, count = 0.0, 0
    try:
        for start in range(0, len(order), batch_size):
            loss, n = _batch_loss(model, [encoded[i] for i in order[start:start + batch_size]], pad_id, device)
            total, count = total + float(loss), count + n
    finally:
        model.train(was_training)
    return total / max(1, count)


def train_generation(config: GenerationTrainConfig, echo: Callable[[str], None] = print) -> TrainResult:
    """Train, keep the epoch with the lowest dev loss, write the adapter directory and training.json."""
    check_output_dir(config.out)
    with torch_threads(config.threads):
        return _train(config, echo)


def _train(config: GenerationTrainConfig, echo: Callable[[str], None]) -> TrainResult:
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vbert import AdapterArtifact, Head, HeadKind, HeadSpec, save_artifact
    from vbert.decoder import DecoderSpec
    from vbert.decoder_lora import validate_decoder_lora
    from vbert.device import DeviceContext

    started = time.perf_counter()
    path, name = decoder_checkpoint_path(config.backbone, config.cache_dir)
    spec = DecoderSpec.from_hf_config(json.loads((path / "config.json").read_text()))   # servable by our decoder
    device = DeviceContext.create(config.device, "float32").device

    # data
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    eos = eos_token_id(tokenizer, path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    examples = read_generation(config.train_path)
    if config.dev_path is not None:
        train_examples, dev_examples = examples, read_generation(config.dev_path)
    else:
        train_examples, dev_examples = split_dev(examples, config.dev_fraction, config.seed)
    max_length = min(config.max_length, spec.max_position_embeddings)
    train_encoded = encode_generation(tokenizer, train_examples, max_length, eos, config.train_path)
    dev_encoded = encode_generation(tokenizer, dev_examples, max_length, eos,
                                    config.dev_path or config.train_path) if dev_examples else []
    num_truncated = sum(e["truncated"] for e in train_encoded + dev_encoded)
    if num_truncated:
        echo(f"{num_truncated} examples longer than {max_length} tokens were cut (the prompt's first tokens, or "
             f"the completion's last ones)")

    # model
    torch.manual_seed(config.seed)
    base = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.targets),
                                            lora_dropout=config.dropout, bias="none", task_type="CAUSAL_LM"))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_encoded) / config.batch_size)
    num_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, round(config.warmup * num_steps), num_steps))
    order_generator = torch.Generator().manual_seed(config.seed)
    lengths = [len(e["input_ids"]) for e in train_encoded]
    num_trainable = sum(p.numel() for p in params)
    echo(f"generation: {len(train_encoded)} train, {len(dev_encoded)} dev examples; LoRA rank {config.rank} on "
         f"{','.join(config.targets)} of {name}, {num_trainable:,} trainable parameters, {num_steps} steps on {device}")

    initial_dev_loss = dev_loss(model, dev_encoded, pad_id, device, config.batch_size) if dev_encoded else None
    if initial_dev_loss is not None:
        echo(f"dev loss before training {initial_dev_loss:.4f}")
    epochs, best_loss, best_epoch, best_state, stale = [], math.inf, 0, None, 0
    for epoch in range(1, config.epochs + 1):
        batches = epoch_batches(lengths, config.batch_size, order_generator, config.group_by_length)
        model.train()
        total, count = 0.0, 0
        with tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", disable=not config.show_progress,
                  leave=False) as bar:
            for batch in batches:
                loss_sum, n = _batch_loss(model, [train_encoded[i] for i in batch], pad_id, device)
                loss = loss_sum / max(1, n)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                total, count = total + float(loss_sum.detach()), count + n
                bar.update(1)
                bar.set_postfix(loss=f"{total / max(1, count):.4f}")
        record = {"epoch": epoch, "loss": total / max(1, count)}
        line = f"epoch {epoch}/{config.epochs}  loss {record['loss']:.4f}"
        if dev_encoded:
            record["dev"] = {"loss": dev_loss(model, dev_encoded, pad_id, device, config.batch_size)}
            line += f"  dev loss {record['dev']['loss']:.4f}"
            if record["dev"]["loss"] < best_loss:
                best_loss, best_epoch, stale = record["dev"]["loss"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
                line += "  (best)"
            else:
                stale += 1
        else:
            best_epoch, best_state = epoch, None
        epochs.append(record)
        echo(line)
        if config.patience is not None and stale >= config.patience:
            echo(f"early stop: no lower dev loss for {stale} epochs")
            break
    if best_state is not None:
        with torch.no_grad():
            for k, v in model.named_parameters():
                if k in best_state:
                    v.copy_(best_state[k])
    train_seconds = time.perf_counter() - started
    model.eval()

    # output: the PEFT files + vbert_adapter.json (a generate head), then training.json
    adapter = lora_of(model, config.rank, config.alpha)
    validate_decoder_lora(adapter, spec, config.rank)
    out = Path(config.out)
    save_artifact(AdapterArtifact(adapter, Head(HeadSpec(HeadKind.GENERATE))), out, backbone_name=name)
    artifact_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    summary = {
        "task": "generation", "args": config.to_json(), "backbone": str(Path(path).resolve()), "backbone_name": name,
        "num_train_examples": len(train_encoded), "num_dev_examples": len(dev_encoded),
        "num_truncated": num_truncated, "eos_token_id": eos, "initial_dev_loss": initial_dev_loss, "epochs": epochs, "best_epoch": best_epoch,
        "dev_metric": "loss", "best_dev": next((e.get("dev") for e in epochs if e["epoch"] == best_epoch), None),
        "trainable_parameters": num_trainable, "adapter_parameters": adapter.num_parameters(),
        "artifact_bytes": artifact_bytes, "train_seconds": train_seconds,
    }
    (out / TRAINING_FILE).write_text(json.dumps(summary, indent=2))
    echo(f"wrote {out} (best epoch {best_epoch}, {artifact_bytes:,} bytes, {train_seconds:.1f} s)")
    return TrainResult(out, model, summary, dev_encoded, dev_examples)


__all__ = ["GenerationTrainConfig", "decoder_checkpoint_path", "dev_loss", "lora_of", "train_generation"]
