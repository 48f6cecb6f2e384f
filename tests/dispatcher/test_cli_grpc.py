"""The `vbert` client commands, run as users run them (real processes) against the in-process server."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import classify, make_artifact
from tests.dispatcher.conftest import ADMIN_TOKEN
from vbert import save_artifact

VBERT = str(Path(sys.executable).parent / "vbert")
TEXTS = ["the patient with cancer", "gene expression was reduced"]


def vbert(server, *args: str, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("VBERT_ADMIN_TOKEN", "VBERT_API_KEY", "VBERT_SERVER")}
    return subprocess.run([VBERT, *args, "--server", server.address], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, input=stdin)


def ok(server, *args: str, **kw):
    out = vbert(server, *args, **kw)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout) if "json" in args else out.stdout


def admin(server, *args: str, **kw):
    return ok(server, *args, "--admin-token", ADMIN_TOKEN, **kw)


@pytest.fixture(scope="module")
def adapter_dir(server, tmp_path_factory) -> Path:
    art = make_artifact(server.app.model.spec.shape, "lora", classify(3), 4, rank=4)
    return save_artifact(art, tmp_path_factory.mktemp("cli") / "clf")


def test_register_upload_classify(server, adapter_dir):
    reg = admin(server, "tenant", "register", "cli-co", "--burst", "40", "-o", "json")
    assert reg["tenant"] == "cli-co" and reg["api_key"] and reg["quotas"]["burst"] == 40
    a = admin(server, "adapter", "upload", "--tenant", "cli-co", "--name", "clf", str(adapter_dir), "-o", "json")
    assert (a["version"], a["kind"], a["head_kind"], a["is_active"]) == (1, "lora", "classify", True)
    results = ok(server, "classify", "--api-key", reg["api_key"], "--adapter", "clf", "-o", "json", *TEXTS)
    assert [r["text"] for r in results] == TEXTS
    for r in results:
        assert r["label"] in ("L0", "L1", "L2") and set(r["scores"]) == {"L0", "L1", "L2"}
    table = ok(server, "classify", "--adapter", "clf", env={"VBERT_API_KEY": reg["api_key"]}, stdin="\n".join(TEXTS))
    assert table.splitlines()[0].split() == ["LABEL", "SCORE", "TEXT"] and len(table.splitlines()) == 3
    vectors = ok(server, "embed", "--api-key", reg["api_key"], "-o", "json", "one text")
    assert len(vectors[0]["embedding"]) == server.app.model.spec.hidden_size


def test_exit_codes(server, adapter_dir, tmp_path):
    key = admin(server, "tenant", "register", "exit-co", "-o", "json")["api_key"]
    cases = [
        (["classify", "--api-key", "vbk_wrong", "--adapter", "clf", "x"], 3),
        (["classify", "--api-key", key, "--adapter", "missing", "x"], 4),
        (["tenant", "register", "exit-co", "--admin-token", ADMIN_TOKEN], 5),
        (["tenant", "get", "exit-co", "--admin-token", "not-the-token"], 3),
        (["tenant", "get", "exit-co", "--data-dir", str(tmp_path)], 2),       # no token anywhere
        (["classify", "--adapter", "clf", "x"], 2),                           # no API key
    ]
    for args, code in cases:
        out = vbert(server, *args)
        assert out.returncode == code, (args, out.stdout, out.stderr)
        assert "error" in out.stderr.lower()
    out = vbert(server, "classify", "--api-key", key, "--adapter", "missing", "-o", "json", "x")
    err = json.loads(out.stderr)["error"]
    assert out.returncode == 4 and err["code"] == "NOT_FOUND" and len(err["request_id"]) == 16
    down = subprocess.run([VBERT, "status", "--server", "127.0.0.1:1", "--admin-token", "t", "--timeout", "2"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 6, down.stderr


def test_admin_token_sources_and_tenant_lifecycle(server, adapter_dir, tmp_path):
    (tmp_path / "admin_token").write_text(ADMIN_TOKEN + "\n")
    ok(server, "tenant", "register", "life-co", "--data-dir", str(tmp_path), "-o", "json")
    t = ok(server, "tenant", "get", "life-co", "-o", "json", env={"VBERT_ADMIN_TOKEN": ADMIN_TOKEN})
    assert t["status"] == "active"
    assert admin(server, "tenant", "update", "life-co", "--weight", "2", "-o", "json")["quotas"]["weight"] == 2
    assert admin(server, "tenant", "suspend", "life-co", "-o", "json")["status"] == "suspended"
    assert admin(server, "tenant", "resume", "life-co", "-o", "json")["status"] == "active"
    assert admin(server, "tenant", "rotate-key", "life-co", "-o", "json")["api_key"]
    assert "life-co" in {x["name"] for x in admin(server, "tenant", "list", "-o", "json")}
    assert "life-co" in admin(server, "tenant", "list")
    for _ in range(2):
        admin(server, "adapter", "upload", "--tenant", "life-co", "--name", "clf", str(adapter_dir))
    listed = admin(server, "adapter", "list", "--tenant", "life-co", "-o", "json")
    assert [(x["version"], x["is_active"]) for x in listed] == [(1, False), (2, True)]
    assert admin(server, "adapter", "activate", "--tenant", "life-co", "--name", "clf", "--version", "1",
                 "-o", "json")["is_active"]
    assert admin(server, "adapter", "pin", "--tenant", "life-co", "--name", "clf", "-o", "json")["is_pinned"]
    assert not admin(server, "adapter", "unpin", "--tenant", "life-co", "--name", "clf", "-o", "json")["is_pinned"]
    assert admin(server, "adapter", "delete", "--tenant", "life-co", "--name", "clf", "--yes",
                 "-o", "json")["num_versions_deleted"] == 2
    assert "num_tenants" in admin(server, "status")
    assert admin(server, "status", "-o", "json")["version"] == "0.1.0"
    assert admin(server, "tenant", "delete", "life-co", "--yes", "-o", "json")["num_adapters_deleted"] == 0
    assert vbert(server, "tenant", "get", "life-co", "--admin-token", ADMIN_TOKEN).returncode == 4


def test_tag_shows_character_offsets(server):
    from vbert import HeadKind, HeadSpec

    key = server.register("cli-tag")
    art = make_artifact(server.app.model.spec.shape, "bottleneck", HeadSpec(HeadKind.TAG, ("B-X", "I-X", "O")), 5,
                        size=4)
    server.app.manager.upload_adapter("cli-tag", "ner", art)
    text = "  the café, the gene"
    (res,) = ok(server, "tag", "--api-key", key, "--adapter", "ner", "-o", "json", text)
    tokens = res["tokens"]
    assert (tokens[0]["start_char"], tokens[0]["end_char"], tokens[-1]["start_char"]) == (-1, -1, -1)
    assert [text[t["start_char"]:t["end_char"]] for t in tokens[1:-1]] == ["the", "café", ",", "the", "gene"]
    assert all(e["text"] == text[e["start_char"]:e["end_char"]] for e in res["entities"])
    table = ok(server, "tag", "--api-key", key, "--adapter", "ner", text)
    assert table.splitlines()[0].split() == ["INPUT", "TOKEN", "START_CHAR", "END_CHAR", "LABEL", "SCORE"]
