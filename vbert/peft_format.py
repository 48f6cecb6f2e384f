"""LoRA import from and export to the Hugging Face PEFT format
(`adapter_config.json` + `adapter_model.safetensors`), so PEFT-trained adapters serve unchanged
and ours load in PEFT.

PEFT names a BERT module by its path in the Hugging Face model (`encoder.layer.N.attention.self.query`,
`...attention.output.dense`, `...intermediate.dense`, `...output.dense`), under `base_model.model.`
and, for task models such as BertForSequenceClassification, a further `bert.`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .adapters import AdapterError, LoraAdapter, LoraWeights
from .heads import Head, HeadKind, HeadSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

HF_MODULE = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
             "attn_out": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense"}
_TARGET_OF = {v: k for k, v in HF_MODULE.items()}
_KEY = re.compile(r"^base_model\.model\.(?:bert\.)?encoder\.layer\.(\d+)\.(.+)\.lora_([AB])(?:\.default)?\.weight$")
_UNSUPPORTED = ("use_dora", True), ("fan_in_fan_out", True)


def module_name(layer: int, target: str) -> str:
    return f"encoder.layer.{layer}.{HF_MODULE[target]}"


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rule: a pattern key applies to a module whose name ends with it (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_peft_files(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The config and the tensors of a PEFT LoRA directory, after the checks every model family shares
    (a LORA config, no DoRA, no fan_in_fan_out, no trained biases, a readable weights file); AdapterError
    names the problem."""
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{path / CONFIG_FILE}: cannot read PEFT config ({e})")
    if not isinstance(cfg, dict):
        raise AdapterError(f"{path / CONFIG_FILE}: the PEFT config is not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, bad in _UNSUPPORTED:
        if cfg.get(key) == bad:
            raise AdapterError(f"{path}: PEFT option {key}={bad} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{path}: PEFT option bias={cfg['bias']!r} is not supported (only 'none')")
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"{path}: {WEIGHTS_FILE} is missing")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise AdapterError(f"{weights_path}: unreadable safetensors file ({e})")
    return cfg, tensors


def read_peft_lora(path: str | Path) -> tuple[LoraAdapter, dict[str, torch.Tensor]]:
    """LoRA weights of a PEFT directory, plus the tensors that are not LoRA weights (e.g. a
    saved classifier)."""
    path = Path(path)
    cfg, tensors = read_peft_files(path)
    rank, alpha = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    use_rslora = bool(cfg.get("use_rslora", False))
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    rest = {}
    for k, v in tensors.items():
        m = _KEY.match(k)
        if m is None:
            if ".lora_" in k:
                raise AdapterError(f"{path}: LoRA on module {k!r} is not supported "
                                   f"(supported: {sorted(HF_MODULE.values())} in encoder layers)")
            rest[k] = v
            continue
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if module not in _TARGET_OF:
            raise AdapterError(f"{path}: LoRA on module {module!r} is not supported (supported: {sorted(_TARGET_OF)})")
        parts.setdefault((layer, _TARGET_OF[module]), {})[ab] = v
    modules = {}
    for (layer, target), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: layer {layer} {target} has lora_{''.join(ab)} but not both A and B")
        name = module_name(layer, target)
        r_m = ab["A"].shape[0]
        alpha_m = float(_pattern_value(cfg.get("alpha_pattern"), name, alpha))
        modules[(layer, target)] = LoraWeights(ab["A"].float(), ab["B"].float(),
                                               LoraAdapter.scale_for(r_m, alpha_m, use_rslora))
    if not modules:
        raise AdapterError(f"{path}: no LoRA weights found in {WEIGHTS_FILE}")
    return LoraAdapter(rank=rank, alpha=alpha, modules=modules, use_rslora=use_rslora), rest


def read_peft_dir(path: str | Path) -> tuple[LoraAdapter, Head]:
    """A plain PEFT directory: its LoRA and the head PEFT saved (an embed head when it saved none);
    vbert.artifact.load_artifact makes them an AdapterArtifact."""
    adapter, rest = read_peft_lora(path)
    cfg = json.loads((Path(path) / CONFIG_FILE).read_text())
    w, b = rest.get("base_model.model.classifier.weight"), rest.get("base_model.model.classifier.bias")
    if w is None:
        return adapter, Head(HeadSpec(HeadKind.EMBED, pooling="mean"))
    if b is None:
        raise AdapterError(f"{path}: classifier weight saved without its bias")
    labels = tuple(f"LABEL_{i}" for i in range(w.shape[0]))
    task = cfg.get("task_type")
    if task == "SEQ_CLS":
        spec = HeadSpec(HeadKind.CLASSIFY, labels, pooling="pooler")
    elif task == "TOKEN_CLS":
        spec = HeadSpec(HeadKind.TAG, labels)
    else:
        raise AdapterError(f"{path}: a saved classifier with task_type {task!r} (expected SEQ_CLS or TOKEN_CLS)")
    return adapter, Head(spec, w.float(), b.float())


def to_peft(adapter: LoraAdapter, base_model_name_or_path: str = "") -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT config and tensors for a LoRA adapter (a BertModel base, task FEATURE_EXTRACTION).

    target_modules is a regex over exact module paths, so `attention.output.dense` and the FFN's
    `output.dense` are never confused; modules whose rank or scale differ from the adapter's
    nominal ones get rank_pattern / alpha_pattern entries."""
    modules_re = "|".join(sorted({re.escape(HF_MODULE[t]) for t in adapter.targets}))
    layers_re = "|".join(str(i) for i in adapter.layers)
    rank_pattern, alpha_pattern, tensors = {}, {}, {}
    for (layer, target), w in sorted(adapter.modules.items()):
        name = module_name(layer, target)
        if w.rank != adapter.rank:
            rank_pattern[name] = w.rank
        alpha_m = w.scale * (w.rank ** 0.5 if adapter.use_rslora else w.rank)
        if abs(alpha_m - adapter.alpha) > 1e-6 * max(1.0, abs(adapter.alpha)):
            alpha_pattern[name] = alpha_m
        tensors[f"base_model.model.{name}.lora_A.weight"] = w.A
        tensors[f"base_model.model.{name}.lora_B.weight"] = w.B
    cfg = {
        "peft_type": "LORA", "task_type": "FEATURE_EXTRACTION", "base_model_name_or_path": base_model_name_or_path,
        "r": adapter.rank, "lora_alpha": adapter.alpha, "lora_dropout": 0.0, "bias": "none",
        "use_rslora": adapter.use_rslora, "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": rf"encoder\.layer\.({layers_re})\.({modules_re})",
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "modules_to_save": None,
    }
    return cfg, tensors
