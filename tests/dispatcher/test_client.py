"""The Python client (sync and asyncio) against a real server, and its retry rule."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from dispatcher.client import AsyncClient, Client, VbertError, _Call, retry_delay, should_retry
from tests.conftest import classify, make_artifact, tag
from tests.dispatcher.conftest import ADMIN_TOKEN
from vbert import save_artifact

TEXTS = ["the patient with cancer", "gene expression was reduced"]
UNAVAILABLE, EXHAUSTED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture(scope="module")
def adapters(server, tmp_path_factory):
    """Directories of a classify (3 labels) and a tag (bottleneck) adapter for the tiny backbone."""
    d = tmp_path_factory.mktemp("adapters")
    shape = server.app.model.spec.shape
    return {"clf": save_artifact(make_artifact(shape, "lora", classify(3), 1, rank=4), d / "clf"),
            "ner": save_artifact(make_artifact(shape, "bottleneck", tag(3), 2, size=4), d / "ner")}


def test_sync_client_admin_and_tenant_calls(server, adapters):
    with Client(server.address, admin_token=ADMIN_TOKEN) as admin:
        reg = admin.register_tenant("sync-co", {"burst": 50})
        assert reg["tenant"] == "sync-co" and reg["api_key"] and reg["quotas"]["burst"] == 50
        a = admin.upload_adapter("sync-co", "clf", adapters["clf"])
        assert (a["version"], a["kind"], a["head_kind"], a["labels"]) == (1, "lora", "classify", ["L0", "L1", "L2"])
        admin.upload_adapter("sync-co", "ner", adapters["ner"])
        assert admin.upload_adapter("sync-co", "clf", adapters["clf"], activate=False)["version"] == 2
        assert [(x["name"], x["version"]) for x in admin.list_adapters("sync-co")] == [("clf", 1), ("clf", 2),
                                                                                      ("ner", 1)]
        assert admin.activate("sync-co", "clf", 2)["is_active"]
        assert admin.pin("sync-co", "clf")["is_pinned"] and not admin.unpin("sync-co", "clf")["is_pinned"]
        assert admin.get_tenant("sync-co")["status"] == "active"
        assert admin.update_quotas("sync-co", weight=3.0)["quotas"] == {
            "requests_per_s": 50.0, "burst": 50, "max_tokens_per_request": 512, "weight": 3.0}
        assert "sync-co" in {t["name"] for t in admin.all_tenants(page_size=1)}
        s = admin.status()
        assert s["num_tenants"] >= 1 and s["version"] == "0.1.0" and s["lora_slots"] == 8
    with Client(server.address, api_key=reg["api_key"]) as c:
        results = c.classify("clf", TEXTS)
        assert len(results) == 2
        for r in results:
            assert r["label"] in ("L0", "L1", "L2") and set(r["scores"]) == {"L0", "L1", "L2"}
            assert r["scores"][r["label"]] == max(r["scores"].values())
            assert sum(r["scores"].values()) == pytest.approx(1, abs=1e-5)
        assert len(c.classify("clf", "a single text", top_k=1)[0]["scores"]) == 1
        tagged = c.tag("ner", TEXTS)
        assert len(tagged) == 2 and tagged[0]["tokens"][0]["token"] == "[CLS]"
        assert all(t["label"] in ("T0", "T1", "T2") for t in tagged[0]["tokens"])
        cls, first = tagged[0]["tokens"][:2]
        assert (cls["start_char"], cls["end_char"]) == (-1, -1)
        assert TEXTS[0][first["start_char"]:first["end_char"]].lower() == first["token"]
        assert all(e["text"] == TEXTS[i][e["start_char"]:e["end_char"]] for i in (0, 1) for e in tagged[i]["entities"])
        vectors = c.embed(TEXTS, normalize=True)
        assert [len(v) for v in vectors] == [server.app.model.spec.hidden_size] * 2
        assert sum(x * x for x in vectors[0]) == pytest.approx(1, abs=1e-4)
    with Client(server.address, admin_token=ADMIN_TOKEN) as admin:
        assert admin.suspend_tenant("sync-co")["status"] == "suspended"
        assert admin.resume_tenant("sync-co")["status"] == "active"
        new_key = admin.rotate_key("sync-co")["api_key"]
        assert admin.delete_adapter("sync-co", "clf") == {"num_versions_deleted": 2}
        assert admin.delete_tenant("sync-co") == {"num_adapters_deleted": 1}
    with Client(server.address, api_key=new_key) as c, pytest.raises(VbertError) as e:
        c.embed("gone")
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_async_client(server, adapters):
    async def main():
        async with AsyncClient(server.address, admin_token=ADMIN_TOKEN) as admin:
            key = (await admin.register_tenant("async-co"))["api_key"]
            assert (await admin.upload_adapter("async-co", "clf", adapters["clf"]))["version"] == 1
            assert "async-co" in {t["name"] for t in await admin.all_tenants()}
            status = await admin.status()
        async with AsyncClient(server.address, api_key=key) as c:
            results, vectors = await asyncio.gather(c.classify("clf", TEXTS), c.embed(TEXTS))
            with pytest.raises(VbertError) as e:
                await c.classify("missing", TEXTS)
        return status, results, vectors, e.value

    status, results, vectors, error = asyncio.run(main())
    assert status["backbone"] and len(results) == 2 and results[0]["label"] in ("L0", "L1", "L2")
    assert len(vectors) == 2 and error.code == grpc.StatusCode.NOT_FOUND and len(error.request_id) == 16


def test_rate_limited_call_is_retried_after_the_servers_retry_after(server):
    key = server.register("throttled", requests_per_s=4.0, burst=1)
    retries = []
    with Client(server.address, api_key=key, on_retry=lambda *a: retries.append(a)) as c:
        c.embed("first")                          # takes the only token
        started = time.monotonic()
        assert len(c.embed("second")) == 1        # refused once, then served after the wait
        elapsed = time.monotonic() - started
    assert len(retries) == 1
    method, attempt, error, delay = retries[0]
    assert (method, attempt, error.code) == ("Embed", 1, EXHAUSTED)
    assert 0.1 < error.retry_after_s <= 0.25 and delay >= error.retry_after_s and elapsed >= error.retry_after_s


def test_not_found_is_not_retried(server):
    key = server.register("no-retry")
    retries = []
    with Client(server.address, api_key=key, on_retry=lambda *a: retries.append(a)) as c, \
            pytest.raises(VbertError) as e:
        c.classify("nope", TEXTS)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and "nope" in e.value.details and e.value.request_id
    assert retries == []


def test_unreachable_server_is_retried_only_for_idempotent_calls():
    retries = []
    with Client("127.0.0.1:1", api_key="k", admin_token="t", timeout=2, max_retries=2, backoff_s=0.01,
                on_retry=lambda *a: retries.append(a)) as c:
        with pytest.raises(VbertError) as e:
            c.embed("x")
        assert e.value.code == UNAVAILABLE and e.value.request_id is None and len(retries) == 2
        retries.clear()
        with pytest.raises(VbertError) as e:
            c.register_tenant("x")      # not idempotent, and the server never answered
        assert e.value.code == UNAVAILABLE and retries == []


def test_retry_rule():
    def err(code, request_id=None, retry_after=None):
        return VbertError(code, "d", request_id, retry_after)

    for code in (UNAVAILABLE, EXHAUSTED):
        assert should_retry(err(code), is_idempotent=True)
    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.PERMISSION_DENIED):
        assert not should_retry(err(code, "rid"), is_idempotent=True)
    # a write that is not idempotent: only the server's own refusal (draining) is retried
    assert should_retry(err(UNAVAILABLE, "rid"), is_idempotent=False)
    assert not should_retry(err(UNAVAILABLE), is_idempotent=False)
    assert not should_retry(err(EXHAUSTED, "rid", 0.1), is_idempotent=False)
    # waits: the server's retry-after (never shorter, <= 10% more), else capped exponential with jitter
    assert retry_delay(err(EXHAUSTED, retry_after=0.5), 0, 0.1, 5, rand=lambda: 0.0) == 0.5
    assert retry_delay(err(EXHAUSTED, retry_after=0.5), 3, 0.1, 5, rand=lambda: 1.0) == pytest.approx(0.55)
    assert retry_delay(err(UNAVAILABLE), 3, 0.1, 5, rand=lambda: 1.0) == pytest.approx(0.8)
    assert retry_delay(err(UNAVAILABLE), 3, 0.1, 5, rand=lambda: 0.0) == pytest.approx(0.4)
    assert retry_delay(err(UNAVAILABLE), 30, 0.1, 5, rand=lambda: 1.0) == 5
    # a wait longer than the timeout is not taken
    c = Client("127.0.0.1:1", timeout=1)
    with pytest.raises(VbertError):
        c._after_failure(_Call("tenant", "Embed", None, None), err(EXHAUSTED, "rid", 5.0), 0)
    assert c._after_failure(_Call("tenant", "Embed", None, None), err(EXHAUSTED, "rid", 0.5), 0) >= 0.5
    c.close()


def test_retry_after_key_matches_the_server():
    from dispatcher import client, errors

    assert client.RETRY_AFTER_KEY == errors.RETRY_AFTER_KEY
