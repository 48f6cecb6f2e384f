"""The default recipe of `vbert train`, per task and adapter kind: the settings that met the target
(within 2 points of full fine-tuning) in the project's own table,
benchmarks/results/cpu-2026-11-23/training/table.md (runs/*.json hold each run's full config).

A setting left unset (None in TrainConfig / AdapterConfig, a flag not given) takes the recipe's value
for the run's task and adapter kind; TrainConfig resolves it, and the run's training.json records the
resolved values, so a run is reproduced by passing them explicitly (`config_from_record`).

No torch here: `vbert --help` reads these values.
"""
from __future__ import annotations

from dataclasses import dataclass

ALL_LORA_TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")     # = vbert.config.LORA_TARGETS
ATTENTION_LORA_TARGETS = ("query", "key", "value", "attn_out")                   # = vbert.config.DEFAULT_LORA_TARGETS


@dataclass(frozen=True)
class Recipe:
    """Defaults of one (task, adapter kind); `row` is the table row that justifies them."""

    epochs: int
    lr: float
    dropout: float
    row: str
    serving: str = ""          # what a server needs beyond its defaults to serve the result
    bottleneck_size: int = 64
    bottleneck_placement: str = "attn_out"
    rank: int = 8
    targets: tuple[str, ...] = ATTENTION_LORA_TARGETS


RECIPES: dict[tuple[str, str], Recipe] = {
    ("classification", "bottleneck"): Recipe(
        epochs=3, lr=3e-3, dropout=0.0, bottleneck_size=64, bottleneck_placement="ffn_out",
        row="bottleneck-ffn: macro-F1 vs full fine-tuning sci-cite -1.01, chemprot +2.19; rct-20k +2.97 at 10 epochs"),
    ("classification", "lora"): Recipe(
        epochs=3, lr=3e-3, dropout=0.0, rank=8, targets=ATTENTION_LORA_TARGETS,
        row="lora: sci-cite -1.36, chemprot +0.06; rct-20k +3.19 at 10 epochs"),
    ("classification", "none"): Recipe(
        epochs=3, lr=1e-4, dropout=0.0, row="full: the reference rows"),
    # Houlsby (size 64 at both positions) rather than ffn_out size 128 (-1.09, mean of two seeds): the
    # default server serves it as it is (it takes two bottleneck slots); size 128 needs
    # max_bottleneck_size >= 128, which doubles every bottleneck slot. Pass --bottleneck-placement
    # ffn_out --bottleneck-size 128 for that one.
    ("ner", "bottleneck"): Recipe(
        epochs=20, lr=3e-3, dropout=0.1, bottleneck_size=64, bottleneck_placement="both",
        row="bottleneck-both-drop-e20: NCBI-disease span F1 -0.55 vs the strongest full run, seed 0; "
            "ffn_out size 128 (server: max_bottleneck_size >= 128) -1.09, mean of 2 seeds"),
    ("ner", "lora"): Recipe(
        epochs=20, lr=2e-3, dropout=0.0, rank=16, targets=ALL_LORA_TARGETS,
        row="lora-all-r16-lr2e-3-e20: NCBI-disease -1.67, one seed",
        serving="lora_targets with ffn_in,ffn_out"),
    ("ner", "none"): Recipe(
        epochs=10, lr=1e-4, dropout=0.1, row="full-drop: the reference, 82.77 mean of seeds 0 and 1"),
}

# `vbert train --task generation` (a decoder LoRA): common LoRA fine-tuning settings, NOT measured on a real
# task yet (docs/training.md, "Generative adapters"); rank 8 on every projection the server serves.
GENERATION_RECIPE = Recipe(
    epochs=3, lr=2e-4, dropout=0.0, rank=8,
    targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    row="not measured yet")

FORMER_DEFAULTS = ("--epochs 3 --lr 1e-3 (--full-finetune: 5e-5) --dropout 0 --bottleneck-size 64 "
                   "--bottleneck-placement attn_out --rank 8 --lora-targets query,key,value,attn_out")

