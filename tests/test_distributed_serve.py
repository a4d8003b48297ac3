"""Issue 30, the Ray Serve application on a local multi-node cluster started here: a head (the router, Serve's
controller and proxy) and two worker nodes holding 4 shards x 2 replicas (shards 0-2 on one, shard 3 on
the other, pinned by their custom resources). Small synthetic data, queries by indexed image (no model).

It answers what one index answers; a replica killed under load fails no request; a node killed gives
partial answers naming its shard, then full ones once it is back; a swap under load loses nothing; a
shard map of another model is refused before anything is deployed.

The machine has 2 shared cores: each node gets one CPU, every replica declares 0.05, Ray's health checks
are fast, and each test has a short timeout, so a hang fails here instead of stalling the suite.
"""
import logging
import shutil
import socket
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")  # the dev extra installs ray[serve]: this never skips there
import httpx  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from helpers import mixture_vectors, synthetic_store  # noqa: E402
from mmsearch.errors import ModelMismatchError, ShardMapError  # noqa: E402
from mmsearch.indexing.sharded import split_index  # noqa: E402
from mmsearch.search.query import Searcher  # noqa: E402
from mmsearch.storage.catalog import Catalog  # noqa: E402
from mmsearch.storage.shardmap import ShardMap, global_id, shard_of  # noqa: E402

