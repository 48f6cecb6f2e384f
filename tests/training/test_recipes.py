"""`vbert train`'s defaults: the recipe of the task and adapter kind (training/recipes.py), resolved
into the config (and so into training.json), and earlier runs rebuilt exactly from their records."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from training.model import AdapterConfig
from training.recipes import RECIPES, UNRECORDED_BEFORE, flags_of_record, recipe
from training.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
RUNS = sorted((ROOT / "benchmarks" / "results" / "cpu-2026-11-23" / "training" / "runs").glob("*.json"))


def _config(task, kind="bottleneck", **kw) -> TrainConfig:
    return TrainConfig(task=task, train_path="train", out="out", adapter=AdapterConfig(kind=kind, **kw.pop("adapter", {})),
                       **kw)


@pytest.mark.parametrize("task,kind", sorted(RECIPES))
def test_unset_settings_take_the_task_recipe(task, kind):
    r, c = recipe(task, kind), _config(task, kind)
    assert (c.epochs, c.lr, c.dropout) == (r.epochs, r.lr, r.dropout)
    a = c.adapter
    assert (a.rank, a.targets, a.bottleneck_size, a.bottleneck_placement) == \
        (r.rank, r.targets, r.bottleneck_size, r.bottleneck_placement)
    recorded = c.to_json()                                     # training.json holds the resolved values
    assert recorded["epochs"] == r.epochs and recorded["lr"] == recorded["learning_rate"] == r.lr
    assert recorded["dropout"] == r.dropout and recorded["adapter"]["bottleneck_placement"] == r.bottleneck_placement


def test_the_recipes_are_the_rows_that_met_the_target():
    """Each default equals the settings of the recorded runs whose rows met the 2-point target."""
    cls, ner = recipe("classification", "bottleneck"), recipe("ner", "bottleneck")
    assert (cls.bottleneck_placement, cls.bottleneck_size, cls.dropout, cls.epochs, cls.lr) == ("ffn_out", 64, 0.0, 3, 3e-3)
    assert (ner.bottleneck_placement, ner.bottleneck_size, ner.dropout, ner.epochs, ner.lr) == ("both", 64, 0.1, 20, 3e-3)
    if not RUNS:
        pytest.skip("no recorded runs in benchmarks/results")
    recorded = {f.stem: json.loads(f.read_text()) for f in RUNS}
    for name, (task, kind) in {"sci-cite-bottleneck-ffn": ("classification", "bottleneck"),
                               "chemprot-bottleneck-ffn": ("classification", "bottleneck"),
                               "sci-cite-lora": ("classification", "lora"),
                               "NCBI-disease-bottleneck-both-drop-e20": ("ner", "bottleneck"),
                               "NCBI-disease-lora-all-r16-lr2e-3-e20": ("ner", "lora")}.items():
        run = TrainConfig.from_record(recorded[name]["args"])
        default = _config(task, kind)
        for field in ("epochs", "lr", "dropout"):
            assert getattr(run, field) == getattr(default, field), (name, field)
        for field in ("rank", "targets", "bottleneck_size", "bottleneck_placement"):
            if kind == "lora" and field.startswith("bottleneck") or kind == "bottleneck" and field in ("rank", "targets"):
                continue
            assert getattr(run.adapter, field) == getattr(default.adapter, field), (name, field)


def test_a_flag_replaces_one_setting_of_the_recipe():
    c = _config("ner", epochs=2, adapter={"bottleneck_size": 16})
    r = recipe("ner", "bottleneck")
    assert (c.epochs, c.adapter.bottleneck_size) == (2, 16)
    assert (c.lr, c.dropout, c.adapter.bottleneck_placement) == (r.lr, r.dropout, r.bottleneck_placement)
    assert _config("ner", dropout=0.0).dropout == 0.0                 # 0 is a setting, not "unset"
    with pytest.raises(ValueError, match="dropout must be in"):
        _config("ner", dropout=1.0)


@pytest.mark.skipif(not RUNS, reason="no recorded runs in benchmarks/results")
@pytest.mark.parametrize("path", RUNS, ids=[p.stem for p in RUNS])
def test_recorded_run_rebuilds_its_config(path, tmp_path, monkeypatch):
    """Every run of the table: its recorded settings give the same TrainConfig, through the library
    and through `vbert train` with the flags of the record, whatever today's defaults are."""
    args = json.loads(path.read_text())["args"]
    config = TrainConfig.from_record(args)
    recorded = config.to_json()
    for key, value in args.items():
        if key == "adapter":
            assert recorded["adapter"] == {**recorded["adapter"], **value}
        else:
            assert recorded[key] == value, key
    for key, value in UNRECORDED_BEFORE.items():               # older records: the value it had then
        if key not in args and key not in args["adapter"]:
            assert recorded.get(key, recorded["adapter"].get(key)) == value
    # the same through the CLI (paths replaced by local ones; they are not settings)
    import training.train as train_module
    from dispatcher.cli import main

    train_file = tmp_path / "train.txt"
    train_file.write_text("x\n")
    local = {"train_path": str(train_file), "out": str(tmp_path / "out"),
             "dev_path": str(train_file) if args.get("dev_path") else None}
    seen = []
    monkeypatch.setattr(train_module, "train", lambda cfg, echo: seen.append(cfg))
    res = CliRunner().invoke(main, ["train", *flags_of_record({**args, **local})])
    assert res.exit_code == 0, res.output
    assert seen == [TrainConfig.from_record(args, **local)]


def test_old_records_train_on_the_attention_output_without_dropout():
    """sci-cite-bottleneck (recorded before placement and dropout existed) must not pick up today's
    ffn_out / dropout defaults."""
    args = {"task": "classification", "train_path": "t", "out": "o", "dev_path": None, "epochs": 3, "seed": 0,
            "lr": 0.003, "adapter": {"kind": "bottleneck", "rank": 8, "alpha": None,
                                     "targets": ["query", "key", "value", "attn_out"], "bottleneck_size": 64,
                                     "num_top_layers": None}, "learning_rate": 0.003}
    c = TrainConfig.from_record(args)
    assert (c.adapter.bottleneck_placement, c.dropout, c.epochs, c.lr) == ("attn_out", 0.0, 3, 0.003)
    assert "--bottleneck-placement" in (f := flags_of_record(args)) and f[f.index("--bottleneck-placement") + 1] == \
        "attn_out" and f[f.index("--dropout") + 1] == "0.0"
