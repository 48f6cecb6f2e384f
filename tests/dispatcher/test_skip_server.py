"""A server in skip mode over real gRPC: adapters of two tables served side by side with the same
scores as the in-process skip model, adapters it cannot run refused at upload, hit rate exported."""
from __future__ import annotations

import grpc
import pytest
from prometheus_client import generate_latest

from dispatcher.client import Client, VbertError
from dispatcher.config import ServerConfig
from tests.conftest import classify
from tests.dispatcher.conftest import ADMIN_TOKEN, RunningServer, tiny_server_config
from tests.vbert.test_skip import sentences, setup, skip_model, top_layers_artifact  # noqa: F401 (fixture)
from vbert import EncodeRow, save_artifact


@pytest.fixture
def server(setup, tmp_path):  # noqa: F811
    tables = ",".join(f"{n}={setup['shallow'][n]}:{setup['tables'][n]}" for n in ("a", "b"))
    s = RunningServer(tiny_server_config(setup["ckpt"], tmp_path / "data", skip=True, skip_tables=tables,
                                         skip_route="table", max_lora_rank=8))
    yield s
    s.stop()


def test_skip_server_serves_two_tables_like_the_in_process_model(server, setup, tmp_path):  # noqa: F811
    key = server.register("acme")
    reference = skip_model(setup, names=("a", "b"))
    arts = {"on-a": top_layers_artifact(reference, "lora", classify(3), 1, skip_table="a"),
            "on-b": top_layers_artifact(reference, "bottleneck", classify(3), 2, skip_table="b")}
    texts = sentences(6, 3)
    with Client(server.address, admin_token=ADMIN_TOKEN) as admin, Client(server.address, api_key=key) as tenant:
        for name, art in arts.items():
            admin.upload_adapter("acme", name, save_artifact(art, tmp_path / name))
        for name, art in arts.items():
            got = tenant.classify(name, texts)
            slot = reference.load_adapter(art)
            want = reference.forward([EncodeRow(ids, slot) for ids in reference.tokenize(texts)])
            for g, w in zip(got, want):
                assert g["label"] == w.predicted()
                probs = w.logits.softmax(-1)
                for label, p in g["scores"].items():
                    assert abs(p - float(probs[w.labels.index(label)])) < 1e-4, (name, g, probs)
        all_layers = top_layers_artifact(reference, "bottleneck", classify(2), 3)
        w = all_layers.adapter.layer_weights[2]
        all_layers.adapter.layer_weights[0] = type(w)(*(t.clone() for t in (w.down_w, w.down_b, w.up_w, w.up_b)))
        with pytest.raises(VbertError) as e:
            admin.upload_adapter("acme", "low", save_artifact(all_layers, tmp_path / "low"))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "skip mode replaces" in e.value.details
        names = [a["name"] for a in admin.list_adapters("acme")]
        assert "low" not in names
    metrics = generate_latest(server.app.metrics.registry).decode()
    assert 'vbert_skip_table_hit_rate{table="a"}' in metrics and 'vbert_skip_tokens_total{table="b"}' in metrics
    stats = server.app.model.skip.stats()
    assert stats["a"]["tokens"] > 0 and stats["b"]["tokens"] > 0


def test_skip_settings_are_validated(setup, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="skip_tables is empty"):
        ServerConfig(data_dir=str(tmp_path), skip=True)
    with pytest.raises(ValueError, match="expected name=SHALLOW_DIR"):
        ServerConfig(data_dir=str(tmp_path), skip=True, skip_tables="nonsense")
    with pytest.raises(ValueError, match="does not exist"):
        ServerConfig(data_dir=str(tmp_path), skip=True, skip_tables=f"a={tmp_path / 'missing'}")
    off = ServerConfig(data_dir=str(tmp_path), skip=False, skip_tables=f"a={tmp_path / 'missing'}")
    assert not off.model_config().skip.enabled
    env = ServerConfig.load(None, {"VBERT_SKIP": "true", "VBERT_SKIP_TABLES": f"a={setup['shallow']['a']}",
                                   "VBERT_SKIP_MODE": "fallback"}, {"data_dir": str(tmp_path)})
    cfg = env.model_config().skip
    assert cfg.enabled and cfg.mode == "fallback" and cfg.tables[0].table is None
    assert cfg.cache_dir == str(tmp_path / "skip" / "misses")         # miss caches kept across restarts ...
    env = ServerConfig.load(None, {"VBERT_SKIP": "true", "VBERT_SKIP_TABLES": f"a={setup['shallow']['a']}",
                                   "VBERT_SKIP_KEEP_CACHE": "false"}, {"data_dir": str(tmp_path)})
    assert env.model_config().skip.cache_dir is None                   # ... unless told not to


def test_skip_on_without_tables_serves_the_shipped_layers_with_the_data_dirs_table(setup, tmp_path, monkeypatch):  # noqa: F811
    from training.table import TableConfig, build_table
    from vbert import config as vbert_config
    from vbert.shallow import export_shallow

    data = tmp_path / "data"
    with pytest.raises(ValueError, match="vbert build-table --corpus YOUR_TEXT --out .*skip/table.safetensors"):
        ServerConfig(data_dir=str(data), skip=True, backbone=str(setup["ckpt"]))
    table = data / "skip" / "table.safetensors"
    table.parent.mkdir(parents=True)
    table.write_bytes(b"")                                    # there, but the project ships no layers (here)
    monkeypatch.setattr(vbert_config, "SHIPPED_SHALLOW", tmp_path / "shipped")
    with pytest.raises(ValueError, match="no shipped shallow layers"):
        ServerConfig(data_dir=str(data), skip=True, backbone=str(setup["ckpt"]))
    export_shallow(setup["shallow"]["a"], tmp_path / "shipped")   # what the project ships: a float16 export
    table.unlink()
    build_table(TableConfig(shallow=vbert_config.default_shallow_path(), corpus=(str(setup["corpus"]),),
                            out=str(table), budget_mb=64, backbone=str(setup["ckpt"]), show_progress=False),
                echo=lambda s: None)
    s = RunningServer(tiny_server_config(setup["ckpt"], data, skip=True))
    try:
        skip = s.app.model.skip
        assert skip.names == ["default"] and skip.route == "cost"
        assert skip.tables["default"].meta.dtype == "float16"
        key = s.register("acme")
        with Client(s.address, api_key=key) as tenant:
            texts = setup["corpus"].read_text().splitlines()[:6]
            got = tenant.embed(texts)
        assert len(got) == 6 and skip.stats()["default"]["probed"] > 0
    finally:
        s.stop()
