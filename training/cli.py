"""`vbert train`, `evaluate`, `distill` and `build-table` (put on the main group by dispatcher/cli.py; this
module imports neither it nor the modules that do the work, until a command runs).

Flags become a TrainConfig / EvaluateConfig here; nothing below receives click's arguments.
Errors in the data or the options exit with status 1 (2 for usage errors) and a one-line message.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import click

from .recipes import help_lines

# = vbert.config.LORA_TARGETS / vbert.adapters.BOTTLENECK_PLACEMENTS (not imported: importing vbert
# pulls in torch, and every `vbert` command would start slower)
LORA_TARGETS = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")
DECODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BOTTLENECK_PLACEMENTS = ("attn_out", "ffn_out", "both")
ATTENTION_LAYERS = ("first", "upper")                    # = training.distill.ATTENTION_LAYERS
HOST_HEAP_KEEP_MB = 512                                  # = vbert.config.HOST_HEAP_KEEP_MB


def _targets(value: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise click.BadParameter(f"{value!r}: give a comma-separated subset of {','.join(LORA_TARGETS)}")
    return targets


def _admin_token(admin_token: str | None, data_dir: str) -> str:
    if admin_token:
        return admin_token
    path = Path(data_dir) / "admin_token"
    if path.is_file():
        return path.read_text().strip()
    raise click.UsageError(f"--register needs an admin token: pass --admin-token, set VBERT_ADMIN_TOKEN, or point "
                           f"--data-dir at the server's data directory (no {path})")


def _quiet_transformers() -> None:
    """No progress bars of transformers' own (weight loading, shard writing)."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def _keeps_host_heap(command):
    """--host-heap-keep-mb on a command that computes: before it runs, the process keeps freed host memory for its
    next steps instead of faulting each step's activations in anew (vbert.device.keep_host_heap, as vbert serve)."""
    @functools.wraps(command)
    def run(*args, host_heap_keep_mb: int, **kwargs):
        from vbert.device import keep_host_heap

        keep_host_heap(host_heap_keep_mb)
        return command(*args, **kwargs)

    return click.option("--host-heap-keep-mb", default=HOST_HEAP_KEEP_MB, show_default=True,
                        type=click.IntRange(min=0),
                        help="Freed host memory (MiB) the process keeps for its next steps (glibc; 0: its defaults; "
                             "docs/operations.md#host-heap).")(run)


def _exit_on_remote_error(e) -> None:
    from dispatcher.commands.exit_codes import exit_code

    click.echo(f"error: {e}", err=True)
    raise SystemExit(exit_code(e.code.name))


TRAIN_EPILOG = "\b\nDefaults per task and adapter kind: the recipe that met the 2-point target in the project's " \
    "table\n(benchmarks/results/cpu-2026-11-23/training/table.md); a flag replaces one setting, training.json records " \
    "the values used:\n" + "\n".join(f"  {line}" for line in help_lines())


@click.command("train", epilog=TRAIN_EPILOG)
@click.option("--task", type=click.Choice(["classification", "ner", "generation"]), required=True,
              help="classification: JSON lines {text, label}; ner: CoNLL (word first, IOB2 tag last column); "
                   "generation: JSON lines {prompt, completion} or {messages}, a LoRA on the decoder.")
