"""`vbert info`, `serve` and `demo`: the commands that run the model in this process."""
from __future__ import annotations

import json

import click


def _model_config(backbone: str | None, device: str, dtype: str, lora_slots: int, bottleneck_slots: int):
    from vbert import BackboneConfig, ModelConfig, PoolConfig

    return ModelConfig(backbone=BackboneConfig(path=backbone, device=device, dtype=dtype),
                       pool=PoolConfig(num_lora_slots=lora_slots, num_bottleneck_slots=bottleneck_slots))


def _config_options(f):
    f = click.option("--backbone", default=None, help="Local HF BERT checkpoint dir (default: embedded all-MiniLM-L6-v2).")(f)
    f = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(f)
    f = click.option("--dtype", default="auto", show_default=True, help="auto, float32, float16, bfloat16.")(f)
    f = click.option("--lora-slots", default=256, show_default=True, type=int)(f)
    f = click.option("--bottleneck-slots", default=256, show_default=True, type=int)(f)
    return f


def _flat(prefix: str, d: dict):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(f"{prefix}{k}.", v)
        else:
            yield f"{prefix}{k}", v


@click.command()
@_config_options
@click.option("--backbones", default="encoder,decoder", show_default=True,
              help="encoder,decoder, encoder or decoder.")
@click.option("--decoder", default=None, help="Local HF Llama-family checkpoint dir (default: SmolLM2-135M-Instruct).")
@click.option("--data-dir", default="./var", show_default=True, help="Where the default decoder is converted once.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def info(backbone, device, dtype, lora_slots, bottleneck_slots, backbones, decoder, data_dir, output) -> None:
    """Print the backbones (encoder, decoder) with their memory, the device, dtype and adapter pools."""
    from dispatcher.config import ServerConfig
    from vbert import MultiTenantModel
    from vbert.decoder_backbone import DecoderBackbone

    from vbert.device import DeviceContext

    try:
        config = ServerConfig(backbones=backbones, decoder=decoder, data_dir=data_dir)
        out = {}
        dev = DeviceContext.create(device, dtype)
        if config.has_encoder:
            model = MultiTenantModel(_model_config(backbone, device, dtype, lora_slots, bottleneck_slots))
            out["encoder"], dev = model.info(), model.device
        if config.has_decoder:
            out["decoder"] = DecoderBackbone.load(config.decoder_config(), dev).info()
    except (ValueError, OSError) as e:
        raise click.UsageError(str(e))
    if output == "json":
        click.echo(json.dumps(out, indent=2))
        return
    for key, value in _flat("", out):
        click.echo(f"{key:<36}{value}")


@click.command()
@click.option("--host", default=None, help="Tenant API address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Tenant API port (default 50051).")
@click.option("--data-dir", default=None, help="Registry, adapters and admin token (default ./var).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (default 9400; 0 = off).")
@click.option("--http-port", type=int, default=None, help="OpenAI-compatible HTTP API port (default 8000; 0 = off).")
@click.option("--admin-port", type=int, default=None, help="Separate loopback admin listener.")
@click.option("--config", "config_file", default=None, help="TOML config file (flags > VBERT_* env > file).")
@click.option("--backbone", default=None, help="Encoder: a local HF BERT checkpoint dir (default all-MiniLM-L6-v2).")
@click.option("--backbones", default=None, help="Which to load: encoder,decoder (default), encoder or decoder.")
@click.option("--decoder", default=None, help="Decoder: a local HF Llama-family checkpoint dir "
                                              "(default SmolLM2-135M-Instruct).")
@click.option("--generation-mode", type=click.Choice(["iteration", "request"]), default=None,
              help="Generation batching: iteration (Orca, default) or request (static batches).")
@click.option("--replicas", type=int, default=None,
              help="Run the encoder as N Ray Serve replicas (needs the ray extra; default 0: in this process).")
@click.option("--decoder-replicas", type=int, default=None,
              help="Run generation on N Ray Serve decoder replicas (needs the ray extra; default 0: in this process).")
@click.option("--ray-address", default=None,
              help="With replicas: 'local' (default) starts a Ray cluster here; else join one (auto, HOST:6379).")
@click.option("--device", default=None)
@click.option("--dtype", default=None)
def serve(host, port, data_dir, metrics_port, http_port, admin_port, config_file, backbone, backbones, decoder,
          generation_mode, replicas, decoder_replicas, ray_address, device, dtype) -> None:
    """Start the server: gRPC (tenant API with Generate, admin API, Open Inference Protocol, health, reflection)
    and the OpenAI-compatible HTTP API."""
    import asyncio
    import os

    from dispatcher.config import ServerConfig
    from dispatcher.logs import configure
    from dispatcher.server import serve as run_server

    try:
        config = ServerConfig.load(config_file, os.environ, dict(
            host=host, port=port, data_dir=data_dir, metrics_port=metrics_port, http_port=http_port,
            admin_port=admin_port, backbone=backbone, backbones=backbones, decoder=decoder,
            generation_mode=generation_mode, replicas=replicas, decoder_replicas=decoder_replicas,
            ray_address=ray_address, device=device, dtype=dtype))
    except ValueError as e:
        raise click.UsageError(str(e))
    configure(config.log_level)
    raise SystemExit(asyncio.run(run_server(config)))


@click.command()
@click.option("--tenants", default=300, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--seed", default=0, show_default=True, type=int)
def demo(tenants, batch, seed) -> None:
    """Default backbone, random tenants, one mixed batch: per-row results and throughput."""
    from vbert.demo import run_demo

    run_demo(num_tenants=tenants, batch=batch, seed=seed, echo=click.echo)


@click.command()
@click.option("--out", required=True, help="where to write the profile (JSON) for `vbert plan` and the simulator")
@click.option("--backbones", default="encoder,decoder", show_default=True,
              help="which backbones to profile: encoder, decoder, encoder-base (a random BERT-base-shaped encoder)")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(1, 100), help="timed runs per point")
@click.option("--threads", type=click.IntRange(1, 1024), default=None, help="CPU threads (default: torch's)")
@click.option("--config", "config_file", default=None, help="TOML config file (backbone paths, pool and KV sizes).")
def profile(out, backbones, repeats, threads, config_file) -> None:
    """Measure each backbone's step latency on this machine (encoder: rows x tokens; decoder: running
    sequences x context, prefill chunks), its start time and memory: the placement simulator's input."""
    import os

    import torch
    from tqdm import tqdm

    from dispatcher.config import ServerConfig
    from scheduler.profiling import BACKBONES, profile as run_profile

    names = [b.strip() for b in backbones.split(",") if b.strip()]
    unknown = sorted(set(names) - set(BACKBONES))
    if unknown or not names:
        raise click.UsageError(f"--backbones {backbones!r}: unknown {unknown}; name any of {', '.join(BACKBONES)}")
    loads = sorted({"encoder" if n == "encoder-base" else n for n in names})   # encoder-base: the encoder's settings
    try:
        config = ServerConfig.load(config_file, os.environ, {"backbones": ",".join(loads)})
    except ValueError as e:
        raise click.UsageError(str(e))
    if threads:
        torch.set_num_threads(threads)
    with tqdm(desc="profile points", unit="point") as bar:
        result = run_profile(config, names, repeats=repeats, progress=bar.update)
    result.save(out)
    for name, b in result.backbones.items():
        click.echo(f"{name}: start {b.start_s:.2f} s, {b.replica_bytes / 2 ** 20:.0f} MiB per replica -> {out}")


@click.command()
@click.option("--profile", "profile_path", required=True, help="a latency profile written by `vbert profile`")
@click.option("--workload", "workload_path", required=True,
              help="TOML: [[devices]], [[tenants]] / [[tenant_groups]], [simulation] (see docs/placement-autoscaling.md)")
@click.option("-o", "--output", type=click.Choice(["text", "json"]), default="text", show_default=True)
def plan(profile_path, workload_path, output) -> None:
    """Place replicas of the backbones on the devices for SLO attainment (simulator-guided greedy search,
    AlpaServe-style) and compare with one replica per backbone and with replication in proportion to load."""
    import json

    from scheduler.latency_profile import LatencyProfile
    from scheduler.plan import load_workload, plan as run_plan

    try:
        result = run_plan(LatencyProfile.load(profile_path), load_workload(workload_path))
    except (OSError, ValueError, KeyError) as e:
        raise click.UsageError(str(e).strip("'\""))
    if output == "json":
        click.echo(json.dumps(result, indent=2))
        return
    for name, r in result.items():
        p99 = "-" if r["p99_s"] is None else f"{r['p99_s'] * 1000:.0f} ms"
        click.echo(f"{name}: SLO attainment {r['slo_attainment']:.3f}, p99 {p99}")
        for device, replicas in r["placement"].items():
            click.echo(f"  {device:<12}{', '.join(replicas) or '-'}")


COMMANDS = [info, serve, demo, profile, plan]
