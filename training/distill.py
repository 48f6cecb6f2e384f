"""`vbert distill`: train shallow n-gram layers to stand in for the backbone's lowest k layers.

    vbert distill --corpus ../shared/data/cls/sci-cite/train.txt ... --skip-layers 3 --out shallow/

The shallow layers (vbert.shallow.ShallowModel) start as copies of the teacher's embeddings and lowest
k layers; for each sentence of the corpus every token's trigram goes through them, the three views
of each token are merged, and the loss is the MSE against the teacher's hidden states entering
layer k, optionally plus `final_weight` times the MSE of the final layer's output (the frozen upper
layers run on the merged states) and `attention_weight` times the KL divergence of the attention
that layer k (the first upper layer) computes on the merged states from the attention it computes
on the teacher's states (per head and real query token; padded keys excluded; `attention_layers =
"upper"` averages it over every upper layer, each on its own input along the merged path). The upper layers
stay the teacher's own, so adapters trained on the full model still apply above them. Every epoch
reports the held-out MSE at layer k, the final layer's MSE and the attention KL of layer k and of
all upper layers, whatever the weights.

Checkpoints (OUT/checkpoint.pt: weights, optimizer, schedule, position in the epoch, generator
state) are written every `checkpoint_every` steps and at each epoch's end; --resume continues a
run exactly where its last checkpoint left it. Seeded: the same seed gives the same weights on CPU.
`init` starts from an earlier `vbert distill` directory instead of the teacher's layers (to train
longer, or to specialize general shallow layers on a domain corpus); its lineage is kept in the
new directory's metadata.
A seeded 2 % of the corpus (at most 500 sentences) is held out; its MSE is reported per epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .data import CORPUS_FORMATS, DataError, check_corpus, read_corpus
from .train import epoch_batches, lr_lambda, torch_threads

CHECKPOINT_FILE = "checkpoint.pt"
DEV_FRACTION, MAX_DEV = 0.02, 500
ATTENTION_LAYERS = ("first", "upper")   # the attention term on layer k only, or averaged over every upper layer


@dataclass(frozen=True)
class DistillConfig:
    corpus: tuple[str, ...]
    out: str
    backbone: str | None = None
    skip_layers: int = 3
    epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-4
    warmup: float = 0.05
    max_length: int = 128
    final_weight: float = 0.0
    attention_weight: float = 0.0
    attention_layers: str = "first"
    max_sentences: int | None = None
    corpus_format: str = "auto"
    seed: int = 0
    checkpoint_every: int = 200
    resume: bool = False
    threads: int | None = None
    device: str = "cpu"
    show_progress: bool = True
    init: str | None = None

    def __post_init__(self) -> None:
        check_corpus(self.corpus)
        for name in ("skip_layers", "epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3, got {self.max_length}")
        for name in ("final_weight", "attention_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.attention_layers not in ATTENTION_LAYERS:
            raise ValueError(f"attention_layers must be one of {ATTENTION_LAYERS}, got {self.attention_layers!r}")
        if self.max_sentences is not None and self.max_sentences < 2:
            raise ValueError(f"max_sentences must be >= 2, got {self.max_sentences}")
        if self.corpus_format not in CORPUS_FORMATS:
            raise ValueError(f"corpus format {self.corpus_format!r} is not one of {CORPUS_FORMATS}")
        if self.backbone is not None and not Path(self.backbone).is_dir():
            raise ValueError(f"backbone {self.backbone!r} is not a directory")
        if self.init is not None and not Path(self.init).is_dir():
            raise ValueError(f"init {self.init!r} is not a directory")


def _masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real tokens: a, b [B, L, H], mask [B, L] bool."""
    return ((a - b) ** 2)[mask].mean()


def load_sentences(config: DistillConfig) -> list[str]:
    texts = [t for path in config.corpus for t in read_corpus(path, config.corpus_format)]
    if len(texts) < 2:
        raise DataError(f"the corpus has {len(texts)} sentence(s); distillation needs at least 2")
    if config.max_sentences is not None and len(texts) > config.max_sentences:
        g = torch.Generator().manual_seed(config.seed)
        keep = sorted(torch.randperm(len(texts), generator=g)[:config.max_sentences].tolist())
        texts = [texts[i] for i in keep]
    return texts


