"""`vbert tenant ...`, `vbert adapter ...` and `vbert status`: the admin API."""
from __future__ import annotations

import click

from dispatcher.commands.remote import remote


def _quota_options(f):
    f = click.option("--weight", type=float, default=None, help="Fair-share weight.")(f)
    f = click.option("--max-tokens-per-request", type=int, default=None)(f)
    f = click.option("--burst", type=int, default=None, help="Token-bucket size (inputs).")(f)
    return click.option("--requests-per-s", type=float, default=None, help="Inputs per second.")(f)


def _quotas(**q) -> dict:
    return {k: v for k, v in q.items() if v is not None}


TENANT_COLUMNS = ["id", "name", "status", "created", "quotas.requests_per_s", "quotas.burst",
                  "quotas.max_tokens_per_request", "quotas.weight"]
ADAPTER_COLUMNS = ["name", "version", "backbone", "kind", "head_kind", "labels", "is_active", "is_pinned",
                   "is_resident", "size", "sha256"]


@click.group()
def tenant() -> None:
    """Register and manage tenants (admin API)."""


@tenant.command("register")
@click.argument("name")
@_quota_options
@remote(is_admin=True)
def tenant_register(r, name, **quotas) -> None:
    """Register tenant NAME; prints its API key, shown this once."""
    r.show(r.call(lambda c: c.register_tenant(name, _quotas(**quotas))))


@tenant.command("list")
@click.option("--page-size", default=100, show_default=True, type=click.IntRange(1, 1000))
@remote(is_admin=True)
def tenant_list(r, page_size) -> None:
    """List every tenant (fetched page by page)."""
    r.show(r.call(lambda c: c.all_tenants(page_size)), TENANT_COLUMNS)


@tenant.command("get")
@click.argument("name")
@remote(is_admin=True)
def tenant_get(r, name) -> None:
    """Show a tenant and its quotas."""
    r.show(r.call(lambda c: c.get_tenant(name)))


@tenant.command("update")
@click.argument("name")
@_quota_options
@remote(is_admin=True)
def tenant_update(r, name, **quotas) -> None:
    """Change a tenant's quotas (the ones given; the others keep their value)."""
    if not _quotas(**quotas):
        raise click.UsageError("give at least one of --requests-per-s, --burst, --max-tokens-per-request, --weight")
    r.show(r.call(lambda c: c.update_quotas(name, **_quotas(**quotas))))


@tenant.command("suspend")
@click.argument("name")
@remote(is_admin=True)
def tenant_suspend(r, name) -> None:
    """Refuse the tenant's calls (PERMISSION_DENIED) until resumed."""
    r.show(r.call(lambda c: c.suspend_tenant(name)))


@tenant.command("resume")
@click.argument("name")
@remote(is_admin=True)
def tenant_resume(r, name) -> None:
    """Serve a suspended tenant again."""
    r.show(r.call(lambda c: c.resume_tenant(name)))


@tenant.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@remote(is_admin=True)
def tenant_delete(r, name, yes) -> None:
    """Delete a tenant, its keys and all its adapters."""
    if not yes:
        click.confirm(f"Delete tenant {name!r} and all its adapters?", abort=True)
    r.show({"tenant": name, **r.call(lambda c: c.delete_tenant(name))})


@tenant.command("rotate-key")
@click.argument("name")
@click.option("--grace-seconds", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="The old key stays valid this long (0: refused at once).")
@remote(is_admin=True)
def tenant_rotate_key(r, name, grace_seconds) -> None:
    """Issue a new API key (shown once)."""
    r.show(r.call(lambda c: c.rotate_key(name, grace_seconds)))


@click.group()
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
@remote(is_admin=True)
def adapter_upload(r, tenant_name, adapter_name, path, activate) -> None:
    """Upload the adapter directory PATH (from `vbert train`, or a PEFT LoRA directory) as a new version."""
    r.show(r.call(lambda c: c.upload_adapter(tenant_name, adapter_name, path, activate)))


@adapter.command("list")
@click.option("--tenant", "tenant_name", required=True)
@remote(is_admin=True)
def adapter_list(r, tenant_name) -> None:
    """Every version of the tenant's adapters."""
    rows = r.call(lambda c: c.list_adapters(tenant_name))
    if r.output == "table":
        rows = [{**a, "sha256": a["sha256"][:12]} for a in rows]
    r.show(rows, ADAPTER_COLUMNS)


@adapter.command("activate")
@_adapter_ref
@click.option("--version", required=True, type=click.IntRange(min=1))
@remote(is_admin=True)
def adapter_activate(r, tenant_name, adapter_name, version) -> None:
    """Serve VERSION of the adapter from now on."""
    r.show(r.call(lambda c: c.activate(tenant_name, adapter_name, version)))


@adapter.command("pin")
@_adapter_ref
@remote(is_admin=True)
def adapter_pin(r, tenant_name, adapter_name) -> None:
    """Keep the active version resident on the device (returns once loaded)."""
    r.show(r.call(lambda c: c.pin(tenant_name, adapter_name)))


@adapter.command("unpin")
@_adapter_ref
@remote(is_admin=True)
def adapter_unpin(r, tenant_name, adapter_name) -> None:
    """Let the active version be evicted again."""
    r.show(r.call(lambda c: c.unpin(tenant_name, adapter_name)))


@adapter.command("delete")
@_adapter_ref
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@remote(is_admin=True)
def adapter_delete(r, tenant_name, adapter_name, yes) -> None:
    """Delete every version of the adapter."""
    if not yes:
        click.confirm(f"Delete adapter {adapter_name!r} of tenant {tenant_name!r}?", abort=True)
    deleted = r.call(lambda c: c.delete_adapter(tenant_name, adapter_name))
    r.show({"tenant": tenant_name, "name": adapter_name, **deleted})


@click.command()
@remote(is_admin=True)
def status(r) -> None:
    """The server's backbones (with their memory), device, tenants, resident adapters and queue (admin API)."""
    r.show(r.call(lambda c: c.status()))


COMMANDS = [tenant, adapter, status]
