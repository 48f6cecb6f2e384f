"""The `vbert` command. Subcommands are added by the issues that build their parts."""
from __future__ import annotations

import json

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Multi-tenant serving of one shared BERT backbone with per-tenant adapters."""


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


@main.command()
@_config_options
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
def info(backbone, device, dtype, lora_slots, bottleneck_slots, output) -> None:
    """Print the backbone, device, dtype and adapter pool capacity."""
    from vbert import MultiTenantModel

    try:
        model = MultiTenantModel(_model_config(backbone, device, dtype, lora_slots, bottleneck_slots))
    except ValueError as e:
        raise click.UsageError(str(e))
    d = model.info()
    if output == "json":
        click.echo(json.dumps(d, indent=2))
        return
    pool = d.pop("pool")
    for k, v in d.items():
        click.echo(f"{k:<28}{v}")
    for k, v in pool.items():
        click.echo(f"pool.{k:<23}{v}")


@main.command()
@click.option("--host", default=None, help="Tenant API address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Tenant API port (default 50051).")
@click.option("--data-dir", default=None, help="Registry, adapters and admin token (default ./var).")
@click.option("--metrics-port", type=int, default=None, help="Prometheus port (default 9400; 0 = off).")
@click.option("--admin-port", type=int, default=None, help="Separate loopback admin listener.")
@click.option("--config", "config_file", default=None, help="TOML config file (flags > VBERT_* env > file).")
@click.option("--backbone", default=None)
@click.option("--device", default=None)
@click.option("--dtype", default=None)
def serve(host, port, data_dir, metrics_port, admin_port, config_file, backbone, device, dtype) -> None:
    """Start the gRPC server (tenant API, admin API, Open Inference Protocol, health, reflection)."""
    import asyncio
    import os

    from .config import ServerConfig
    from .logs import configure
    from .server import serve as run_server

    try:
        config = ServerConfig.load(config_file, os.environ, dict(
            host=host, port=port, data_dir=data_dir, metrics_port=metrics_port, admin_port=admin_port,
            backbone=backbone, device=device, dtype=dtype))
    except ValueError as e:
        raise click.UsageError(str(e))
    configure(config.log_level)
    raise SystemExit(asyncio.run(run_server(config)))


@main.command()
@click.option("--tenants", default=300, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--batch", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option("--seed", default=0, show_default=True, type=int)
def demo(tenants, batch, seed) -> None:
    """Default backbone, random tenants, one mixed batch: per-row results and throughput."""
    from vbert.demo import run_demo

    run_demo(num_tenants=tenants, batch=batch, seed=seed, echo=click.echo)



# -- gRPC client commands: tenant, adapter, status, classify, tag, embed ---------------------------
EXIT_CODES_EPILOG = """\b
Exit codes of the commands that call a server:
  0  ok
  1  internal or unknown error (INTERNAL, UNKNOWN, DATA_LOSS, UNIMPLEMENTED, CANCELLED)
  2  usage error (bad flags or arguments, no admin token or API key found)
  3  UNAUTHENTICATED or PERMISSION_DENIED (bad key or token, suspended tenant)
  4  NOT_FOUND (tenant, adapter or version)
  5  ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT, OUT_OF_RANGE, ABORTED
  6  RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED (try again later)"""
EXIT_OF_STATUS = {"UNAUTHENTICATED": 3, "PERMISSION_DENIED": 3, "NOT_FOUND": 4, "ALREADY_EXISTS": 5,
                  "FAILED_PRECONDITION": 5, "INVALID_ARGUMENT": 5, "OUT_OF_RANGE": 5, "ABORTED": 5,
                  "RESOURCE_EXHAUSTED": 6, "UNAVAILABLE": 6, "DEADLINE_EXCEEDED": 6}
main.epilog = EXIT_CODES_EPILOG


class _Remote:
    """Connection options of one command and its output; `call` runs the command's client calls
    and turns a VbertError into a message on stderr and the exit code of its class."""

    def __init__(self, server, output, timeout, tls_ca, is_admin, admin_token=None, data_dir=None, api_key=None):
        self.server, self.output, self.timeout, self.tls_ca, self.is_admin = server, output, timeout, tls_ca, is_admin
        self.admin_token, self.data_dir, self.api_key = admin_token, data_dir, api_key

    def client(self):
        from pathlib import Path

        from .client import Client

        token = key = None
        if self.is_admin:
            token = self.admin_token
            path = Path(self.data_dir) / "admin_token"
            if not token and path.is_file():
                token = path.read_text().strip()
            if not token:
                raise click.UsageError(f"no admin token: pass --admin-token, set VBERT_ADMIN_TOKEN, or point "
                                       f"--data-dir at the server's data directory (no {path})")
        else:
            key = self.api_key
            if not key:
                raise click.UsageError("no API key: pass --api-key or set VBERT_API_KEY")
        return Client(self.server, api_key=key, admin_token=token, tls=self.tls_ca, timeout=self.timeout)

    def call(self, fn):
        from .client import VbertError

        client = self.client()
        try:
            return fn(client)
        except ValueError as e:   # a local problem with the arguments, e.g. an empty adapter directory
            raise click.UsageError(str(e))
        except VbertError as e:
            if self.output == "json":
                click.echo(json.dumps({"error": {"code": e.code.name, "details": e.details,
                                                 "request_id": e.request_id}}), err=True)
            else:
                click.echo(f"error: {e}", err=True)
            raise SystemExit(EXIT_OF_STATUS.get(e.code.name, 1))
        finally:
            client.close()

    def show(self, value, columns: list[str] | None = None) -> None:
        if self.output == "json":
            click.echo(json.dumps(value, indent=2))
        elif columns is not None:
            click.echo(_table(value, columns))
        else:
            flat = _flat(value)
            width = max(map(len, flat), default=0) + 2
            for k, v in flat.items():
                click.echo(f"{k:<{width}}{_cell(k, v)}")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "scores":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _cell(key: str, v) -> str:
    import time

    if key.endswith("created") and isinstance(v, float):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v))
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_cell(key, x) for x in v)
    if isinstance(v, dict):
        return " ".join(f"{k}={_cell(k, x)}" for k, x in v.items())
    return str(v)


def _table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_cell(c, _flat(r).get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = [[c.upper() for c in columns]] + cells
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in lines)


def _remote(is_admin: bool):
    """Adds --server, -o, --timeout, --tls-ca and the credentials (admin token or API key); the
    command receives a _Remote as its first argument."""
    import functools

    def deco(f):
        @functools.wraps(f)
        def wrapped(server, output, timeout, tls_ca, admin_token=None, data_dir=None, api_key=None, **kw):
            return f(_Remote(server, output, timeout, tls_ca, is_admin, admin_token, data_dir, api_key), **kw)

        if is_admin:
            wrapped = click.option("--data-dir", default="./var", show_default=True,
                                   help="The server's data directory: its admin_token file is used when no "
                                        "token is given.")(wrapped)
            wrapped = click.option("--admin-token", envvar="VBERT_ADMIN_TOKEN", default=None,
                                   help="Admin token (else VBERT_ADMIN_TOKEN, else DATA_DIR/admin_token).")(wrapped)
        else:
            wrapped = click.option("--api-key", envvar="VBERT_API_KEY", default=None,
                                   help="The tenant's API key (else VBERT_API_KEY).")(wrapped)
        wrapped = click.option("--tls-ca", default=None, type=click.Path(exists=True, dir_okay=False),
                               help="Use TLS, trusting this CA bundle (PEM).")(wrapped)
        wrapped = click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.001),
                               help="Seconds per attempt.")(wrapped)
        wrapped = click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                               show_default=True)(wrapped)
        return click.option("--server", default="127.0.0.1:50051", envvar="VBERT_SERVER", show_default=True,
                            help="host:port of the server (else VBERT_SERVER).")(wrapped)

    return deco


def _quota_options(f):
    f = click.option("--weight", type=float, default=None, help="Fair-share weight.")(f)
    f = click.option("--max-tokens-per-request", type=int, default=None)(f)
    f = click.option("--burst", type=int, default=None, help="Token-bucket size (inputs).")(f)
    return click.option("--requests-per-s", type=float, default=None, help="Inputs per second.")(f)


def _quotas(**q) -> dict:
    return {k: v for k, v in q.items() if v is not None}


TENANT_COLUMNS = ["id", "name", "status", "created", "quotas.requests_per_s", "quotas.burst",
                  "quotas.max_tokens_per_request", "quotas.weight"]
ADAPTER_COLUMNS = ["name", "version", "kind", "head_kind", "labels", "is_active", "is_pinned", "is_resident", "size",
                   "sha256"]


@main.group()
def tenant() -> None:
    """Register and manage tenants (admin API)."""


@tenant.command("register")
@click.argument("name")
@_quota_options
@_remote(is_admin=True)
def tenant_register(r, name, **quotas) -> None:
    """Register tenant NAME; prints its API key, shown this once."""
    r.show(r.call(lambda c: c.register_tenant(name, _quotas(**quotas))))


@tenant.command("list")
@click.option("--page-size", default=100, show_default=True, type=click.IntRange(1, 1000))
@_remote(is_admin=True)
def tenant_list(r, page_size) -> None:
    """List every tenant (fetched page by page)."""
    r.show(r.call(lambda c: c.all_tenants(page_size)), TENANT_COLUMNS)


@tenant.command("get")
@click.argument("name")
@_remote(is_admin=True)
def tenant_get(r, name) -> None:
    """Show a tenant and its quotas."""
    r.show(r.call(lambda c: c.get_tenant(name)))


@tenant.command("update")
@click.argument("name")
@_quota_options
@_remote(is_admin=True)
def tenant_update(r, name, **quotas) -> None:
    """Change a tenant's quotas (the ones given; the others keep their value)."""
    if not _quotas(**quotas):
        raise click.UsageError("give at least one of --requests-per-s, --burst, --max-tokens-per-request, --weight")
    r.show(r.call(lambda c: c.update_quotas(name, **_quotas(**quotas))))


