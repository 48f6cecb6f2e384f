#!/usr/bin/env python
"""Mixed-tenant throughput: N tenant adapters resident, B rows per batch from random tenants.

    python benchmarks/multitenant.py --tenants 1000 --batch 32 --seq 128 --adapter lora --json out/x.json

Contenders, timed interleaved (each iteration runs each once, order rotated, so noise hits all alike):
  ours               the mixed batch, each row from a uniformly random tenant among the N
  base               the same input ids through the same model.forward, all rows on slot 0
  ours_same_tenants  (LoRA, N > --peft-max-tenants only) ours on exactly the rows PEFT gets
  peft               transformers BertModel + PEFT holding min(N, cap) of the same LoRA adapters,
                     one forward with adapter_names=[...] per row (PEFT's mixed-batch inference)
Writes the result JSON and a bar chart PNG next to it (same stem).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from vbert import (AdapterArtifact, BackboneConfig, BottleneckAdapter, EncodeRow, Head, HeadKind, HeadSpec,
                   LoraAdapter, ModelConfig, MultiTenantModel, PoolConfig, save_artifact)

PEFT_NOTE_BOTTLENECK = "PEFT has no bottleneck-adapter mixed batch (adapter_names is LoRA-family only)"
PEFT_NOTE_DISABLED = "disabled (--peft-max-tenants 0)"


@dataclass(frozen=True)
class BenchConfig:
    tenants: int
    batch: int
    seq: int
    adapter: str = "lora"
    rank: int = 8
    bottleneck_size: int = 64
    iters: int = 8
    warmup: int = 2
    peft_max_tenants: int = 100
    backbone: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        lows = {"tenants": 1, "batch": 1, "iters": 1, "seq": 2, "warmup": 0, "peft_max_tenants": 0}
        for name, low in lows.items():
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.adapter not in ("lora", "bottleneck"):
            raise ValueError(f"--adapter must be lora or bottleneck, got {self.adapter!r}")

    @property
    def num_peft(self) -> int:
        return min(self.tenants, self.peft_max_tenants) if self.adapter == "lora" else 0


# -- setup -------------------------------------------------------------------------------------
def build_model(cfg: BenchConfig) -> MultiTenantModel:
    n_lora = cfg.tenants if cfg.adapter == "lora" else 0
    pool = PoolConfig(num_lora_slots=n_lora, num_bottleneck_slots=cfg.tenants - n_lora,
                      max_lora_rank=cfg.rank, max_bottleneck_size=cfg.bottleneck_size)
    return MultiTenantModel(ModelConfig(BackboneConfig(cfg.backbone, cfg.device, cfg.dtype), pool))


def make_artifact(m: MultiTenantModel, cfg: BenchConfig, g: torch.Generator) -> AdapterArtifact:
    head = Head(HeadSpec(HeadKind.EMBED, pooling="mean", normalize=False))
    if cfg.adapter == "lora":
        adapter = LoraAdapter.random(m.spec.shape, rank=cfg.rank, generator=g)
    else:
        adapter = BottleneckAdapter.random(m.spec.shape, size=cfg.bottleneck_size, generator=g)
    return AdapterArtifact(adapter, head)


def load_tenants(m: MultiTenantModel, cfg: BenchConfig, export_dir: Path
                 ) -> tuple[list[int], float, list[Path]]:
    """Build and load N random adapters; the first cfg.num_peft are also exported as PEFT dirs.
    Returns (slots, build_s without the export, exported dirs)."""
    g = torch.Generator().manual_seed(cfg.seed)
    slots, dirs, export_s = [], [], 0.0
    t0 = time.perf_counter()
    for i in tqdm(range(cfg.tenants), desc=f"build {cfg.adapter} adapters", unit="adapter"):
        art = make_artifact(m, cfg, g)
        slots.append(m.load_adapter(art))
        if i < cfg.num_peft:
            t1 = time.perf_counter()
            dirs.append(save_artifact(art, export_dir / f"t{i}", backbone_name=m.path))
            export_s += time.perf_counter() - t1
    m.device.synchronize()
    return slots, time.perf_counter() - t0 - export_s, dirs


def special_ids(m: MultiTenantModel) -> tuple[int, int]:
    """[CLS] and [SEP] of the backbone's tokenizer (101, 102 for BERT uncased if it has none)."""
    try:
        tok = m.tokenizer
        return int(tok.cls_token_id), int(tok.sep_token_id)
    except (OSError, ValueError, TypeError):
        return 101, 102


def random_ids(rng: np.random.Generator, batch: int, seq: int, vocab: int, cls: int, sep: int
               ) -> list[list[int]]:
    low = 1000 if vocab > 2000 else 1   # skip [unused]/special ids of BERT vocabularies
    body = rng.integers(low, vocab, size=(batch, seq - 2))
    return [[cls, *row.tolist(), sep] for row in body]


def encode_rows(ids: list[list[int]], slots: list[int]) -> list[EncodeRow]:
    return [EncodeRow(input_ids=r, slot=s, normalize=False) for r, s in zip(ids, slots)]


