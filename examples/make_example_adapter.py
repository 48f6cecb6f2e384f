"""Build an example adapter: a random LoRA (rank 8 on query/key/value/attn_out) with a classify
head (negative / neutral / positive) for the default backbone, all-MiniLM-L6-v2, saved as an
adapter directory that `vbert adapter upload` accepts. Its predictions are random: it shows the
workflow, not a trained model (train one with `vbert train`).

    .venv/bin/python examples/make_example_adapter.py --out examples/adapters/sentiment
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

from vbert import AdapterArtifact, Head, HeadKind, HeadSpec, LoraAdapter, save_artifact
from vbert.backbone import BackboneSpec
from vbert.config import default_backbone_path


def make_example_adapter(out: Path, labels: list[str], rank: int = 8, seed: int = 0,
                         backbone: str | None = None) -> Path:
    path = backbone or default_backbone_path()
    shape = BackboneSpec.from_checkpoint(path).shape          # reads config.json only
    g = torch.Generator().manual_seed(seed)
    adapter = LoraAdapter.random(shape, rank=rank, std=0.05, generator=g)
    head = Head.random(HeadSpec(HeadKind.CLASSIFY, tuple(labels), pooling="mean"), shape.hidden_size, generator=g)
    name = "all-MiniLM-L6-v2" if backbone is None else Path(backbone).name
    return save_artifact(AdapterArtifact(adapter, head), out, backbone_name=name, shape=shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="adapter directory to write (must not exist or be empty)")
    p.add_argument("--labels", default="negative,neutral,positive", help="comma-separated class labels")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (the server's max_lora_rank is 16 by default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default=None, help="HF BERT checkpoint dir (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args()
    if args.force and args.out.exists():
        shutil.rmtree(args.out)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    try:
        out = make_example_adapter(args.out, labels, rank=args.rank, seed=args.seed, backbone=args.backbone)
    except FileExistsError as e:
        p.error(f"{e} (use --force to replace it)")
    files = ", ".join(f"{f.name} ({f.stat().st_size} B)" for f in sorted(out.iterdir()))
    print(f"wrote {out}: {files}")


if __name__ == "__main__":
    main()
