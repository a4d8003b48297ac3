"""Issue 28: the calibrated good-match score, --good-only, sort by date and saved searches, through the library,
the CLI and the API (TestClient), each checked against a naive recomputation from the catalog."""
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from mmsearch.cli import cli
from mmsearch.config import GOOD_MATCH, ModelSpec
from mmsearch.indexing.pipeline import index_folders
from mmsearch.indexing.watch import Watcher
from mmsearch.search.query import Searcher
from mmsearch.search.relevance import date_of
from mmsearch.search.relevance import METHODS, MIN_IMAGES
from mmsearch.serve import create_app
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.store import IndexStore

N = 80
DAY = 86400.0
T0 = 1_700_000_000.0


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def library(tmp_path_factory, synth_dir, tiny_checkpoint):
    """(index, photos): N synthetic PNGs whose file dates are N different days, in shuffled order."""
    root = tmp_path_factory.mktemp("relevance")
    photos = root / "photos"
    photos.mkdir()
    names = sorted(os.listdir(synth_dir / "images"))[:N]
    days = np.random.default_rng(0).permutation(N)
    for name, day in zip(names, days):
        shutil.copy(synth_dir / "images" / name, photos / name)
        os.utime(photos / name, (T0 + day * DAY, T0 + day * DAY))
    idx = root / "idx"
    index_folders(idx, [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint)))
    return idx, photos


