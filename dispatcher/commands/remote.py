"""What the commands that call a server share: connection options, the credentials, the mapping of a
VbertError to a message and an exit code, table / JSON output, and texts from the arguments or stdin."""
from __future__ import annotations

import json

import click

from dispatcher.commands.exit_codes import exit_code


class Remote:
    """Connection options of one command and its output; `call` runs the command's client calls
    and turns a VbertError into a message on stderr and the exit code of its class."""

    def __init__(self, server, output, timeout, tls_ca, is_admin, admin_token=None, data_dir=None, api_key=None):
        self.server, self.output, self.timeout, self.tls_ca, self.is_admin = server, output, timeout, tls_ca, is_admin
        self.admin_token, self.data_dir, self.api_key = admin_token, data_dir, api_key

    def client(self):
        from pathlib import Path

        from dispatcher.client import Client

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
        from dispatcher.client import VbertError

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
            raise SystemExit(exit_code(e.code.name))
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


def remote(is_admin: bool):
    """Adds --server, -o, --timeout, --tls-ca and the credentials (admin token or API key); the
    command receives a Remote as its first argument."""
    import functools

    def deco(f):
        @functools.wraps(f)
        def wrapped(server, output, timeout, tls_ca, admin_token=None, data_dir=None, api_key=None, **kw):
            return f(Remote(server, output, timeout, tls_ca, is_admin, admin_token, data_dir, api_key), **kw)

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


def texts_of(texts: tuple[str, ...]) -> list[str]:
    stdin = click.get_text_stream("stdin")
    if texts == ("-",) or (not texts and not stdin.isatty()):
        texts = tuple(line for line in stdin.read().splitlines() if line.strip())
    if not texts:
        raise click.UsageError("give at least one TEXT (or lines on stdin)")
    return list(texts)