# Settings that older training.json files do not record, with the value they had then: a record
# without "bottleneck_placement" trained on the attention output, one without "dropout" had none.
UNRECORDED_BEFORE = {"bottleneck_placement": "attn_out", "dropout": 0.0}


def recipe(task: str, kind: str) -> Recipe:
    try:
        return RECIPES[task, kind]
    except KeyError:
        raise ValueError(f"no default recipe for task {task!r} and adapter kind {kind!r}") from None


def help_lines() -> list[str]:
    """One line per recipe, for `vbert train --help`."""
    out = []
    for (task, kind), r in RECIPES.items():
        what = {"bottleneck": f"bottleneck {r.bottleneck_placement} size {r.bottleneck_size}",
                "lora": f"LoRA rank {r.rank} on {','.join(r.targets)}", "none": "--full-finetune"}[kind]
        serving = f"; the server needs {r.serving}" if r.serving else ""
        out.append(f"{task}, {what}: {r.epochs} epochs, lr {r.lr:g}, dropout {r.dropout:g} ({r.row}{serving})")
    g = GENERATION_RECIPE
    out.append(f"generation, LoRA rank {g.rank} on {','.join(g.targets)}: {g.epochs} epochs, lr {g.lr:g}, batch 8, "
               f"max length 512 ({g.row})")
    return out + [f"before 2026-12-05 every task had: {FORMER_DEFAULTS}"]


def flags_of_record(args: dict) -> list[str]:
    """The `vbert train` flags that give a recorded run's config (training.json's "args"): every
    setting explicit, the ones older records lack at the value they had then (UNRECORDED_BEFORE).
    Without the --register options."""
    a, adapter = {**UNRECORDED_BEFORE, **args}, {"bottleneck_placement": UNRECORDED_BEFORE["bottleneck_placement"],
                                                 **args.get("adapter", {})}
    lr = a.get("lr") if a.get("lr") is not None else a["learning_rate"]
    flags = ["--task", a["task"], "--train", a["train_path"], "--out", a["out"], "--epochs", str(a["epochs"]),
             "--lr", repr(float(lr)), "--dropout", repr(float(a["dropout"]))]
    flags += ["--full-finetune"] if adapter["kind"] == "none" else ["--adapter-kind", adapter["kind"]]
    flags += ["--rank", str(adapter["rank"]), "--lora-targets", ",".join(adapter["targets"]),
              "--bottleneck-size", str(adapter["bottleneck_size"]),
              "--bottleneck-placement", adapter["bottleneck_placement"]]
    if adapter.get("alpha") is not None:
        flags += ["--alpha", repr(float(adapter["alpha"]))]
    if adapter.get("num_top_layers") is not None:
        flags += ["--layers", str(adapter["num_top_layers"])]
    for key, flag in (("dev_path", "--dev"), ("backbone", "--backbone"), ("seed", "--seed"),
                      ("schedule", "--schedule"), ("warmup", "--warmup"), ("weight_decay", "--weight-decay"),
                      ("batch_size", "--batch-size"), ("max_length", "--max-length"), ("patience", "--patience"),
                      ("pooling", "--pooling"), ("threads", "--threads"), ("device", "--device"),
                      ("max_labels", "--max-labels"), ("dev_fraction", "--dev-fraction"),
                      ("skip_shallow", "--skip-shallow"), ("skip_table", "--skip-table"),
                      ("skip_dtype", "--skip-dtype"), ("skip_table_file", "--skip-table-file")):
        if a.get(key) is not None:
            flags += [flag, str(a[key])]
    if "group_by_length" in a:
        flags.append("--group-by-length" if a["group_by_length"] else "--no-group-by-length")
    if "show_progress" in a:
        flags.append("--progress" if a["show_progress"] else "--no-progress")
    return flags