class Distiller:
    """Teacher (frozen vbert Encoder) + student (ShallowModel) + the loss; one object per run."""

    def __init__(self, teacher, student, final_weight: float, attention_weight: float = 0.0,
                 attention_layers: str = "first"):
        if attention_layers not in ATTENTION_LAYERS:
            raise ValueError(f"attention_layers must be one of {ATTENTION_LAYERS}, got {attention_layers!r}")
        self.teacher, self.student = teacher, student
        self.final_weight, self.attention_weight = final_weight, attention_weight
        self.attention_layers = attention_layers
        self.k = student.skip_layers

    def batch_tensors(self, rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.student.edge_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = True
        return ids.to(device), torch.zeros_like(ids).to(device), mask.to(device)

    def upper_states(self, x: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's upper layers on x (the states entering layer k): [input of layer k, ..., input
        of the last layer, final output]."""
        states = [x]
        for i in range(self.k, self.teacher.spec.num_layers):
            states.append(self.teacher.run_layers(states[-1], mask, start=i, stop=i + 1))
        return states

    def attention_kl(self, layer: int, student: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
                     ) -> torch.Tensor:
        """KL(teacher || student) of `layer`'s attention on the target vs the student's states (both the
        input of that layer), summed over keys, averaged over heads and real query tokens."""
        module = self.teacher.layers[layer]
        with torch.no_grad():
            t = module.attention_log_probs(target, mask)                                     # [B, nh, L, L]
        s = module.attention_log_probs(student, mask)
        kl = (t.exp() * (t - s)).sum(-1)                                                     # [B, nh, L]
        return kl.mean(1)[mask].mean()

    def loss(self, ids, types, mask, measure: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """(total loss, {"mse", "final_mse", "attn_kl", "upper_attn_kl"}): the MSE at layer k, the final
        layer's MSE, layer k's attention KL and the mean attention KL over all upper layers. A term is
        computed when it is in the loss or `measure` (dev metrics); else reported as 0."""
        upper_attention = self.attention_weight and self.attention_layers == "upper"
        run_upper = bool(self.final_weight or upper_attention or measure)
        with torch.no_grad():
            target = self.teacher.run_layers(self.teacher.embed(ids, types), mask, stop=self.k)     # [B, L, H]
            teacher_states = self.upper_states(target, mask) if run_upper else [target]
        merged = self.student(ids, types, mask)                                                    # [B, L, H]
        states = self.upper_states(merged, mask) if run_upper else [merged]
        mse = _masked_mse(merged, target, mask)
        zero = torch.zeros(())
        terms = {"mse": mse, "final_mse": zero, "attn_kl": zero, "upper_attn_kl": zero}
        if run_upper:
            terms["final_mse"] = _masked_mse(states[-1], teacher_states[-1], mask)
        if self.attention_weight or measure:
            terms["attn_kl"] = self.attention_kl(self.k, merged, target, mask)
        if upper_attention or measure:
            kls = [terms["attn_kl"]] + [self.attention_kl(self.k + i, states[i], teacher_states[i], mask)
                                        for i in range(1, len(states) - 1)]
            terms["upper_attn_kl"] = torch.stack(kls).mean()
        total = (mse + self.final_weight * terms["final_mse"]
                 + self.attention_weight * terms["upper_attn_kl" if upper_attention else "attn_kl"])
        return total, {name: float(value.detach()) for name, value in terms.items()}

    @torch.no_grad()
    def dev_metrics(self, rows: list[list[int]], batch_size: int, device) -> dict[str, float]:
        """{"dev_mse", "dev_final_mse", "dev_attn_kl", "dev_upper_attn_kl"}: per real token over the
        held-out sentences."""
        sums, count = {"mse": 0.0, "final_mse": 0.0, "attn_kl": 0.0, "upper_attn_kl": 0.0}, 0
        for start in range(0, len(rows), batch_size):
            ids, types, mask = self.batch_tensors(rows[start:start + batch_size], device)
            _, metrics = self.loss(ids, types, mask, measure=True)
            n = int(mask.sum())
            sums = {k: v + metrics[k] * n for k, v in sums.items()}
            count += n
        return {f"dev_{k}": v / max(1, count) for k, v in sums.items()}


def distill(config: DistillConfig, echo: Callable[[str], None] = print) -> dict:
    """Run (or resume) a distillation; writes OUT/shallow.{json,safetensors}; returns the summary."""
    with torch_threads(config.threads):
        return _distill(config, echo)


def _distill(config: DistillConfig, echo: Callable[[str], None]) -> dict:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from vbert.backbone import Encoder
    from vbert.config import default_backbone_path
    from vbert.device import DeviceContext
    from vbert.shallow import ShallowModel, SkipError, load_shallow, save_shallow, teacher_upper_hash

    started = time.perf_counter()
    out = Path(config.out)
    ckpt_path = out / CHECKPOINT_FILE
    if config.resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no {CHECKPOINT_FILE} in {out}")
    if not config.resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output {out} exists and is not empty (use --resume to continue a run)")
    out.mkdir(parents=True, exist_ok=True)
    device = DeviceContext.create(config.device, "float32").device
    backbone_path = config.backbone or default_backbone_path()

    texts = load_sentences(config)
    tokenizer = AutoTokenizer.from_pretrained(str(backbone_path), local_files_only=True)
    rows = [list(r) for r in tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]]
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    num_dev = max(1, min(MAX_DEV, round(DEV_FRACTION * len(rows))))
    dev_rows = [rows[i] for i in sorted(order[:num_dev])]
    train_rows = [rows[i] for i in sorted(order[num_dev:])]

    teacher = Encoder.from_checkpoint(backbone_path).to(device).eval().requires_grad_(False)
    edge_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    torch.manual_seed(config.seed)
    init = None
    if config.init is None:
        student = ShallowModel.from_teacher(teacher, config.skip_layers, edge_id)
    else:
        try:
            student, init_meta = load_shallow(config.init, teacher)
        except SkipError as e:
            raise ValueError(f"--init: {e}") from e
        if (init_meta.skip_layers, init_meta.edge_id) != (config.skip_layers, edge_id):
            raise ValueError(f"--init {config.init}: replaces {init_meta.skip_layers} layers with edge id "
                             f"{init_meta.edge_id}; this run has --skip-layers {config.skip_layers}, edge id {edge_id}")
        init = {"path": str(config.init), "weights_hash": init_meta.weights_hash, "distill": init_meta.distill}
        student.requires_grad_(True)
    student = student.to(device).train()
    distiller = Distiller(teacher, student, config.final_weight, config.attention_weight, config.attention_layers)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_rows) / config.batch_size)
    num_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda("linear", round(config.warmup * num_steps),
                                                                       num_steps))
    lengths = [len(r) for r in train_rows]
    order_gen = torch.Generator().manual_seed(config.seed + 1)
    epoch, step_in_epoch, history = 1, 0, []
    if config.resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        older = {"init": None, "attention_weight": 0.0, "attention_layers": "first"}  # checkpoints from before these
        if {**older, **ckpt["config"]} != _resumable(config):
            raise ValueError(f"--resume: {ckpt_path} was written by a run with other settings "
                             f"({ckpt['config']}); give the same options")
        student.load_state_dict(ckpt["student"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        order_gen.set_state(ckpt["epoch_generator"])
        epoch, step_in_epoch, history = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["history"]
        echo(f"resuming at epoch {epoch}, step {step_in_epoch}/{steps_per_epoch}")
    echo(f"distilling {config.skip_layers} of {teacher.spec.num_layers} layers: {len(train_rows)} train, "
         f"{len(dev_rows)} dev sentences, {sum(p.numel() for p in student.parameters()):,} parameters, "
         f"{num_steps} steps on {device}")
    if not history:
        history.append({"epoch": 0, **distiller.dev_metrics(dev_rows, config.batch_size, device)})
        echo(f"before training: dev mse {history[0]['dev_mse']:.5f}  final-layer mse "
             f"{history[0]['dev_final_mse']:.5f}  attention kl {history[0]['dev_attn_kl']:.5f} (all upper layers "
             f"{history[0]['dev_upper_attn_kl']:.5f})")

    while epoch <= config.epochs:
        epoch_state = order_gen.get_state()
        batches = epoch_batches(lengths, config.batch_size, order_gen, True)
        bar = tqdm(total=len(batches), initial=step_in_epoch, desc=f"distill epoch {epoch}/{config.epochs}",
                   disable=not config.show_progress, leave=False)
        total, count = 0.0, 0
        with bar:
            for i in range(step_in_epoch, len(batches)):
                ids, types, mask = distiller.batch_tensors([train_rows[j] for j in batches[i]], device)
                loss, metrics = distiller.loss(ids, types, mask)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                total, count = total + metrics["mse"], count + 1
                bar.update(1)
                bar.set_postfix(mse=f"{total / count:.5f}")
                if (i + 1) % config.checkpoint_every == 0 and i + 1 < len(batches):
                    _save_checkpoint(ckpt_path, config, student, optimizer, scheduler, epoch_state, epoch, i + 1,
                                     history)
        record = {"epoch": epoch, "train_mse": total / max(1, count),
                  **distiller.dev_metrics(dev_rows, config.batch_size, device)}
        history.append(record)
        echo(f"epoch {epoch}/{config.epochs}  train mse {record['train_mse']:.5f}  dev mse {record['dev_mse']:.5f}  "
             f"final-layer mse {record['dev_final_mse']:.5f}  attention kl {record['dev_attn_kl']:.5f} "
             f"(all upper layers {record['dev_upper_attn_kl']:.5f})")
        epoch, step_in_epoch = epoch + 1, 0
        _save_checkpoint(ckpt_path, config, student, optimizer, scheduler, order_gen.get_state(), epoch, 0, history)

    summary = {"corpus": list(config.corpus), "sentences": len(rows), "train_sentences": len(train_rows),
               "dev_sentences": len(dev_rows), "history": history, "args": asdict(config), "init": init,
               "seconds_this_run": time.perf_counter() - started}
    student.eval()
    name = "all-MiniLM-L6-v2" if config.backbone is None else Path(config.backbone).name
    meta = save_shallow(student, out, name, teacher_upper_hash(teacher, config.skip_layers), summary)
    echo(f"wrote {out} (weights {meta.weights_hash[:12]}, dev mse {history[-1]['dev_mse']:.5f})")
    return summary


def _resumable(config: DistillConfig) -> dict:
    """The settings a resumed run must share with the run it continues."""
    d = asdict(config)
    for key in ("resume", "show_progress", "threads", "device", "checkpoint_every"):
        d.pop(key)
    d["corpus"] = list(d["corpus"])
    return d


def _save_checkpoint(path: Path, config, student, optimizer, scheduler, epoch_generator_state, epoch: int,
                     step_in_epoch: int, history: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"config": _resumable(config), "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch_generator": epoch_generator_state, "epoch": epoch,
                "step_in_epoch": step_in_epoch, "history": list(history)}, tmp)
    tmp.replace(path)