@tenant.command("suspend")
@click.argument("name")
@_remote(is_admin=True)
def tenant_suspend(r, name) -> None:
    """Refuse the tenant's calls (PERMISSION_DENIED) until resumed."""
    r.show(r.call(lambda c: c.suspend_tenant(name)))


@tenant.command("resume")
@click.argument("name")
@_remote(is_admin=True)
def tenant_resume(r, name) -> None:
    """Serve a suspended tenant again."""
    r.show(r.call(lambda c: c.resume_tenant(name)))


@tenant.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_remote(is_admin=True)
def tenant_delete(r, name, yes) -> None:
    """Delete a tenant, its keys and all its adapters."""
    if not yes:
        click.confirm(f"Delete tenant {name!r} and all its adapters?", abort=True)
    r.show({"tenant": name, **r.call(lambda c: c.delete_tenant(name))})


@tenant.command("rotate-key")
@click.argument("name")
@click.option("--grace-seconds", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="The old key stays valid this long (0: refused at once).")
@_remote(is_admin=True)
def tenant_rotate_key(r, name, grace_seconds) -> None:
    """Issue a new API key (shown once)."""
    r.show(r.call(lambda c: c.rotate_key(name, grace_seconds)))


@main.group()
def adapter() -> None:
    """Upload and manage a tenant's adapters (admin API)."""


