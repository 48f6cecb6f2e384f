"""A real process that registers tenants or uploads adapters in a loop until it is killed.

After each call returns it appends what it committed to a log (flushed and fsynced), so the test
that SIGKILLs it knows what must have survived.
    python -m tests.manager.crash_worker --backbone DIR --data-dir DIR --log FILE --mode register|upload --seed S
"""
from __future__ import annotations

import argparse
import json
import os

from manager.manager import Manager, ManagerConfig
from manager.registry import Quotas
from tests.conftest import classify, make_artifact, tag
from vbert import BackboneConfig, ModelConfig, MultiTenantModel, PoolConfig


def append(log, record: dict) -> None:
    log.write(json.dumps(record) + "\n")
    log.flush()
    os.fsync(log.fileno())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backbone", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--mode", choices=["register", "upload"], required=True)
    p.add_argument("--seed", type=int, required=True)
    a = p.parse_args()
    model = MultiTenantModel(ModelConfig(BackboneConfig(path=a.backbone, device="cpu"),
                                         PoolConfig(num_lora_slots=2, num_bottleneck_slots=2, max_lora_rank=8,
                                                    max_bottleneck_size=16, max_labels=8)))
    manager = Manager(ManagerConfig.under(a.data_dir), model)
    shape = model.spec.shape
    with open(a.log, "a") as log:
        append(log, {"ready": a.seed})
        tenant = f"up-{a.seed}"
        if a.mode == "upload":
            _, key = manager.create_tenant(tenant)
            append(log, {"tenant": tenant, "key": key})
        i = 0
        while True:
            if a.mode == "register":
                name = f"reg-{a.seed}-{i}"
                _, key = manager.create_tenant(name, Quotas(requests_per_s=10 + i, burst=20, max_tokens_per_request=128,
                                                            weight=1.0))
                append(log, {"tenant": name, "key": key})
            else:
                kind = "lora" if i % 2 else "bottleneck"
                art = make_artifact(shape, kind, classify(3) if i % 3 else tag(4), a.seed * 1000 + i,
                                    **({"rank": 8} if kind == "lora" else {"size": 16}))
                rec = manager.upload_adapter(tenant, f"a{i % 4}", art)
                append(log, {"tenant": tenant, "adapter": rec.name, "version": rec.version, "sha256": rec.sha256})
            i += 1


if __name__ == "__main__":
    main()
