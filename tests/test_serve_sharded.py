"""Issue 30: `mmsearch serve --shards DIR` (every shard in the server's process) speaks the API of `mmsearch
serve`: the same keys, hits by global id, rows from the owning shard, and a shard that does not answer
made visible (partial, missing) in search answers, /api/info and /api/health."""
import numpy as np
import pytest
from fastapi.testclient import TestClient

from helpers import mixture_vectors, synthetic_store
from mmsearch.indexing.sharded import split_index
from mmsearch.search.query import Searcher
from mmsearch.serve import create_app
from mmsearch.serve.sharded import local_state

LOCAL = "http://127.0.0.1"


@pytest.fixture
def served(tmp_path):
    _, vecs = mixture_vectors(400)
    store = synthetic_store(tmp_path, vecs)
    split_index(store.dir, 3, tmp_path / "shards")
    st = local_state(tmp_path / "shards", timeout_s=0.5)
    with TestClient(create_app(state=st, warm=False), base_url=LOCAL) as c:
        yield c, st, store


def test_the_api_is_the_same_over_shards(served):
    c, st, store = served
    single = Searcher(store)
    paths = dict(store.catalog.conn.execute("SELECT id, path FROM images"))
    by_path = {}
    for i, nm in enumerate(st.searcher.names):
        for lid, p in st.searcher.clients[i].worker.view().store.catalog.conn.execute("SELECT id, path FROM images"):
            by_path[p] = lid * 3 + i
    res = c.get("/api/search", params={"id": by_path[paths[11]], "k": 6, "ext": "jpg"})
    assert res.status_code == 200, res.text
    data = res.json()
    assert set(data) == {"query", "hits", "more", "reranked", "partial", "missing", "took_ms", "timing", "calibrated",
                         "good_threshold", "no_good_match"}
    assert data["calibrated"] is False and data["no_good_match"] is False  # no calibration over shards yet
    assert set(data["timing"]) == {"embed_ms", "scatter_ms", "slowest_shard_ms", "total_ms"}
    assert data["timing"]["total_ms"] >= data["timing"]["scatter_ms"] >= data["timing"]["slowest_shard_ms"] > 0
    assert (data["partial"], data["missing"]) == (False, [])
    ref = single.search(ids=[11], k=6, exts=["jpg"])
    assert [h["path"] for h in data["hits"]] == [h.path for h in ref]
    np.testing.assert_allclose([h["score"] for h in data["hits"]], [h.score for h in ref], atol=1e-6)
    h = data["hits"][0]
    assert h["thumbnail"].startswith(f"/api/images/{h['id']}/thumb") and h["id"] == by_path[h["path"]]
    assert c.get(f"/api/images/{h['id']}").json()["path"] == h["path"]
    assert c.get("/api/images/999999").status_code == 404
    info = c.get("/api/info").json()
    assert info["images"] == 400 and [s["up"] for s in info["shards"]] == [True] * 3 and info["partial"] is False
    assert info["folders"] == ["/img/a", "/img/b"] and c.get("/api/health").json()["status"] == "ok"
    assert c.get("/api/search", params={"q": "a dog"}).status_code == 503  # a model-less index: no text tower


def test_a_shard_that_does_not_answer_is_named_everywhere(served):
    c, st, _ = served
    worker = st.searcher.clients[1].worker

    def down(*a, **k):
        raise OSError("disk gone")

    for method in ("search", "info", "ping", "rows", "folders"):
        setattr(worker, method, down)
    st._cache = (0.0, {}, [])
    first = st.searcher.clients[0].worker.view().store.catalog.conn.execute("SELECT min(id) FROM images").fetchone()[0]
    res = c.get("/api/search", params={"id": first * 3, "k": 5})  # an image of shard-0
    data = res.json()
    assert res.status_code == 200, res.text
    assert data["partial"] is True and data["missing"] == ["shard-1"] and len(data["hits"]) == 5
    assert all(h["id"] % 3 != 1 for h in data["hits"])
    st._cache = (0.0, {}, [])
    info = c.get("/api/info").json()
    assert info["partial"] is True and info["missing"] == ["shard-1"]
    assert [s["up"] for s in info["shards"]] == [True, False, True] and "disk gone" in info["shards"][1]["reason"]
    assert c.get("/api/health").json()["status"] == "degraded"
    res = c.get("/api/images/4")  # owned by shard-1 (4 = 1 * 3 + 1)
    assert res.status_code == 503 and "shard-1" in res.json()["error"]