def _adapter_ref(f):
    f = click.option("--name", "adapter_name", required=True, help="Adapter name.")(f)
    return click.option("--tenant", "tenant_name", required=True, help="Tenant name.")(f)


@adapter.command("upload")
@_adapter_ref
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--activate/--no-activate", default=True, show_default=True,
              help="Serve the new version at once.")
@_remote(is_admin=True)
def adapter_upload(r, tenant_name, adapter_name, path, activate) -> None:
    """Upload the adapter directory PATH (from `vbert train`, or a PEFT LoRA directory) as a new version."""
    r.show(r.call(lambda c: c.upload_adapter(tenant_name, adapter_name, path, activate)))


@adapter.command("list")
@click.option("--tenant", "tenant_name", required=True)
@_remote(is_admin=True)
def adapter_list(r, tenant_name) -> None:
    """Every version of the tenant's adapters."""
    rows = r.call(lambda c: c.list_adapters(tenant_name))
    if r.output == "table":
        rows = [{**a, "sha256": a["sha256"][:12]} for a in rows]
    r.show(rows, ADAPTER_COLUMNS)


@adapter.command("activate")
@_adapter_ref
@click.option("--version", required=True, type=click.IntRange(min=1))
@_remote(is_admin=True)
def adapter_activate(r, tenant_name, adapter_name, version) -> None:
    """Serve VERSION of the adapter from now on."""
    r.show(r.call(lambda c: c.activate(tenant_name, adapter_name, version)))


@adapter.command("pin")
@_adapter_ref
@_remote(is_admin=True)
def adapter_pin(r, tenant_name, adapter_name) -> None:
    """Keep the active version resident on the device (returns once loaded)."""
    r.show(r.call(lambda c: c.pin(tenant_name, adapter_name)))