@pytest.fixture(scope="module")
def query(library, synth_dir):
    """A caption of the dataset with a few good matches in the library (the tiny model's scores are its own)."""
    import csv

    with open(synth_dir / "captions.csv", newline="") as fh:
        captions = [r["caption"] for r in csv.DictReader(fh)][:300:6]
    s = Searcher(IndexStore.open(library[0]))
    counts = {c: sum(bool(h.good) for h in s.search(c, k=N)) for c in captions}
    best = max(counts, key=lambda c: (2 <= counts[c] <= N // 4, counts[c]))
    assert 2 <= counts[best] <= N // 4, counts
    return best


def naive_scores(idx, query):
    """(cosine, calibrated) per image id, from every stored embedding: an index under 2000 images samples all."""
    store = IndexStore.open(idx)
    ids, emb = store.catalog.embeddings(store.dim)
    q = store.text_encoder().encode_texts([query])[0]
    cos = emb @ q
    z = (cos - cos.mean()) / cos.std()
    z = z - METHODS[GOOD_MATCH["method"]] * (z.max() - z)  # and how far below the query's best hit it falls
    return dict(zip(ids.tolist(), cos.tolist())), dict(zip(ids.tolist(), z.tolist()))


def test_an_index_of_the_older_method_keeps_z_alone(query, library, tmp_path):
    """An index recorded with `z-sample-1` (before the best-hit term) still scores by its own method."""
    idx, _ = library
    old = tmp_path / "old"
    shutil.copytree(idx, old)
    cat = Catalog.open(old)
    with cat.transaction():
        cat.set_meta(relevance=dict(GOOD_MATCH, method="z-sample-1", threshold=2.1))
    store = IndexStore.open(old)
    ids, emb = store.catalog.embeddings(store.dim)
    cos = emb @ store.text_encoder().encode_texts([query])[0]
    z = dict(zip(ids.tolist(), ((cos - cos.mean()) / cos.std()).tolist()))
    hits = Searcher(store).search(query, k=N)
    assert all(h.calibrated == pytest.approx(z[h.id], abs=2e-3) for h in hits)
    assert all(h.good == (z[h.id] >= 2.1) for h in hits if abs(z[h.id] - 2.1) > 1e-3)


def test_every_hit_carries_its_calibrated_score(query, library):
    """Each hit's calibrated score is its cosine's z-score against the collection (here: all of it) less twice
    its distance below the best hit's, and it is good exactly when that reaches the index's threshold."""
    idx, _ = library
    assert Catalog.open(idx, readonly=True).meta()["relevance"] == GOOD_MATCH
    cos, z = naive_scores(idx, query)
    hits = Searcher(IndexStore.open(idx)).search(query, k=N)
    assert len(hits) == N
    for h in hits:
        assert h.similarity == pytest.approx(cos[h.id], abs=1e-4)
        assert h.calibrated == pytest.approx(z[h.id], abs=2e-3)
        if abs(z[h.id] - GOOD_MATCH["threshold"]) > 1e-3:  # not on the edge, where float32 may round either way
            assert h.good == (z[h.id] >= GOOD_MATCH["threshold"])
    good = [h.id for h in hits if h.good]
    only = Searcher(IndexStore.open(idx)).search(query, k=N, good_only=True)
    assert [h.id for h in only] == good and 0 < len(good) < N  # the good matches are a prefix of the cosine order


def test_a_small_index_is_not_calibrated(query, tmp_path, synth_dir, tiny_checkpoint):
    photos = tmp_path / "p"
    photos.mkdir()
    for name in sorted(os.listdir(synth_dir / "images"))[:MIN_IMAGES - 1]:
        shutil.copy(synth_dir / "images" / name, photos / name)
    index_folders(tmp_path / "i", [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None,
                                                            checkpoint=str(tiny_checkpoint)))
    hits = Searcher(IndexStore.open(tmp_path / "i")).search(query, k=5, good_only=True)
    assert len(hits) == 5 and all(h.calibrated is None and h.good is None for h in hits)


def test_sort_by_date_orders_the_good_matches_newest_first(query, library):
    idx, _ = library
    s = Searcher(IndexStore.open(idx))
    good = {h.id: h for h in s.search(query, k=N, good_only=True)}
    by_date = s.search(query, k=N, sort="date")
    assert {h.id for h in by_date} == set(good)
    dates = [date_of(h.row) for h in by_date]
    assert dates == sorted(dates, reverse=True) and len(set(dates)) == len(dates)
    page2 = s.search(query, k=2, offset=1, sort="date")
    assert [h.id for h in page2] == [h.id for h in by_date[1:3]] and [h.rank for h in page2] == [2, 3][:len(page2)]


def test_no_good_match_gives_the_closest_results(query, library, tmp_path):
    """With a threshold nothing reaches (the one recorded in the index meta is what counts), good-only returns
    the closest results, all marked not good, and the CLI says so instead of printing nothing."""
    idx, _ = library
    strict = tmp_path / "strict"
    shutil.copytree(idx, strict)
    cat = Catalog.open(strict)
    with cat.transaction():
        cat.set_meta(relevance=dict(GOOD_MATCH, threshold=50.0))
    plain = Searcher(IndexStore.open(strict)).search(query, k=4)
    hits = Searcher(IndexStore.open(strict)).search(query, k=4, good_only=True)
    assert [h.id for h in hits] == [h.id for h in plain] and not any(h.good for h in hits)
    res = run("search", query, "--index", strict, "-k", "4", "--good-only")
    assert res.output.splitlines()[0] == "no good match; closest results below"
    assert res.output.splitlines()[1].split() == ["rank", "score", "match", "path"]
    with TestClient(create_app(strict, warm=False), base_url="http://127.0.0.1") as c:
        body = c.get("/api/search", params={"q": query, "k": 4, "good_only": "true"}).json()
        assert body["no_good_match"] is True and [h["id"] for h in body["hits"]] == [h.id for h in plain]
        body = c.get("/api/search", params={"q": query, "k": 4}).json()
        assert body["no_good_match"] is False and body["calibrated"] is True


def test_cli_search_json_carries_the_score_and_sorts_by_date(query, library):
    idx, _ = library
    _, z = naive_scores(idx, query)
    objs = [json.loads(l) for l in run("search", query, "--index", idx, "-k", "5", "--json").output.splitlines()]
    assert all(o["calibrated"] == pytest.approx(z[o["id"]], abs=2e-3) and "good" in o for o in objs)
    table = run("search", query, "--index", idx, "-k", "3").output.splitlines()
    assert table[0].split() == ["rank", "score", "match", "path"] and table[1].split()[2].endswith("*")
    paths = run("search", query, "--index", idx, "--sort", "date", "-k", "100", "--paths").output.split()
    dates = [os.stat(p).st_mtime for p in paths]
    assert dates == sorted(dates, reverse=True) and len(paths) == sum(v >= GOOD_MATCH["threshold"] for v in z.values())
    assert run("search", query, "--index", idx, "--sort", "size", ok=False).exit_code == 2


def test_api_good_only_and_sort(query, library):
    idx, _ = library
    with TestClient(create_app(idx, warm=False), base_url="http://127.0.0.1") as c:
        info = c.get("/api/info").json()
        assert info["calibrated"] is True and info["good_threshold"] == GOOD_MATCH["threshold"]
        all_hits = c.get("/api/search", params={"q": query, "k": N}).json()["hits"]
        good = c.get("/api/search", params={"q": query, "k": N, "good_only": "true"}).json()
        assert [h["id"] for h in good["hits"]] == [h["id"] for h in all_hits if h["good"]]
        assert good["query"]["good_only"] is True and good["good_threshold"] == GOOD_MATCH["threshold"]
        dated = c.get("/api/search", params={"q": query, "k": N, "sort": "date"}).json()["hits"]
        assert [h["date"] for h in dated] == sorted((h["date"] for h in good["hits"]), reverse=True)
        assert c.get("/api/search", params={"q": query, "sort": "size"}).status_code == 400


def test_albums_are_live_saved_searches(query, library, tmp_path, tiny_checkpoint, synth_dir):
    """Issue 28: albums add/list/show/rm; an album opens as a live search that includes photos indexed since."""
    src, _ = library
    idx, photos = tmp_path / "idx", tmp_path / "photos"
    shutil.copytree(src, idx)
    shutil.copytree(library[1], photos)
    cat = Catalog.open(idx)  # the copy's recorded paths point at the module's photos: re-point them
    with cat.transaction():
        for path, (i, *_rest) in cat.image_states().items():
            cat.update_image(i, path=str(photos / os.path.basename(path)))
        cat.set_meta(roots=[str(photos)])
    assert "saved album 'reds'" in run("albums", "add", "reds", query, "--index", idx).output
    assert "exists already" in run("albums", "add", "reds", "x", "--index", idx, ok=False).output
    run("albums", "add", "blue jpgs", "a blue square", "--index", idx, "--ext", "jpg", "--sort", "relevance")
    listed = [json.loads(l) for l in run("albums", "list", "--index", idx, "--json").output.splitlines()]
    assert [a["name"] for a in listed] == ["blue jpgs", "reds"] and listed[0]["filters"]["ext"] == [".jpg"]
    shown = run("albums", "show", "reds", "--index", idx, "--paths").output.split()
    direct = run("search", query, "--index", idx, "--sort", "date", "-k", "200", "--paths").output.split()
    assert shown == direct and shown

    # a new photo like the album's best match, indexed after the album was saved: the album now has it
    best = Searcher(IndexStore.open(idx)).search(query, k=1)[0]
    time.sleep(0.01)
    shutil.copy(best.path, photos / "new-arrival.png")  # a fresh file date: first by date
    index_folders(idx, [photos])
    with TestClient(create_app(idx, warm=False), base_url="http://127.0.0.1") as c:
        albums = c.get("/api/albums").json()["albums"]
        assert [a["name"] for a in albums] == ["blue jpgs", "reds"]
        body = c.get("/api/albums/reds").json()
        assert body["hits"][0]["path"] == str(photos / "new-arrival.png") and body["added_since_saved"] == 1
        assert body["album"]["query"] == query and isinstance(body["generation"], int)
        assert c.get("/api/albums/blue jpgs").json()["hits"] == []  # no jpg in this folder
        missing = c.get("/api/albums/nope")
        assert missing.status_code == 404 and "no album named 'nope'" in missing.json()["error"]
    assert "1 indexed since it was saved" in run("albums", "show", "reds", "--index", idx).output
    assert "removed album 'reds'" in run("albums", "rm", "reds", "--index", idx).output
    assert "no album named 'reds'" in run("albums", "show", "reds", "--index", idx, ok=False).output
    assert "control characters" in run("albums", "add", "a\tb", "q", "--index", idx, ok=False).output


def test_health_reports_the_watcher(library, tmp_path, tiny_checkpoint):
    """serve --watch: /api/health reports the watcher's state and folders; the server sees what it indexes."""
    src, photos_src = library
    idx, photos = tmp_path / "idx", tmp_path / "photos"
    photos.mkdir()
    for p in sorted(photos_src.iterdir())[:3]:
        shutil.copy(p, photos / p.name)
    index_folders(idx, [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint)))
    w = Watcher(idx, [photos], debounce=0.1)
    with TestClient(create_app(idx, warm=False, watcher=w), base_url="http://127.0.0.1") as c:
        deadline = time.monotonic() + 60
        while c.get("/api/health").json()["watcher"]["state"] != "watching":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = c.get("/api/health").json()
        assert health["watcher"]["roots"] == [{"path": str(photos), "mode": "native", "why_poll": None,
                                               "present": True, "away": None}]
        shutil.copy(sorted(photos_src.iterdir())[5], photos / "late.png")
        while c.get("/api/health").json()["images"] != 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the watcher's totals count a photo when its run ends, after OCR, a little after its vector is searchable
        while c.get("/api/health").json()["watcher"]["totals"]["added"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get("/api/info").json()["watching"] is True
    assert w.status()["state"] == "stopped" and not any(t.name == "mmsearch-watch" for t in threading.enumerate())
    with TestClient(create_app(idx, warm=False), base_url="http://127.0.0.1") as c:
        assert c.get("/api/health").json()["watcher"] is None


def test_the_calibration_sample_is_kept_for_the_next_process(library, tmp_path, monkeypatch):
    """A fresh process reads the sample the last one drew (drawing it at 1M images took 0.1 s of a 0.6 s
    query) under the rule a long-lived searcher uses: drawn again once the collection grew by a tenth,
    or when the kept file is damaged."""
    from mmsearch.search import relevance

    idx = tmp_path / "idx"
    shutil.copytree(library[0], idx)
    first = relevance.CalibrationCache(IndexStore.open(idx)).get()
    kept = idx / relevance.SAMPLE_FILE
    assert kept.is_file()

    draws = []
    real = Catalog.sample_embeddings
    monkeypatch.setattr(Catalog, "sample_embeddings", lambda self, *a, **kw: draws.append(1) or real(self, *a, **kw))
    again = relevance.CalibrationCache(IndexStore.open(idx)).get()
    assert draws == [] and np.array_equal(again.sample, first.sample)

    top = Catalog.open(idx, readonly=True).max_image_id()
    with np.load(kept) as f:
        assert int(f["top"]) == top
    with open(kept, "wb") as fh:  # drawn when the collection had half its images: stale
        np.savez(fh, top=np.int64(top // 2), sample=first.sample)
    grown = relevance.CalibrationCache(IndexStore.open(idx)).get()
    assert draws == [1] and np.array_equal(grown.sample, first.sample)
    with np.load(kept) as f:
        assert int(f["top"]) == top  # kept again, at the size it was drawn at

    kept.write_bytes(b"PK\x03\x04 not a whole archive")
    damaged = relevance.CalibrationCache(IndexStore.open(idx)).get()
    assert draws == [1, 1] and np.array_equal(damaged.sample, first.sample)