pytestmark = [pytest.mark.cluster]
NODE = dict(num_cpus=1, object_store_memory=80 * 1024 ** 2)
FAST_FAILURE_DETECTION = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                          "health_check_failure_threshold": 4}
SHARDS_A = {"mmsearch-shard-0": 1, "mmsearch-shard-1": 1, "mmsearch-shard-2": 1}
SHARDS_B = {"mmsearch-shard-3": 1}
N = 2000


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, cluster, single-index store, layout dir, path -> global id)."""
    from mmsearch.distributed.serving import deploy

    tmp = tmp_path_factory.mktemp("serve-ray")
    _, vecs = mixture_vectors(N)
    store = synthetic_store(tmp, vecs)
    split_index(store.dir, 4, tmp / "shards")
    gid = {}
    smap = ShardMap.load(tmp / "shards")
    for i, nm in enumerate(smap.names):
        cat = Catalog.open(smap.folder(nm), readonly=True)
        gid.update({p: global_id(lid, i, 4) for lid, p in cat.conn.execute("SELECT id, path FROM images")})
        cat.close()
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=80 * 1024 ** 2,
                                                          resources={"mmsearch-router": 1},
                                                          _system_config=FAST_FAILURE_DETECTION))
    c.node_a = c.add_node(resources=SHARDS_A, **NODE)
    c.node_b = c.add_node(resources=SHARDS_B, **NODE)
    try:
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level=logging.ERROR, log_to_driver=False)
        url = deploy(c.address, tmp / "shards", port=_free_port(), replicas=2, pin=True, replica_cpus=0.05,
                     options={"timeout_s": 2.0, "probe_s": 0.5})
        yield url, c, store, tmp / "shards", gid
    finally:  # never leave Ray processes behind
        from ray import serve

        try:
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        c.shutdown()


def _query_ids(store, n=30, seed=0):
    return [int(i) for i in np.random.default_rng(seed).choice(np.arange(1, N + 1), n, replace=False)]


def _get(client, url, params, timeout=20):
    res = client.get(url + "api/search", params=params, timeout=timeout)
    return res.status_code, res.json()


@pytest.mark.timeout(240)  # the first test also starts the cluster and the application (~1 min here)
def test_the_ray_app_answers_what_one_index_answers(app):
    url, _, store, root, gid = app
    single = Searcher(store)
    paths = dict(store.catalog.conn.execute("SELECT id, path FROM images"))
    with httpx.Client() as c:
        info = c.get(url + "api/info", timeout=20).json()
        assert info["sharded"] and info["images"] == N and not info["partial"]
        assert [s["name"] for s in info["shards"]] == ["shard-0", "shard-1", "shard-2", "shard-3"]
        assert all(s["up"] and s["images"] > 300 for s in info["shards"])
        for q in _query_ids(store, 12):
            for extra in ({}, {"ext": "png"}, {"folder": "/img/a", "offset": 5}):
                status, data = _get(c, url, {"id": gid[paths[q]], "k": 10, **extra})
                assert status == 200 and data["partial"] is False and data["missing"] == []
                kw = dict(k=10, offset=extra.get("offset", 0))
                if "ext" in extra:
                    kw["exts"] = ["png"]
                if "folder" in extra:
                    kw["under"] = "/img/a"
                ref = single.search(ids=[q], **kw)
                assert [h["path"] for h in data["hits"]] == [h.path for h in ref]
                np.testing.assert_allclose([h["score"] for h in data["hits"]], [h.score for h in ref], atol=1e-6)
                assert all(h["id"] == gid[h["path"]] for h in data["hits"])
        meta = c.get(url + f"api/images/{gid[paths[7]]}", timeout=20).json()
        assert meta["path"] == paths[7]  # a row comes from its owning shard
        assert c.get(url + "api/images/999999999", timeout=20).status_code == 404
        page = c.get(url, timeout=20)
        assert page.status_code == 200 and "app.js" in page.text  # the page, unchanged
        assert "did not answer" in c.get(url + "static/app.js", timeout=20).text  # ... which shows partial answers


def test_a_shard_map_of_another_model_is_refused_before_deploying(app, tmp_path):
    from mmsearch.distributed.serving import build_application

    _, _, _, root, _ = app
    copy = tmp_path / "shards"
    shutil.copytree(root, copy)
    cat = Catalog.open(copy / "shard-2")
    with cat.transaction():
        cat.set_meta(fingerprint="another-model")
    cat.close()
    with pytest.raises(ModelMismatchError, match="shard-2 .*another-model"):
        build_application(copy)
    shutil.rmtree(copy / "shard-1")
    with pytest.raises(ShardMapError, match="shard-1: no index"):
        build_application(copy)


class Load:
    """`threads` clients sending queries by id until `total` are done; every answer recorded."""

    def __init__(self, url, gids, threads=4, total=120):
        self.url, self.gids, self.total = url, gids, total
        self.results, self.lock, self.sent = [], threading.Lock(), 0
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        with httpx.Client() as c:
            while True:
                with self.lock:
                    if self.sent >= self.total:
                        return
                    g = self.gids[self.sent % len(self.gids)]
                    self.sent += 1
                try:
                    status, data = _get(c, self.url, {"id": g, "k": 10})
                except Exception as exc:  # a dropped connection is a failed request too
                    status, data = type(exc).__name__, {}
                with self.lock:
                    self.results.append((g, status, data.get("partial"), data.get("missing"),
                                         [h["path"] for h in data.get("hits", [])]))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def wait(self, done: int, timeout=60):
        deadline = time.monotonic() + timeout
        while len(self.results) < done and time.monotonic() < deadline:
            time.sleep(0.02)

    def __exit__(self, *exc):
        for t in self.threads:
            t.join(90)


def _gids_on(gid, shards=(0, 1, 2, 3)):
    return [g for g in sorted(gid.values()) if g % 4 in shards]


@pytest.mark.timeout(150)
def test_a_replica_killed_under_load_fails_no_request(app):
    from mmsearch.distributed.serving import shard_replicas

    url, _, _, _, gid = app
    victims = shard_replicas()["shard-1"]
    assert len(victims) == 2
    queries = _gids_on(gid)[::40]
    with Load(url, queries, threads=4, total=160) as load:
        load.wait(30)
        ray.kill(ray.get_actor(victims[0], namespace="serve"), no_restart=True)
        killed_at = len(load.results)
    failed = [r for r in load.results if r[1] != 200 or r[2] is not False]
    assert len(load.results) == 160 and killed_at < 160 and failed == []  # every answer whole, through the kill
    deadline = time.monotonic() + 90  # and Ray replaces the dead replica
    while time.monotonic() < deadline and len(set(shard_replicas().get("shard-1", [])) - {victims[0]}) < 2:
        time.sleep(0.5)
    assert len(set(shard_replicas()["shard-1"]) - {victims[0]}) == 2


@pytest.mark.timeout(150)
def test_a_shard_swap_under_load_loses_no_request(app, tmp_path):
    url, _, _, root, gid = app
    smap = ShardMap.load(root)
    new = tmp_path / "shard-2-v2"
    shutil.copytree(smap.folder("shard-2"), new)
    cat = Catalog.open(new)
    with cat.transaction():  # the re-indexed shard: one photo fewer
        gone = cat.conn.execute("SELECT id, path FROM images ORDER BY id LIMIT 1").fetchone()
        cat.delete_images([gone[0]])
        cat.bump_generation()
    cat.close()
    queries = [g for g in _gids_on(gid)[::40] if g != global_id(gone[0], 2, 4)]  # (its query image goes)
    with Load(url, queries, threads=4, total=160) as load:
        load.wait(40)
        smap.swap("shard-2", new)
        swapped_at = len(load.results)
    failed = [r for r in load.results if r[1] != 200 or r[2] is not False]
    assert len(load.results) == 160 and swapped_at < 160 and failed == []
    time.sleep(2.5)  # the replicas' next look at the map (0.5 s) and the server's info cache (2 s)
    with httpx.Client() as c:
        info = c.get(url + "api/info", timeout=20).json()
        s2 = next(s for s in info["shards"] if s["name"] == "shard-2")
        assert s2["folder"] == str(new.resolve()) and s2["version"] == 2 and info["images"] == N - 1
        assert c.get(url + f"api/images/{global_id(gone[0], 2, 4)}", timeout=20).status_code == 404


@pytest.mark.timeout(180)
def test_a_node_killed_gives_partial_answers_then_full_ones_once_it_is_back(app):
    url, cluster, _, _, gid = app
    queries = _gids_on(gid, (0, 1))[::50]  # (shard-2 lost one image to the swap above)
    cluster.remove_node(cluster.node_b, allow_graceful=False)  # the node of shard-3's two replicas
    try:
        with httpx.Client() as c:
            deadline = time.monotonic() + 60
            answers = []
            while time.monotonic() < deadline:
                status, data = _get(c, url, {"id": queries[len(answers) % len(queries)], "k": 10})
                answers.append((status, data.get("partial"), data.get("missing"), data.get("error")))
                if data.get("partial") and len(answers) > 3 and all(a[1] for a in answers[-3:]):
                    break
            assert all(a[0] == 200 for a in answers), answers  # never an error: the other shards still answer
            assert answers[-1] == (200, True, ["shard-3"], None)
            status, data = _get(c, url, {"id": queries[0], "k": 10})
            assert all(h["id"] % 4 != 3 for h in data["hits"]) and len(data["hits"]) == 10
            info = c.get(url + "api/info", timeout=20).json()
            assert info["missing"] == ["shard-3"] or info["partial"] is False  # (cached up to 2 s)
            health = c.get(url + "api/health", timeout=20).json()
            assert health["status"] in ("degraded", "ok")
    finally:
        cluster.node_b = cluster.add_node(resources=SHARDS_B, **NODE)
    with httpx.Client() as c:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status, data = _get(c, url, {"id": queries[0], "k": 10})
            if status == 200 and not data["partial"]:
                break
            time.sleep(1)
        assert (status, data["partial"], data["missing"]) == (200, False, [])
        assert any(h["id"] % 4 == 3 for h in _get(c, url, {"id": _gids_on(gid, (3,))[0], "k": 10})[1]["hits"])