@click.option("--train", "train_path", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--dev", "dev_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Dev file for model selection (default: a seeded slice of --train is held out).")
@click.option("--adapter-kind", type=click.Choice(["bottleneck", "lora"]), default=None,
              help="Default: bottleneck (generation: lora, the only kind).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory (new or empty).")
@click.option("--epochs", default=None, type=click.IntRange(min=1), help="Default: the recipe's (below).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--backbone", default=None, type=click.Path(exists=True, file_okay=False),
              help="Local HF BERT checkpoint dir (default: the embedded all-MiniLM-L6-v2); generation: a local "
                   "Llama-family checkpoint dir (default: SmolLM2-135M-Instruct, converted into DATA_DIR/models).")
@click.option("--rank", default=None, type=click.IntRange(min=1), help="LoRA rank (default: the recipe's).")
@click.option("--lora-targets", default=None,
              help=f"LoRA target modules, a subset of {','.join(LORA_TARGETS)} (generation: of "
                   f"{','.join(DECODER_LORA_TARGETS)}; default: the recipe's).")
@click.option("--alpha", default=None, type=click.FloatRange(min=0, min_open=True),
              help="LoRA alpha (scale = alpha / rank; default 2 * rank).")
@click.option("--bottleneck-size", default=None, type=click.IntRange(min=1), help="Default: the recipe's.")
@click.option("--bottleneck-placement", type=click.Choice(list(BOTTLENECK_PLACEMENTS)), default=None,
              help="Bottleneck on each layer's attention output, feed-forward output (before its residual add "
                   "and LayerNorm), or both (Houlsby: twice the weights; two of a server's bottleneck slots). "
                   "Default: the recipe's.")
@click.option("--layers", default=None, type=click.IntRange(min=1), help="Adapters on the top N layers (default all).")
@click.option("--lr", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Learning rate (default: the recipe's).")
@click.option("--schedule", type=click.Choice(["linear", "constant"]), default="linear", show_default=True,
              help="After the warm-up: linear decay to 0, or constant.")
@click.option("--warmup", default=0.1, show_default=True, type=click.FloatRange(0, 1, max_open=True),
              help="Fraction of the steps with a linear warm-up.")
@click.option("--weight-decay", default=0.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--dropout", default=None, type=click.FloatRange(0, 1, max_open=True),
              help="Dropout while training: the frozen backbone's hidden and attention dropout and the head's "
                   "input (0: off; default: the recipe's); generation: LoRA dropout (default 0). Serving never "
                   "drops anything.")
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Default 32 (generation: 8).")
@click.option("--max-length", default=None, type=click.IntRange(min=2),
              help="Sub-tokens per training example, [CLS] and [SEP] included (default 128); generation: prompt + "
                   "completion + end-of-sequence tokens (default 512; longer prompts keep their last tokens).")
@click.option("--patience", default=None, type=click.IntRange(min=1),
              help="Stop after N epochs without a better dev metric (macro-F1 / span F1; generation: dev loss).")
@click.option("--full-finetune", is_flag=True,
              help="Reference run: train every backbone weight; writes a HF checkpoint + head, not an adapter.")
@click.option("--pooling", type=click.Choice(["mean", "cls"]), default="mean", show_default=True,
              help="Classification head input: mean over real tokens, or [CLS].")
@click.option("--dev-fraction", default=0.1, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Share of --train held out when no --dev is given.")
@click.option("--group-by-length/--no-group-by-length", default=True, show_default=True,
              help="Batch examples of similar length together (less padding; batches still shuffled).")
@click.option("--skip-shallow", default=None, type=click.Path(exists=True, file_okay=False),
              help="Train in skip mode: the lower layers are these shallow layers (`vbert distill`); adapters "
                   "go on the layers above them.")
@click.option("--skip-table", default="default", show_default=True,
              help="With --skip-shallow: the name of the server's skip table the adapter will run with.")
@click.option("--skip-dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default="float16",
              show_default=True, help="With --skip-shallow: the dtype of that table (`vbert build-table --dtype`).")
@click.option("--skip-table-file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="With --skip-shallow: the table file, looked up instead of computed (faster; the same values, "
                   "computed in the dtype the table records).")
@click.option("--max-labels", default=64, show_default=True, type=click.IntRange(min=1),
              help="Refuse more labels than this (the serving pool's max_labels).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads.")
@click.option("--device", default="cpu", show_default=True, help="cpu, auto, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="tqdm progress bars.")
@click.option("--register", is_flag=True, help="Upload the adapter to a server afterwards (admin API).")
@click.option("--server", default="127.0.0.1:50051", envvar="VBERT_SERVER", show_default=True,
              help="With --register: host:port of the server.")
@click.option("--tenant", default=None, help="With --register: the tenant that gets the adapter.")
@click.option("--adapter", "adapter_name", default=None, help="With --register: the adapter's name.")
@click.option("--admin-token", envvar="VBERT_ADMIN_TOKEN", default=None,
              help="With --register: admin token (else VBERT_ADMIN_TOKEN, else DATA_DIR/admin_token).")
@click.option("--data-dir", default="./var", show_default=True,
              help="With --register: the server's data directory; generation: the default decoder's conversion is "
                   "cached in DATA_DIR/models, where the server keeps it.")
@_keeps_host_heap
def train_command(task, train_path, dev_path, adapter_kind, out, epochs, seed, backbone, rank, lora_targets, alpha,
                  bottleneck_size, bottleneck_placement, layers, lr, schedule, warmup, weight_decay, dropout,
                  batch_size, max_length, patience, full_finetune, pooling, dev_fraction, group_by_length, skip_shallow,
                  skip_table, skip_dtype, skip_table_file, max_labels, threads, device, progress, register, server,
                  tenant, adapter_name, admin_token, data_dir) -> None:
    """Fine-tune an adapter and its head on the frozen backbone; write a servable adapter directory."""
    from .model import AdapterConfig
    from .train import TrainConfig, train

    if task == "generation":
        _train_generation(**{k: v for k, v in locals().items() if k != "task"})
        return
    adapter_kind = adapter_kind or "bottleneck"
    batch_size = 32 if batch_size is None else batch_size
    max_length = 128 if max_length is None else max_length
    if register:
        if full_finetune:
            raise click.UsageError("--register uploads adapters; a --full-finetune checkpoint cannot be served")
        if not tenant or not adapter_name:
            raise click.UsageError("--register needs --tenant and --adapter")
        token = _admin_token(admin_token, data_dir)

    def make_config():
        adapter = AdapterConfig(kind="none" if full_finetune else adapter_kind, rank=rank, alpha=alpha,
                                targets=None if lora_targets is None else _targets(lora_targets),
                                bottleneck_size=bottleneck_size, num_top_layers=layers,
                                bottleneck_placement=bottleneck_placement)
        return TrainConfig(task=task, train_path=train_path, out=out, dev_path=dev_path, adapter=adapter,
                           backbone=backbone, epochs=epochs, seed=seed, lr=lr, schedule=schedule, warmup=warmup,
                           weight_decay=weight_decay, dropout=dropout, batch_size=batch_size, max_length=max_length,
                           patience=patience, pooling=pooling, threads=threads, device=device, max_labels=max_labels,
                           dev_fraction=dev_fraction, group_by_length=group_by_length,
                           skip_shallow=skip_shallow, skip_table=skip_table, skip_dtype=skip_dtype,
                           skip_table_file=skip_table_file, show_progress=progress)

    # run errors: DataError (a ValueError), --layers above the backbone's, ...
    result = _run_training(make_config, train, progress, (ValueError, FileExistsError))
    if register:
        _register(server, token, tenant, adapter_name, result.path)


def _register(server: str, token: str, tenant: str, adapter_name: str, path) -> None:
    from dispatcher.client import Client, VbertError

    try:
        with Client(server, admin_token=token) as client:
            info = client.upload_adapter(tenant, adapter_name, path)
    except VbertError as e:
        _exit_on_remote_error(e)
    click.echo(f"registered {tenant}/{info['name']} version {info['version']} on {server}")


def _run_training(make_config, run, progress: bool, run_errors: tuple):
    """Build the config (a bad value or a used output directory: a usage error), then train (run_errors:
    a clean error exit); returns run's TrainResult."""
    from .train import check_output_dir

    try:
        config = make_config()
        check_output_dir(config.out)
    except (ValueError, FileExistsError) as e:
        raise click.UsageError(str(e))
    if not progress:
        _quiet_transformers()
    try:
        return run(config, echo=click.echo)
    except run_errors as e:
        raise click.ClickException(str(e))


# flags of the encoder tasks only: (parameter, flag), refused with --task generation when given
_ENCODER_ONLY = (("bottleneck_size", "--bottleneck-size"), ("bottleneck_placement", "--bottleneck-placement"),
                 ("layers", "--layers"), ("skip_shallow", "--skip-shallow"), ("skip_table_file", "--skip-table-file"))


def _train_generation(train_path, dev_path, adapter_kind, out, epochs, seed, backbone, rank, lora_targets, alpha,
                      lr, schedule, warmup, weight_decay, dropout, batch_size, max_length, patience, full_finetune,
                      dev_fraction, group_by_length, threads, device, progress, register, server, tenant,
                      adapter_name, admin_token, data_dir, **encoder_only) -> None:
    """`vbert train --task generation`: a LoRA on the decoder (training/generation.py)."""
    given = [flag for name, flag in _ENCODER_ONLY if encoder_only.get(name) is not None]
    given += ["--full-finetune"] * bool(full_finetune) + ["--adapter-kind bottleneck"] * (adapter_kind == "bottleneck")
    if given:
        raise click.UsageError(f"{', '.join(given)}: not for --task generation (a LoRA on the decoder)")
    if register:
        if not tenant or not adapter_name:
            raise click.UsageError("--register needs --tenant and --adapter")
        token = _admin_token(admin_token, data_dir)
    from .generation import GenerationTrainConfig, train_generation

    targets = None
    if lora_targets is not None:
        targets = tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    def make_config():
        return GenerationTrainConfig(
            train_path=train_path, out=out, dev_path=dev_path, backbone=backbone,
            cache_dir=str(Path(data_dir) / "models"), epochs=epochs, seed=seed, lr=lr, rank=rank, alpha=alpha,
            targets=targets, dropout=dropout or 0.0, schedule=schedule, warmup=warmup, weight_decay=weight_decay,
            batch_size=batch_size or 8, max_length=max_length or 512, patience=patience, threads=threads,
            device=device, dev_fraction=dev_fraction, group_by_length=group_by_length, show_progress=progress)

    # run errors: DataError, an unsupported decoder, ...
    result = _run_training(make_config, train_generation, progress, (ValueError, FileExistsError, FileNotFoundError))
    if register:
        _register(server, token, tenant, adapter_name, result.path)


@click.command("evaluate")
@click.option("--adapter", "adapter_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Adapter directory from `vbert train` (or a --full-finetune checkpoint).")
@click.option("--test", "test_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Test file, in the format of the task the adapter was trained for.")
@click.option("--json", "json_path", required=True, type=click.Path(dir_okay=False),
              help="Write the metrics here as JSON.")
@click.option("--server", default=None, help="host:port: score through a running server instead of in-process.")
@click.option("--api-key", envvar="VBERT_API_KEY", default=None, help="With --server: the tenant's API key.")
@click.option("--tenant-adapter", default=None,
              help="With --server: the adapter's name as registered (default: the directory's name).")
@click.option("--tls-ca", default=None, type=click.Path(exists=True, dir_okay=False),
              help="With --server: use TLS, trusting this CA bundle.")
@click.option("--request-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="With --server: texts per request (at most the server's max_texts_per_request).")
@click.option("--backbone", default=None, type=click.Path(exists=True, file_okay=False),
              help="Default: the backbone recorded in the adapter's training.json, else the embedded one.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="float32", show_default=True, help="float32, float16, bfloat16 (CUDA) or auto.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=512, show_default=True, type=click.IntRange(min=2),
              help="Sub-tokens per text, as the server cuts them (its max_tokens_per_text); decoder adapters "
                   "in-process: a longer prompt keeps its last N tokens.")
@click.option("--skip-shallow", default=None, type=click.Path(exists=True, file_okay=False),
              help="Score in skip mode (in-process): the shallow layers from `vbert distill`.")
@click.option("--skip-table", default=None, type=click.Path(exists=True, dir_okay=False),
              help="With --skip-shallow: the n-gram table from `vbert build-table` (default: compute every trigram).")
@click.option("--skip-mode", type=click.Choice(["exact", "fallback"]), default="exact", show_default=True,
              help="exact: table misses computed by the shallow layers; fallback: bigram/unigram entries "
                   "(approximate).")
@click.option("--skip-route", type=click.Choice(["table", "layers", "cost"]), default="table", show_default=True,
              help="With --skip-shallow: table scores the skip function itself; layers every row on the real lower "
                   "layers (what the server's cost route gives rows of unseen text); cost as the server routes.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1),
              help="Decoder adapters: tokens generated per example at most (greedy).")
@click.option("--predictions", "predictions_path", default=None, type=click.Path(dir_okay=False),
              help="Decoder adapters: also write each example's completion and prediction here (JSON lines).")
@click.option("--data-dir", default="./var", show_default=True,
              help="Decoder adapters in-process: the default decoder's conversion is cached in DATA_DIR/models.")
@_keeps_host_heap
def evaluate_command(adapter_dir, test_path, json_path, server, api_key, tenant_adapter, tls_ca, request_size,
                     backbone, device, dtype, batch_size, max_length, skip_shallow, skip_table, skip_mode,
                     skip_route, max_new_tokens, predictions_path, data_dir) -> None:
    """Score an adapter on a test file (in-process, or against a running server). A decoder adapter (from
    `vbert train --task generation`) is scored on its greedy outputs: exact match, token F1, ROUGE-L."""
    from dispatcher.client import VbertError

    from .evaluate import EvaluateConfig, evaluate
    from .generation_eval import is_generation_adapter

    if is_generation_adapter(adapter_dir):
        if skip_shallow is not None:
            raise click.UsageError("--skip-shallow is for encoder adapters, not a decoder adapter")
        _evaluate_generation(adapter_dir, test_path, json_path, server, api_key, tenant_adapter, tls_ca, backbone,
                             device, batch_size, max_length, max_new_tokens, predictions_path, data_dir)
        return
    try:
        config = EvaluateConfig(adapter_dir=adapter_dir, test_path=test_path, backbone=backbone, device=device,
                                dtype=dtype, batch_size=batch_size, max_length=max_length, server=server,
                                api_key=api_key, tenant_adapter=tenant_adapter, request_size=request_size,
                                tls_ca=tls_ca, skip_shallow=skip_shallow, skip_table=skip_table,
                                skip_mode=skip_mode, skip_route=skip_route)
    except ValueError as e:
        raise click.UsageError(str(e))
    _quiet_transformers()
    try:
        metrics = evaluate(config)
    except VbertError as e:
        _exit_on_remote_error(e)
    except ValueError as e:   # DataError, AdapterError, a backbone mismatch
        raise click.ClickException(str(e))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(metrics, indent=2) + "\n")
    click.echo(json.dumps(metrics))


def _evaluate_generation(adapter_dir, test_path, json_path, server, api_key, tenant_adapter, tls_ca, backbone,
                         device, batch_size, max_length, max_new_tokens, predictions_path, data_dir) -> None:
    from dispatcher.client import VbertError

    from .generation_eval import GenerationEvaluateConfig, evaluate_generation

    try:
        config = GenerationEvaluateConfig(
            adapter_dir=adapter_dir, test_path=test_path, backbone=backbone, cache_dir=str(Path(data_dir) / "models"),
            device=device, max_new_tokens=max_new_tokens, max_prompt_tokens=max_length, batch_size=min(batch_size, 8),
            server=server, api_key=api_key, tenant_adapter=tenant_adapter, tls_ca=tls_ca)
    except ValueError as e:
        raise click.UsageError(str(e))
    _quiet_transformers()
    try:
        metrics, predictions = evaluate_generation(config)
    except VbertError as e:
        _exit_on_remote_error(e)
    except (ValueError, FileNotFoundError) as e:   # DataError, AdapterError, a decoder that does not load
        raise click.ClickException(str(e))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(metrics, indent=2) + "\n")
    if predictions_path is not None:
        Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
        Path(predictions_path).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    click.echo(json.dumps(metrics))


@click.command("distill")
@click.option("--corpus", "corpus", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file (one sentence per line), JSON lines with \"text\", or CoNLL; repeatable.")
@click.option("--corpus-format", type=click.Choice(["auto", "text", "jsonl", "conll"]), default="auto",
              show_default=True)
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory (new or empty; with --resume, the run's directory).")
@click.option("--skip-layers", default=3, show_default=True, type=click.IntRange(min=1),
              help="How many of the lowest layers the shallow layers replace.")
@click.option("--backbone", default=None, type=click.Path(exists=True, file_okay=False),
              help="Teacher checkpoint directory (default: the embedded backbone).")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=2e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(min=3))
@click.option("--final-weight", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Also match the final layer's output, with this weight (backpropagates through the upper layers).")
@click.option("--attention-weight", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Also match the attention (KL divergence) of the first layer above the shallow ones, or of "
                   "every upper layer with --attention-layers upper, with this weight.")
@click.option("--attention-layers", type=click.Choice(list(ATTENTION_LAYERS)), default="first", show_default=True,
              help="The attention term on the first upper layer only, or averaged over every upper layer.")
@click.option("--max-sentences", default=None, type=click.IntRange(min=2), help="Use a seeded sample of the corpus.")
@click.option("--init", default=None, type=click.Path(exists=True, file_okay=False),
              help="Start from this earlier `vbert distill` directory instead of the teacher's layers.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--checkpoint-every", default=200, show_default=True, type=click.IntRange(min=1),
              help="Steps between checkpoints (also one at each epoch's end).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="torch CPU threads.")
@click.option("--device", default="cpu", show_default=True, help="cpu, auto, cuda or cuda:N.")
@click.option("--progress/--no-progress", default=True, show_default=True)
@_keeps_host_heap
def distill_command(corpus, corpus_format, out, skip_layers, backbone, epochs, batch_size, lr, max_length,
                    final_weight, attention_weight, attention_layers, max_sentences, init, seed, checkpoint_every,
                    resume, threads, device, progress) -> None:
    """Distill shallow n-gram layers that replace the backbone's lowest layers (skip mode)."""
    from .distill import DistillConfig, distill

    try:
        config = DistillConfig(corpus=tuple(corpus), out=out, backbone=backbone, skip_layers=skip_layers,
                               epochs=epochs, batch_size=batch_size, lr=lr, max_length=max_length,
                               final_weight=final_weight, attention_weight=attention_weight,
                               attention_layers=attention_layers,
                               max_sentences=max_sentences, corpus_format=corpus_format,
                               seed=seed, checkpoint_every=checkpoint_every, resume=resume, threads=threads,
                               device=device, show_progress=progress, init=init)
    except ValueError as e:
        raise click.UsageError(str(e))
    _quiet_transformers()
    try:
        distill(config, echo=click.echo)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        raise click.ClickException(str(e))


@click.command("build-table")
@click.option("--shallow", default=None, type=click.Path(exists=True, file_okay=False),
              help="Shallow-layer directory from `vbert distill` (default: the layers shipped for the default "
                   "backbone).")
@click.option("--corpus", "corpus", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Corpus whose n-grams are precomputed (as for distill); repeatable.")
@click.option("--corpus-format", type=click.Choice(["auto", "text", "jsonl", "conll"]), default="auto",
              show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Table file to write (must not exist).")
@click.option("--budget-mb", default=1536.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Memory the table may take (entries + index); the most frequent n-grams first. The default "
                   "holds every trigram of a corpus of about 20,000 sentences (docs/skip-mode.md: table size).")
@click.option("--fallback-share", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Share of the budget (after unigrams) for bigram fallback entries; the rest holds trigrams.")
@click.option("--dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default="float16", show_default=True)
@click.option("--compute-dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="What the shallow layers compute in, for the table and (recorded in it) for the server's misses: "
                   "auto = bfloat16 on a GPU or a CPU with AVX-512 BF16 / AMX (about 2x faster a miss), else float32.")
@click.option("--max-length", default=128, show_default=True, type=click.IntRange(min=3))
@click.option("--backbone", default=None, type=click.Path(exists=True, file_okay=False),
              help="Whose tokenizer (default: the embedded backbone).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@_keeps_host_heap
def build_table_command(shallow, corpus, corpus_format, out, budget_mb, fallback_share, dtype, compute_dtype,
                        max_length, backbone, device, progress) -> None:
    """Precompute the shallow layers' outputs for a corpus's n-grams into a table file."""
    from vbert.config import default_shallow_path

    from .table import TableConfig, build_table

    try:
        if shallow is None:
            shallow = default_shallow_path()
        config = TableConfig(shallow=shallow, corpus=tuple(corpus), out=out, budget_mb=budget_mb,
                             fallback_share=fallback_share, dtype=dtype, compute_dtype=compute_dtype,
                             max_length=max_length, corpus_format=corpus_format, backbone=backbone, device=device,
                             show_progress=progress)
    except ValueError as e:
        raise click.UsageError(str(e))
    _quiet_transformers()
    try:
        build_table(config, echo=click.echo)
    except ValueError as e:
        raise click.ClickException(str(e))


@click.command("export-shallow")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("dst", type=click.Path(file_okay=False))
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True)
def export_shallow_command(src, dst, dtype) -> None:
    """Write a shippable copy of `vbert distill` output: weights rounded to DTYPE with their sha256.
    Build tables from the copy (its weights hash differs from the source's)."""
    from vbert.shallow import SkipError, export_shallow

    try:
        meta = export_shallow(src, dst, dtype)
    except SkipError as e:
        raise click.ClickException(str(e))
    size = (Path(dst) / "shallow.safetensors").stat().st_size
    click.echo(f"wrote {dst}: {size / 2**20:.1f} MiB {dtype}, sha256 {meta.file_sha256}, weights {meta.weights_hash[:12]}")


COMMANDS = [train_command, evaluate_command, distill_command, build_table_command, export_shallow_command]
__all__ = ["COMMANDS", "build_table_command", "distill_command", "evaluate_command", "export_shallow_command",
           "train_command"]