# -- PEFT peer ---------------------------------------------------------------------------------
def attach_peft(m: MultiTenantModel, dirs: list[Path]):
    """transformers BertModel of the same checkpoint + PEFT with one named adapter per dir."""
    from peft import PeftModel
    from transformers import BertModel

    base = BertModel.from_pretrained(m.path, local_files_only=True, dtype=m.device.dtype).to(m.device.device)
    t0 = time.perf_counter()
    model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name="t0")
    for i, d in enumerate(tqdm(dirs[1:], desc="attach PEFT adapters", unit="adapter"), start=1):
        model.load_adapter(str(d), adapter_name=f"t{i}")
    model.to(m.device.device).eval()
    m.device.synchronize()
    return model, time.perf_counter() - t0


def peft_forward(model, ids: list[list[int]], names: list[str], device: torch.device) -> torch.Tensor:
    """Mean-pooled last hidden state [B, H] of PEFT's mixed-adapter forward (rows have no padding)."""
    with torch.inference_mode():
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), adapter_names=names)
        return out.last_hidden_state.mean(1)


def peft_max_abs_diff(m: MultiTenantModel, model, ids, slots, names, num_rows: int = 2) -> float:
    """Not timed: our embeddings (mean pooling, no normalization) vs PEFT's on a few rows."""
    ours = torch.stack([o.embedding for o in m.forward(encode_rows(ids[:num_rows], slots[:num_rows]))])
    theirs = peft_forward(model, ids[:num_rows], names[:num_rows], m.device.device).float().cpu()
    return float((ours - theirs).abs().max())