@adapter.command("unpin")
@_adapter_ref
@_remote(is_admin=True)
def adapter_unpin(r, tenant_name, adapter_name) -> None:
    """Let the active version be evicted again."""
    r.show(r.call(lambda c: c.unpin(tenant_name, adapter_name)))


@adapter.command("delete")
@_adapter_ref
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@_remote(is_admin=True)
def adapter_delete(r, tenant_name, adapter_name, yes) -> None:
    """Delete every version of the adapter."""
    if not yes:
        click.confirm(f"Delete adapter {adapter_name!r} of tenant {tenant_name!r}?", abort=True)
    deleted = r.call(lambda c: c.delete_adapter(tenant_name, adapter_name))
    r.show({"tenant": tenant_name, "name": adapter_name, **deleted})


@main.command()
@_remote(is_admin=True)
def status(r) -> None:
    """The server's backbone, device, tenants, resident adapters and queue (admin API)."""
    r.show(r.call(lambda c: c.status()))


def _texts(texts: tuple[str, ...]) -> list[str]:
    stdin = click.get_text_stream("stdin")
    if texts == ("-",) or (not texts and not stdin.isatty()):
        texts = tuple(line for line in stdin.read().splitlines() if line.strip())
    if not texts:
        raise click.UsageError("give at least one TEXT (or lines on stdin)")
    return list(texts)


@main.command()
@click.option("--adapter", "adapter_name", required=True, help="One of the tenant's adapters (classify head).")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Scores per text; 0 = all.")
@click.option("--truncate/--no-truncate", default=True, show_default=True)
@click.argument("texts", nargs=-1)
@_remote(is_admin=False)
def classify(r, adapter_name, top_k, truncate, texts) -> None:
    """Classify each TEXT (or each line of stdin) with the tenant's adapter."""
    texts = _texts(texts)
    results = r.call(lambda c: c.classify(adapter_name, texts, top_k=top_k, truncate=truncate))
    rows = [{"text": t, **res} for t, res in zip(texts, results)]
    if r.output == "table":
        rows = [{"text": x["text"], "label": x["label"], "score": x["scores"][x["label"]]} for x in rows]
    r.show(rows, ["label", "score", "text"])


@main.command()
@click.option("--adapter", "adapter_name", required=True, help="One of the tenant's adapters (tag head).")
@click.option("--truncate/--no-truncate", default=True, show_default=True)
@click.argument("texts", nargs=-1)
@_remote(is_admin=False)
def tag(r, adapter_name, truncate, texts) -> None:
    """Tag the tokens of each TEXT (or each line of stdin): per-token labels, then the entities."""
    texts = _texts(texts)
    results = r.call(lambda c: c.tag(adapter_name, texts, truncate=truncate))
    if r.output == "json":
        return r.show([{"text": t, **res} for t, res in zip(texts, results)])
    r.show([{"input": i, **tok} for i, x in enumerate(results) for tok in x["tokens"]], ["input", "token", "label",
                                                                                        "score"])
    entities = [{"input": i, **e} for i, x in enumerate(results) for e in x["entities"]]
    if entities:
        click.echo()
        r.show(entities, ["input", "label", "text", "start_token", "end_token", "score"])


@main.command()
@click.option("--adapter", "adapter_name", default="default", show_default=True,
              help="An adapter with an embed head; 'default' = the bare backbone.")
@click.option("--normalize/--no-normalize", default=None, help="Default: the head's own setting.")
@click.option("--truncate/--no-truncate", default=True, show_default=True)
@click.argument("texts", nargs=-1)
@_remote(is_admin=False)
def embed(r, adapter_name, normalize, truncate, texts) -> None:
    """Embed each TEXT (or each line of stdin)."""
    texts = _texts(texts)
    vectors = r.call(lambda c: c.embed(texts, adapter=adapter_name, normalize=normalize, truncate=truncate))
    rows = [{"text": t, "embedding": v} for t, v in zip(texts, vectors)]
    if r.output == "table":
        rows = [{"dim": len(x["embedding"]), "head": x["embedding"][:4], "text": x["text"]} for x in rows]
    r.show(rows, ["dim", "head", "text"])


from training.cli import build_table_command, distill_command, evaluate_command, train_command  # noqa: E402

for _command, _name in ((train_command, "train"), (evaluate_command, "evaluate"), (distill_command, "distill"),
                        (build_table_command, "build-table")):
    main.add_command(_command, _name)


if __name__ == "__main__":
    main()
