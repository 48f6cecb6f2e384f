"""Fine-tune an adapter (bottleneck or LoRA) and its head on the frozen shared backbone, for sequence
classification (JSON lines {text, label}) or NER (CoNLL), and write a servable adapter directory
(vbert.save_artifact: what the manager stores and validates; LoRA also loads in PEFT).
With `full_finetune` every backbone weight trains too and the output is a Hugging Face checkpoint
directory plus the head (the reference for the README's comparison; `vbert evaluate` scores it).

    vbert train --task classification --train train.jsonl --adapter-kind lora --out out/
    (training/cli.py turns its options into a TrainConfig; `python -m dispatcher.cli train` without the script)

Deterministic for a given seed on CPU: seeded init, a seeded data order, dropout masks (when
`dropout` > 0) from the seeded global generator. Settings left unset take the task's default recipe
(training/recipes.py), recorded resolved in training.json.
The epoch with the best dev metric (macro-F1 / span F1) is the one written; `patience` stops
training after that many epochs without improvement. Without a dev file a seeded slice of the
training file is held out. `training.json` in the output records the run.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, DataError, check_labels, split_dev
from .evaluate import TASKS, TRAINING_FILE, Task, pad_batch, score, torch_predictor
from .model import TRAIN_POOLINGS, AdapterConfig, TrainableModel, load_backbone, save_full_finetune
from .recipes import UNRECORDED_BEFORE, recipe

SCHEDULES = ("linear", "constant")
DEFAULT_MAX_LABELS = 64            # = the server pool's default max_labels


@dataclass(frozen=True)
class TrainConfig:
    """One training run. epochs, lr, dropout and the adapter's rank / targets / bottleneck size and
    placement left None take the default recipe of the task and adapter kind (training.recipes: what
    met the 2-point target in the project's table); they are resolved here, so the config and the
    run's training.json hold the values used. patience None: no early stopping. warmup: fraction of
    the steps with a linear warm-up. max_labels: the head limit of the server that will serve the
    adapter."""

    task: str
    train_path: str
    out: str
    dev_path: str | None = None
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    backbone: str | None = None
    epochs: int | None = None
    seed: int = 0
    lr: float | None = None
    schedule: str = "linear"
    warmup: float = 0.1
    weight_decay: float = 0.0
    dropout: float | None = None         # backbone hidden/attention dropout and head-input dropout, training only
    batch_size: int = 32
    max_length: int = 128
    patience: int | None = None
    pooling: str = "mean"
    threads: int | None = None
    device: str = "cpu"
    max_labels: int = DEFAULT_MAX_LABELS
    dev_fraction: float = 0.1
    group_by_length: bool = True
    skip_shallow: str | None = None      # train in skip mode on these shallow layers (a `vbert distill` dir)
    skip_table: str = "default"          # the table name the adapter records (the server's name for it)
    skip_dtype: str = "float16"          # the table's dtype (shallow outputs are rounded to it, as served)
    skip_table_file: str | None = None   # its n-gram table: looked up instead of computed (faster; the same values,
    #                                      computed in the dtype the table records)
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {tuple(TASKS)}")
        r = recipe(self.task, self.adapter.kind)
        object.__setattr__(self, "adapter", self.adapter.resolved(self.task))
        for name in ("epochs", "lr", "dropout"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(r, name))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.pooling not in TRAIN_POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not one of {TRAIN_POOLINGS}")
        for name in ("epochs", "batch_size", "max_labels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
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
        if self.backbone is not None and not Path(self.backbone).is_dir():
            raise ValueError(f"backbone {self.backbone!r} is not a directory")
        if self.skip_table_file is not None and self.skip_shallow is None:
            raise ValueError("skip_table_file needs skip_shallow (the shallow layers it was built from)")
        if self.skip_shallow is not None and not Path(self.skip_shallow).is_dir():
            raise ValueError(f"skip shallow directory {self.skip_shallow!r} does not exist")
        if self.skip_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"skip dtype {self.skip_dtype!r} is not float32, float16 or bfloat16")

    @property
    def is_full_finetune(self) -> bool:
        return self.adapter.kind == "none"

    @property
    def learning_rate(self) -> float:
        return self.lr

    def to_json(self) -> dict:
        d = asdict(self)
        d["adapter"]["targets"] = list(self.adapter.targets)
        d["learning_rate"] = self.learning_rate
        return d

    @classmethod
    def from_record(cls, args: dict, **overrides) -> "TrainConfig":
        """The config of a recorded run (training.json's "args", or a benchmark run's): every recorded
        setting as given, and the ones older records lack (recipes.UNRECORDED_BEFORE) at the value they
        had then, never at today's defaults. `overrides` replace fields (e.g. out, train_path)."""
        args = {**args, **overrides}
        adapter = {**args.get("adapter", {})}
        adapter.setdefault("bottleneck_placement", UNRECORDED_BEFORE["bottleneck_placement"])
        if adapter.get("targets") is not None:
            adapter["targets"] = tuple(adapter["targets"])
        names = {f.name for f in fields(cls)} - {"adapter"}
        kw = {k: v for k, v in args.items() if k in names}
        kw.setdefault("dropout", UNRECORDED_BEFORE["dropout"])
        if kw.get("lr") is None:
            kw["lr"] = args["learning_rate"]
        return cls(adapter=AdapterConfig(**adapter), **kw)


@dataclass
class TrainResult:
    path: Path
    model: TrainableModel
    summary: dict                  # = training.json
    dev_encoded: list[dict]
    dev_examples: list


def check_output_dir(path: str | Path) -> None:
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"output {path} exists and is not an empty directory")