# -- timing ------------------------------------------------------------------------------------
def time_interleaved(contenders: dict[str, Callable[[], object]], iters: int, warmup: int,
                     sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per call of each contender; iteration i runs all of them once, order rotated by i."""
    names = list(contenders)
    for n in names * warmup:
        contenders[n]()
    sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in tqdm(range(iters), desc="timed iterations", unit="iter"):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            contenders[n]()
            sync()
            times[n].append(time.perf_counter() - t0)
    return times


def noise_checks(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Cross-checks of the ratios of medians: `paired_median`, the median over iterations of the
    speed ratio of two contenders timed in the same iteration (robust to drifting load), and
    `ratio_of_min`, the ratio of their fastest calls (robust to bursts of load)."""
    peer = "ours_same_tenants" if "ours_same_tenants" in times else "ours"
    pairs = {k: v for k, v in {"ours_over_base": ("ours", "base"), "ours_over_peft": (peer, "peft")}.items()
             if v[1] in times}
    return {"paired_median": {k: statistics.median(d / o for o, d in zip(times[a], times[b]))
                              for k, (a, b) in pairs.items()},
            "ratio_of_min": {k: min(times[b]) / min(times[a]) for k, (a, b) in pairs.items()}}


def git_revision() -> str | None:
    """HEAD of the checkout holding vbert, '+dirty' when vbert/ has uncommitted changes."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True, check=True).stdout.strip()

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain", "vbert")
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def host_cpu() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
                platform.processor() or platform.machine())


# -- run ---------------------------------------------------------------------------------------
def peer_contenders(m: MultiTenantModel, cfg: BenchConfig, dirs: list[Path], ids: list[list[int]],
                    slots: list[int], tenant: np.ndarray, rng: np.random.Generator) -> tuple[dict, dict]:
    """The PEFT peer and, when it holds fewer tenants than ours, ours on exactly its rows;
    plus the untimed PEFT fields (attach time, agreement check)."""
    model, attach_s = attach_peft(m, dirs)
    same = tenant if cfg.num_peft == cfg.tenants else rng.integers(0, cfg.num_peft, size=cfg.batch)
    same_rows, names = encode_rows(ids, [slots[t] for t in same]), [f"t{t}" for t in same]
    fields = {"peft_num_adapters": cfg.num_peft, "peft_attach_s": attach_s,
              "peft_max_abs_diff": peft_max_abs_diff(m, model, ids, [r.slot for r in same_rows], names)}
    contenders = {"ours_same_tenants": lambda: m.forward(same_rows)} if cfg.num_peft < cfg.tenants else {}
    contenders["peft"] = lambda: peft_forward(model, ids, names, m.device.device)
    return contenders, fields


def peft_fields(cfg: BenchConfig, tps: dict[str, float], untimed: dict) -> dict:
    out = {"peft_tokens_per_s": None, "ours_over_peft": None, "peft_num_adapters": 0, "peft_attach_s": None,
           "peft_max_abs_diff": None, "ours_same_tenants_tokens_per_s": None,
           "peft_note": PEFT_NOTE_BOTTLENECK if cfg.adapter == "bottleneck" else PEFT_NOTE_DISABLED}
    if "peft" in tps:
        ours_same = tps.get("ours_same_tenants", tps["ours"])
        out.update(untimed, peft_tokens_per_s=tps["peft"], ours_same_tenants_tokens_per_s=ours_same,
                   ours_over_peft=ours_same / tps["peft"],
                   peft_note=f"PEFT {version('peft')}, mixed batch via adapter_names; "
                             "ours_over_peft compares both on the same rows and tenants")
    return out


def run(cfg: BenchConfig, command: list[str] | None = None) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    m = build_model(cfg)
    rng = np.random.default_rng(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="vbert-bench-") as tmp:
        slots, build_s, dirs = load_tenants(m, cfg, Path(tmp))
        ids = random_ids(rng, cfg.batch, cfg.seq, m.spec.vocab_size, *special_ids(m))
        tenant = rng.integers(0, cfg.tenants, size=cfg.batch)            # row -> tenant index
        rows, base_rows = encode_rows(ids, [slots[t] for t in tenant]), encode_rows(ids, [0] * cfg.batch)
        contenders, untimed = {"ours": lambda: m.forward(rows), "base": lambda: m.forward(base_rows)}, {}
        if cfg.num_peft:
            peers, untimed = peer_contenders(m, cfg, dirs, ids, slots, tenant, rng)
            contenders.update(peers)
        times = time_interleaved(contenders, cfg.iters, cfg.warmup, m.device.synchronize)
    tokens = cfg.batch * cfg.seq
    tps = {n: tokens / statistics.median(t) for n, t in times.items()}
    size = {"rank": cfg.rank} if cfg.adapter == "lora" else {"bottleneck_size": cfg.bottleneck_size}
    return {
        "adapter": cfg.adapter, "num_tenants": cfg.tenants, "batch": cfg.batch, "seq": cfg.seq, **size,
        "tokens_per_s": tps["ours"], "base_tokens_per_s": tps["base"],
        "multitenant_over_base": tps["ours"] / tps["base"], **peft_fields(cfg, tps, untimed),
        "timing": f"tokens per forward (batch*seq = {tokens}) / median seconds of {cfg.iters} interleaved "
                  f"iterations after {cfg.warmup} warm-up calls each",
        "noise_checks": noise_checks(times), "seconds": times,
        "bytes_per_adapter": m.pool.bytes_per_slot(cfg.adapter), "build_s": build_s,
        "backbone": m.name, "device": m.device.describe(), "dtype": m.device.dtype_name,
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": host_cpu(), "git": git_revision(), "config": asdict(cfg),
        "command": command if command is not None else sys.argv,
    }


# -- output ------------------------------------------------------------------------------------
BAR_FIELDS = (("base", "base_tokens_per_s", "#999999"), ("ours", "tokens_per_s", "#1f77b4"),
              ("ours (PEFT's tenants)", "ours_same_tenants_tokens_per_s", "#6baed6"),
              ("PEFT", "peft_tokens_per_s", "#ff7f0e"))


def result_label(r: dict) -> str:
    size = f"r={r['rank']}" if r["adapter"] == "lora" else f"m={r['bottleneck_size']}"
    return f"{r['adapter']} {size}, N={r['num_tenants']}, B={r['batch']}, L={r['seq']}"


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skip = "ours_same_tenants_tokens_per_s" if "ours_same_tenants" not in result["seconds"] else None
    bars = [(label, result[key], c) for label, key, c in BAR_FIELDS
            if result.get(key) is not None and key != skip]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    for i, (_, v, _) in enumerate(bars):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{result_label(result)}\n{result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_text(r: dict) -> str:
    lines = [result_label(r) + f" on {r['device']} ({r['dtype']})",
             f"  ours {r['tokens_per_s']:,.0f} tok/s, base {r['base_tokens_per_s']:,.0f} tok/s, "
             f"multitenant/base {r['multitenant_over_base']:.3f}",
             f"  {r['bytes_per_adapter']:,} bytes/adapter; "
             f"{r['num_tenants']} adapters built in {r['build_s']:.2f} s"]
    if r["peft_tokens_per_s"] is not None:
        lines.append(f"  PEFT ({r['peft_num_adapters']} adapters, attach {r['peft_attach_s']:.2f} s) "
                     f"{r['peft_tokens_per_s']:,.0f} tok/s; ours on the same rows "
                     f"{r['ours_same_tenants_tokens_per_s']:,.0f} tok/s; "
                     f"ours/PEFT {r['ours_over_peft']:.2f}; "
                     f"max |diff| {r['peft_max_abs_diff']:.2e}")
    else:
        lines.append(f"  PEFT: {r['peft_note']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=int, required=True, help="adapters resident in the pool (N)")
    p.add_argument("--batch", type=int, default=32, help="rows per mixed batch (B)")
    p.add_argument("--seq", type=int, default=128, help="tokens per row, [CLS] and [SEP] included (L)")
    p.add_argument("--adapter", choices=("lora", "bottleneck"), default="lora")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--bottleneck-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=8, help="timed iterations per contender")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peft-max-tenants", type=int, default=100, 
                   help="PEFT gets min(N, this) adapters; 0: none")
    p.add_argument("--backbone", default=None, help="local HF BERT dir (default: embedded all-MiniLM-L6-v2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    p.add_argument("--json", required=True, help="result path; the PNG goes next to it")
    a = vars(p.parse_args(argv))
    out = Path(a.pop("json"))
    return BenchConfig(**a), out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, out = parse_args(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = run(cfg, command=[sys.executable, sys.argv[0], *argv])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_plot(result, out.with_suffix(".png"))
    print(summary_text(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
