"""Register a tenant, upload an adapter and classify with it, through the Python client.

    .venv/bin/vbert serve &
    .venv/bin/python examples/quickstart.py --adapter-dir examples/adapters/sentiment
"""
from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

from dispatcher.client import Client, VbertError


def main() -> None:
    p = argparse.ArgumentParser(description="register + upload + classify through the Python client")
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--data-dir", default="./var", help="the server's data dir (holds admin_token)")
    p.add_argument("--adapter-dir", required=True, type=Path)
    args = p.parse_args()
    token = os.environ.get("VBERT_ADMIN_TOKEN") or (Path(args.data_dir) / "admin_token").read_text().strip()
    tenant = f"quickstart-{uuid.uuid4().hex[:8]}"
    with Client(args.server, admin_token=token) as admin:
        key = admin.register_tenant(tenant)["api_key"]
        adapter = admin.upload_adapter(tenant, "sentiment", args.adapter_dir)
        print(f"tenant {tenant}: adapter {adapter['name']} v{adapter['version']} ({adapter['kind']}, "
              f"labels {adapter['labels']})")
    with Client(args.server, api_key=key) as client:
        for text, result in zip(texts := ["great product", "terrible service"], client.classify("sentiment", texts)):
            print(f"{result['label']:<10} {result['scores'][result['label']]:.3f}  {text}")
        try:
            client.classify("no-such-adapter", ["x"])
        except VbertError as e:
            print(f"as expected: {e.code.name} (request id {e.request_id})")
    with Client(args.server, admin_token=token) as admin:
        admin.delete_tenant(tenant)


if __name__ == "__main__":
    main()