def lr_lambda(schedule: str, num_warmup: int, num_steps: int) -> Callable[[int], float]:
    """Multiplier of the learning rate at a step: linear warm-up, then constant or linear decay to 0."""
    def f(step: int) -> float:
        if step < num_warmup:
            return (step + 1) / (num_warmup + 1)
        if schedule == "constant":
            return 1.0
        return max(0.0, (num_steps - step) / max(1, num_steps - num_warmup))

    return f


GROUP_CHUNK_BATCHES = 50            # group_by_length sorts within windows of this many batches


def epoch_batches(lengths: list[int], batch_size: int, generator: torch.Generator,
                  group_by_length: bool) -> list[list[int]]:
    """This epoch's batches of example indices, drawn from `generator`. With group_by_length the
    shuffled order is cut into windows of GROUP_CHUNK_BATCHES batches, each window sorted by length
    (so a batch pads to a similar length, not to the longest of a random draw), and the batches are
    then shuffled again: every example once per epoch, still random, far less padding."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * GROUP_CHUNK_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def _loss(task: Task, logits: torch.Tensor, targets: list, device) -> torch.Tensor:
    if task.target_key == "label":
        return F.cross_entropy(logits, torch.tensor(targets, dtype=torch.long, device=device))
    length = logits.shape[1]
    t = torch.full((len(targets), length), IGNORE_INDEX, dtype=torch.long)        # [B, L]
    for b, row in enumerate(targets):
        t[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.view(-1).to(device), ignore_index=IGNORE_INDEX)


def _has_targets(task: Task, targets: list) -> bool:
    return task.target_key == "label" or any(x != IGNORE_INDEX for row in targets for x in row)


def _train_epoch(task: Task, model: TrainableModel, batches: list[list[dict]], optimizer, scheduler,
                 pad_id: int, device, bar) -> float:
    """One pass over `batches` (this epoch's); returns the mean batch loss."""
    model.train()
    params = model.trainable_parameters()
    total_loss, num_batches = 0.0, 0
    for batch in batches:
        targets = [e[task.target_key] for e in batch]
        bar.update(1)
        if not _has_targets(task, targets):
            continue
        ids, mask = pad_batch([e["input_ids"] for e in batch], pad_id, device)
        loss = _loss(task, model(ids, mask), targets, device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        total_loss += float(loss.detach())
        num_batches += 1
        bar.set_postfix(loss=f"{total_loss / num_batches:.4f}")
    return total_loss / max(1, num_batches)


SKIP_TRAIN_CACHE = 1 << 18               # computed trigrams kept while training in skip mode


def _skip_runtime(config: TrainConfig, backbone_path, device):
    """The shallow layers' exact outputs, rounded to the table dtype: from the table file when given
    (exact mode: misses computed and cached), else computed and cached."""
    from vbert.backbone import Encoder
    from vbert.skip import SkipRuntime, open_table

    teacher = Encoder.from_checkpoint(backbone_path)
    table = open_table(config.skip_table, config.skip_shallow, config.skip_table_file, teacher, device,
                       SKIP_TRAIN_CACHE, config.skip_dtype)
    if table.table is not None and table.table.meta.dtype != config.skip_dtype:
        raise ValueError(f"skip table file {config.skip_table_file} holds {table.table.meta.dtype}, not "
                         f"--skip-dtype {config.skip_dtype}")
    return SkipRuntime({config.skip_table: table}, mode="exact")


def _backbone_name(config: TrainConfig) -> str:
    """The name recorded in the artifact (as MultiTenantModel names the embedded default)."""
    return "all-MiniLM-L6-v2" if config.backbone is None else Path(config.backbone).name


@contextmanager
def torch_threads(threads: int | None):
    """torch's CPU thread count set to `threads` (None: unchanged) for the block, then restored."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(config: TrainConfig, echo: Callable[[str], None] = print) -> TrainResult:
    """Train, keep the best dev epoch, write the output directory and training.json."""
    check_output_dir(config.out)
    with torch_threads(config.threads):
        return _train(config, echo)


def _train(config: TrainConfig, echo: Callable[[str], None]) -> TrainResult:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from vbert import HeadKind, HeadSpec, save_artifact
    from vbert.config import default_backbone_path
    from vbert.device import DeviceContext

    started = time.perf_counter()
    task = TASKS[config.task]
    backbone_path = config.backbone or default_backbone_path()
    device = DeviceContext.create(config.device, "float32").device

    # data
    examples = task.read(config.train_path)
    labels = task.labels(examples)
    if len(labels) > config.max_labels:
        raise DataError(f"{config.train_path}: {len(labels)} labels, above the head limit of {config.max_labels} "
                        f"(the server's max_labels; --max-labels raises it if the server allows more)")
    if config.dev_path is not None:
        train_examples, dev_examples = examples, task.read(config.dev_path)
        check_labels(dev_examples, labels, config.dev_path)
    else:
        train_examples, dev_examples = split_dev(examples, config.dev_fraction, config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_path), local_files_only=True)
    label_ids = {label: i for i, label in enumerate(labels)}
    train_encoded = task.encode(tokenizer, train_examples, label_ids, config.max_length)
    dev_encoded = task.encode(tokenizer, dev_examples, label_ids, config.max_length) if dev_examples else []

    # model
    torch.manual_seed(config.seed)
    backbone = load_backbone(backbone_path, trainable=config.is_full_finetune, dropout=config.dropout)
    spec = HeadSpec(task.head_kind, labels, pooling=config.pooling if task.head_kind is HeadKind.CLASSIFY else "mean")
    skip = _skip_runtime(config, backbone_path, device) if config.skip_shallow is not None else None
    adapter_config = config.adapter
    if skip is not None and adapter_config.num_top_layers is None:
        adapter_config = replace(adapter_config, num_top_layers=backbone.config.num_hidden_layers - skip.skip_layers)
    model = TrainableModel(backbone, adapter_config, spec, skip).to(device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train_encoded) / config.batch_size)
    num_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, round(config.warmup * num_steps), num_steps))
    order_generator = torch.Generator().manual_seed(config.seed)
    pad_id = backbone.config.pad_token_id or 0
    lengths = [len(e["input_ids"]) for e in train_encoded]
    echo(f"{task.name}: {len(train_encoded)} train, {len(dev_encoded)} dev examples, {len(labels)} labels; "
         f"{'full fine-tuning' if config.is_full_finetune else config.adapter.kind + ' adapter'}, "
         f"{model.num_trainable_parameters():,} trainable parameters, {num_steps} steps on {device}")

    epochs, best_metric, best_epoch, best_state, stale = [], -1.0, 0, None, 0
    for epoch in range(1, config.epochs + 1):
        batches = epoch_batches(lengths, config.batch_size, order_generator, config.group_by_length)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}/{config.epochs}", disable=not config.show_progress,
                   leave=False)
        with bar:
            loss = _train_epoch(task, model, [[train_encoded[i] for i in b] for b in batches], optimizer,
                                scheduler, pad_id, device, bar)
        record = {"epoch": epoch, "loss": loss}
        line = f"epoch {epoch}/{config.epochs}  loss {record['loss']:.4f}"
        if dev_encoded:
            record["dev"] = score(task, torch_predictor(model, config.batch_size), dev_encoded, dev_examples)
            metric = record["dev"][task.metric]
            line += f"  dev {task.metric} {metric:.4f}"
            if metric > best_metric:
                best_metric, best_epoch, best_state, stale = metric, epoch, model.trainable_state(), 0
                line += "  (best)"
            else:
                stale += 1
        else:
            best_epoch, best_state = epoch, None
        epochs.append(record)
        echo(line)
        if config.patience is not None and stale >= config.patience:
            echo(f"early stop: no better dev {task.metric} for {stale} epochs")
            break
    if best_state is not None:
        model.load_trainable_state(best_state)
    train_seconds = time.perf_counter() - started
    model.eval()

    # output
    out = Path(config.out)
    if config.is_full_finetune:
        save_full_finetune(model, out, tokenizer)
        adapter_parameters = 0
    else:
        artifact = model.to_artifact()
        save_artifact(artifact, out, backbone_name=_backbone_name(config), shape=model.shape)
        adapter_parameters = artifact.adapter.num_parameters()
    artifact_bytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    summary = {
        "task": task.name, "args": config.to_json(), "backbone": str(Path(backbone_path).resolve()),
        "labels": list(labels), "num_train_examples": len(train_encoded), "num_dev_examples": len(dev_encoded),
        "epochs": epochs, "best_epoch": best_epoch, "dev_metric": task.metric,
        "best_dev": next((e.get("dev") for e in epochs if e["epoch"] == best_epoch), None),
        "trainable_parameters": model.num_trainable_parameters(), "adapter_parameters": adapter_parameters,
        "artifact_bytes": artifact_bytes, "train_seconds": train_seconds,
    }
    (out / TRAINING_FILE).write_text(json.dumps(summary, indent=2))
    echo(f"wrote {out} (best epoch {best_epoch}, {artifact_bytes:,} bytes, {train_seconds:.1f} s)")
    return TrainResult(out, model, summary, dev_encoded, dev_examples)
