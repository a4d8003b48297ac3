"""Issue 31, the data side: one writer per index (7), names that are not UTF-8 (8), non-finite vectors
(9), a damaged catalog (10), a read-only index (11), captions added while a server runs (15).

Indexes use the tiny architecture with random weights (no training): these tests are about storage."""
import base64
import csv
import json
import os
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.errors import IndexBusyError, NonFiniteVectorError, QueryError
from mmsearch.indexing.corpus import add_texts
from mmsearch.indexing.pipeline import index_folders
from mmsearch.storage.store import IndexStore
from mmsearch.storage.vectors import VectorIndex

TINY = ModelSpec(model="mmsearch-tiny", pretrained=None)
ODD = b"caf\xe9.png"  # a Latin-1 name from an old camera: not UTF-8


def _photos(folder: Path, synth_dir, start: int, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in sorted(os.listdir(synth_dir / "images"))[start:start + n]:
        shutil.copy(synth_dir / "images" / name, folder / name)
    return folder


def _captions(synth_dir, n):
    with open(synth_dir / "captions.csv") as fh:
        return [r["caption"] for r in csv.DictReader(fh)][:n]


@pytest.fixture(scope="module")
def small(tmp_path_factory, synth_dir):
    """(index, photos): 12 synthetic PNGs and 20 captions; tests copy it before changing it."""
    root = tmp_path_factory.mktemp("hardening")
    photos = _photos(root / "photos", synth_dir, 0, 12)
    index_folders(root / "idx", [photos], spec=TINY)
    add_texts(IndexStore.open(root / "idx"), _captions(synth_dir, 20))
    return root / "idx", photos


def _copy(small, dest: Path) -> Path:
    shutil.copytree(small[0], dest)
    return dest


def _consistent(index_dir) -> int:
    """Every catalog row has its vector in the FAISS file, and each stored vector finds its own id."""
    store = IndexStore.open(index_dir)
    ids, emb = store.catalog.embeddings(store.dim)
    vectors = VectorIndex.load(index_dir / "vectors.faiss", store.catalog.generation())
    assert vectors is not None, "the FAISS file is stale or missing after the run"
    assert sorted(vectors.ids().tolist()) == ids.tolist()
    _, got = vectors.search(emb, 1)
    assert got[:, 0].tolist() == ids.tolist()
    return len(ids)


# ---- 7: one writer at a time, and vectors repaired ----------------------------------------------
HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mmsearch.indexing.pipeline import index_folders

    index, folder, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    def progress(done, total=None, stage=None, **_):
        if stage == "embed" and done == 0:  # the lock is held and nothing of this run is committed yet
            print("HOLDING", flush=True)
            deadline = time.time() + 120
            while not go.exists() and time.time() < deadline:
                time.sleep(0.05)
    s = index_folders(index, [folder], progress=progress)
    print("ADDED", s.added, flush=True)
""")


def test_second_writer_is_refused_with_the_holders_pid_and_readers_keep_reading(small, tmp_path, synth_dir):
    """Issue 31 item 7: two `mmsearch index` runs on one index (different folders) lost one run's vectors.
    Now the second writer is refused at once, in one line naming the first one's pid; readers are not
    blocked; once the first is done the second runs, and every catalog row has its vector."""
    idx = _copy(small, tmp_path / "idx")
    first = _photos(tmp_path / "first", synth_dir, 100, 6)
    second = _photos(tmp_path / "second", synth_dir, 200, 5)
    go = tmp_path / "go"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(idx), str(first), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = holder.stdout.readline()
        assert line.strip() == "HOLDING", line + holder.stderr.read()
        # a second writer, the real command line in its own process: refused at once, one line
        other = subprocess.run([sys.executable, "-m", "mmsearch", "index", str(second), "--index", str(idx)],
                               capture_output=True, text=True, timeout=300)
        assert other.returncode == 1, other.stdout + other.stderr
        assert other.stderr.strip() == (f"Error: index {idx} is being written by another mmsearch process "
                                        f"(pid {holder.pid}); wait for it or use another --index")
        with pytest.raises(IndexBusyError, match=f"pid {holder.pid}"):  # every writer takes the same lock
            add_texts(IndexStore.open(idx), ["a caption added meanwhile"])
        # readers are never blocked by the writer
        res = CliRunner().invoke(cli, ["search", "a red circle", "--index", str(idx), "--json", "-k", "50"])
        assert res.exit_code == 0, res.output
        assert len(res.output.splitlines()) == 12
    finally:
        go.touch()
        out, err = holder.communicate(timeout=300)
    assert holder.returncode == 0, err
    assert "ADDED 6" in out
    again = subprocess.run([sys.executable, "-m", "mmsearch", "index", str(second), "--index", str(idx)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "added 5," in again.stdout
    assert _consistent(idx) == 12 + 6 + 5


def test_index_repairs_vectors_missing_for_catalog_rows_without_re_embedding(small, tmp_path, monkeypatch):
    """Issue 31 item 7: the state two racing runs left behind (a FAISS file at the catalog's generation that
    lacks rows the catalog has) was never repaired by a re-run. `index` now counts, compares the ids and
    adds the missing vectors from the stored embeddings, loading no model."""
    idx = _copy(small, tmp_path / "idx")
    store = IndexStore.open(idx)
    ids, emb = store.catalog.embeddings(store.dim)
    gen = store.catalog.generation()
    VectorIndex.build("Flat", store.dim, ids[:5], emb[:5]).save(idx / "vectors.faiss", gen)  # what the race left
    assert IndexStore.open(idx).info()["vectors"] == 5  # the damage is there, at the current generation

    import mmsearch.towers.encoder as encoder_module

    def no_model(*a, **k):
        raise AssertionError("a repair must not load the model (nothing is re-embedded)")
    monkeypatch.setattr(encoder_module, "load_encoder", no_model)
    s = index_folders(idx, [small[1]])
    assert (s.embedded, s.unchanged, s.repaired) == (0, 12, 7)
    assert _consistent(idx) == 12
    assert IndexStore.open(idx).catalog.generation() > gen  # a server holding the damaged vectors reloads
    assert index_folders(idx, [small[1]]).repaired == 0  # and a repaired index stays quiet


def test_vector_ids_are_read_from_id_maps_and_inverted_lists():
    """Issue 31 item 7: the repair compares id sets; both kinds of FAISS structure give theirs back."""
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(300, 16)).astype(np.float32)
    ids = rng.choice(10_000, size=300, replace=False).astype(np.int64)
    for factory in ("Flat", "IVF4,Flat", "HNSW8"):
        index = VectorIndex.build(factory, 16, ids, vecs)
        assert sorted(index.ids().tolist()) == sorted(ids.tolist()), factory


# ---- 8: names that are not UTF-8 ------------------------------------------------------------------
def test_a_file_name_that_is_not_utf8_is_indexed_listed_searched_and_served(small, tmp_path, synth_dir):
    """Issue 31 item 8: a Latin-1 `café.png` crashed `index` on every run and its batch was never indexed.
    It is now stored byte for byte, indexed like any other file, shown readably (U+FFFD) in the CLI and in
    valid JSON (with its exact bytes in path_b64), and served by id."""
    from fastapi.testclient import TestClient

    from mmsearch.serve import create_app

    photos = _photos(tmp_path / "photos", synth_dir, 300, 3)
    raw_dir = os.fsencode(str(photos))
    shutil.copy(synth_dir / "images" / sorted(os.listdir(synth_dir / "images"))[310], raw_dir + b"/" + ODD)
    with open(raw_dir + b"/bad\xff.jpg", "wb") as fh:
        fh.write(b"not a jpeg")
    odd, bad = os.fsdecode(raw_dir + b"/" + ODD), os.fsdecode(raw_dir + b"/bad\xff.jpg")
    idx = tmp_path / "idx"
    s = index_folders(idx, [photos], spec=TINY, batch_size=2)
    assert (s.added, s.failed) == (4, 1)
    cat = IndexStore.open(idx).catalog
    assert odd in cat.image_states() and bad in cat.failure_reasons()
    stored = cat.conn.execute("SELECT CAST(path AS BLOB) FROM images WHERE id=?", (cat.id_for_path(odd),)).fetchone()
    assert stored[0] == raw_dir + b"/" + ODD  # the file system's own bytes
    again = index_folders(idx, [photos])  # unchanged: nothing re-embedded, the failure not repeated
    assert (again.embedded, again.unchanged, again.failed, again.failures) == (0, 4, 1, [])
    assert _consistent(idx) == 4

    r = CliRunner()
    shown = r.invoke(cli, ["errors", "--index", str(idx)])
    assert shown.exit_code == 0 and shown.output.startswith(f"{photos}/bad\ufffd.jpg\t")
    rows = [json.loads(line) for line in r.invoke(cli, ["errors", "--index", str(idx), "--json"]).output.splitlines()]
    assert rows[0]["path"] == f"{photos}/bad\ufffd.jpg" and base64.b64decode(rows[0]["path_b64"]) == raw_dir + b"/bad\xff.jpg"
    res = r.invoke(cli, ["search", "a red circle", "--index", str(idx), "--json"])
    assert res.exit_code == 0, res.output
    hits = [json.loads(line) for line in res.output.splitlines()]
    mine = [h for h in hits if "path_b64" in h]
    assert len(hits) == 4 and len(mine) == 1
    assert mine[0]["path"] == f"{photos}/caf\ufffd.png" and base64.b64decode(mine[0]["path_b64"]) == raw_dir + b"/" + ODD
    table = r.invoke(cli, ["search", "a red circle", "--index", str(idx)])
    assert f"{photos}/caf\ufffd.png" in table.output
    paths = r.invoke(cli, ["search", "a red circle", "--index", str(idx), "--paths"])
    assert raw_dir + b"/" + ODD + b"\n" in paths.stdout_bytes  # pipes get the name a shell can open

    with TestClient(create_app(idx, warm=False), base_url="http://127.0.0.1") as client:
        got = client.get("/api/search", params={"q": "a red circle"})
        assert got.status_code == 200
        hit = next(h for h in json.loads(got.content.decode("utf-8"))["hits"] if h["name"] == "caf\ufffd.png")
        assert client.get(f"/api/images/{hit['id']}").json()["path_b64"] == mine[0]["path_b64"]
        file = client.get(f"/api/images/{hit['id']}/file")
        assert file.status_code == 200 and file.content == Path(odd).read_bytes()
        assert client.get(f"/api/images/{hit['id']}/thumb").status_code == 200


# ---- 9: non-finite vectors ------------------------------------------------------------------------
def test_import_refuses_a_nan_embedding_naming_the_row_and_changes_nothing(small, tmp_path):
    """Issue 31 item 9: `mmsearch import` accepted NaN embeddings (then a filtered search was a 500 and
    --json printed NaN). Refused now, in one line naming the shard's row and its image, before any write."""
    from mmsearch.storage.exchange import export_embeddings

    idx = _copy(small, tmp_path / "idx")
    export_embeddings(IndexStore.open(idx), tmp_path / "emb")
    shard = tmp_path / "emb" / "img_emb" / "img_emb_0.npy"
    emb = np.load(shard)
    emb[7, 3] = np.nan
    np.save(shard, emb)
    target = _copy(small, tmp_path / "target")
    before = IndexStore.open(target).catalog
    state = (before.count_images(), before.generation())
    res = CliRunner().invoke(cli, ["import", str(tmp_path / "emb"), "--index", str(target)])
    assert res.exit_code == 1 and not isinstance(res.exception, ValueError)
    message = res.output.strip()
    assert "\n" not in message and f"{shard} row 7 (" in message and "NaN or infinity" in message
    after = IndexStore.open(target).catalog
    assert (after.count_images(), after.generation()) == state


def test_every_door_for_vectors_refuses_non_finite_ones(small, tmp_path, monkeypatch, synth_dir):
    """Issue 31 item 9: the catalog's inserts, query weights, and query or upload image embeddings share
    one finite check; indexing turns a NaN embedding into a failure row instead of storing it."""
    from fastapi.testclient import TestClient

    from mmsearch.search.query import Searcher, parse_query
    from mmsearch.serve import create_app
    from mmsearch.towers.choice import TowerChoice

    idx = _copy(small, tmp_path / "idx")
    store = IndexStore.open(idx)
    cat = store.catalog
    bad = np.ones((2, store.dim), np.float32)
    bad[1, 0] = np.inf
    with pytest.raises(NonFiniteVectorError, match="/x/b.png: the embedding holds NaN or infinity"):
        cat.upsert_images([dict(path="/x/a.png", size=1, mtime_ns=1), dict(path="/x/b.png", size=1, mtime_ns=1)], bad)
    with pytest.raises(NonFiniteVectorError):
        cat.insert_image(dict(path="/x/c.png", size=1, mtime_ns=1, ext=".png"), bad[1])
    with pytest.raises(NonFiniteVectorError, match="text 'nan text'"):
        cat.insert_text("nan text", np.full(store.dim, np.nan, np.float32))
    assert cat.id_for_path("/x/a.png") is None and cat.count_images() == 12
    with pytest.raises(QueryError, match="weight of term 'red'"):
        parse_query("9" * 400 + ":red")  # a weight that overflows to infinity
    with pytest.raises(QueryError, match="weights overflow"):
        Searcher(store).search("1" + "0" * 300 + ":red")  # finite as a float64 weight, infinite in float32

    class NanTower:
        image_size = 32

        def encode_images(self, images, token_grid=None):
            return np.full((len(images), store.dim), np.nan, np.float32)
    monkeypatch.setattr(TowerChoice, "image_embedder", lambda self: NanTower())
    query_image = shutil.copy(next(small[1].iterdir()), tmp_path / "q.png")  # not in the index: embedded
    with pytest.raises(QueryError, match="the embedding of image q.png"):
        Searcher(store).search(images=[str(query_image)])
    with TestClient(create_app(idx, warm=False), base_url="http://127.0.0.1") as client:
        res = client.post("/api/search", files={"image": ("q.png", Path(query_image).read_bytes(), "image/png")})
        assert res.status_code == 400 and "NaN or infinity" in res.json()["error"]

    # indexing: the image whose embedding is NaN becomes a failure; the rest of its batch is indexed
    real = TowerChoice.image_encoder

    def poisoned(self, *a, **k):
        enc = real(self, *a, **k)
        encode = enc.encode_image_tensor

        def first_is_nan(pixels, token_grid=None):
            out = np.array(encode(pixels, token_grid=token_grid), dtype=np.float32)
            out[0] = np.nan
            return out
        monkeypatch.setattr(enc, "encode_image_tensor", first_is_nan)
        return enc
    monkeypatch.setattr(TowerChoice, "image_encoder", poisoned)
    more = _photos(tmp_path / "more", synth_dir, 400, 3)
    s = index_folders(idx, [more], batch_size=8)
    assert (s.added, s.failed) == (2, 1) and "non-finite embedding" in s.failures[0][1]
    assert _consistent(idx) == 14


# ---- 10: a damaged catalog ------------------------------------------------------------------------
def _zero_table_root(catalog: Path, table: str = "images") -> None:
    """Zero the root page of `table` in the file (after checkpointing the WAL into it)."""
    conn = sqlite3.connect(catalog)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root, = conn.execute("SELECT rootpage FROM sqlite_master WHERE name=?", (table,)).fetchone()
    page, = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with open(catalog, "r+b") as fh:
        fh.seek((root - 1) * page)
        fh.write(b"\0" * page)


def test_a_damaged_catalog_is_one_line_saying_what_to_do_and_writers_refuse_it(small, tmp_path):
    """Issue 31 item 10: a zeroed page gave a raw traceback from `search` while `index` said all was fine.
    Reads now raise CatalogCorruptError (one line: restore, re-index, export), and every writer checks
    the catalog's integrity when it takes the index, refusing to write to a damaged one."""
    idx = _copy(small, tmp_path / "idx")
    _zero_table_root(idx / "catalog.db")
    r = CliRunner()
    for args in (["search", "a red circle"], ["index", str(small[1])], ["texts", "add", str(tmp_path / "t.txt")]):
        (tmp_path / "t.txt").write_text("one more caption\n")
        res = r.invoke(cli, [*args, "--index", str(idx)])
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (args, res.exception)
        message = res.output.strip()
        assert message.startswith(f"Error: catalog {idx / 'catalog.db'} is damaged (") and "\n" not in message
        assert "restore the index folder from a backup, or re-index into a new folder" in message
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "catalog.db").write_bytes(b"not sqlite at all" * 100)
    res = r.invoke(cli, ["info", "--index", str(tmp_path / "junk")])
    assert res.exit_code == 1 and "is damaged (file is not a database)" in res.output


# ---- 11: a read-only index ------------------------------------------------------------------------
def _in_child_as_another_user(fn, timeout=240):
    """Run fn() in a forked child that cannot write the index: as root (who may write anything) the child
    drops to `nobody` first, so the kernel refuses writes exactly as it does for a user without write
    permission; SQLite's own open() calls see real EACCES. The child inherits every loaded module (it is a
    fork, no exec: /root's interpreter need not be readable by nobody). Returns fn's JSON-able result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        try:
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            import faiss

            faiss.omp_set_num_threads(1)  # no OpenMP pool in a forked child
            out = {"ok": fn()}
        except BaseException as exc:  # reported to the parent, which fails the test
            out = {"error": f"{type(exc).__name__}: {exc}"}
        os.write(write, json.dumps(out).encode())
        os._exit(0)
    os.close(write)
    deadline, data = time.time() + timeout, b""
    try:
        while True:  # read until the child closes its end (it exits), or give up
            ready, _, _ = select.select([read], [], [], 0.5)
            if ready:
                chunk = os.read(read, 1 << 16)
                if not chunk:
                    break
                data += chunk
            elif time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError("the read-only child did not finish")
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    out = json.loads(data)
    assert "ok" in out, out["error"]
    return out["ok"]


def _make_read_only(idx: Path) -> Path:
    (idx / "vectors.faiss").unlink()  # also rebuilt from the catalog in memory, since it cannot be saved
    for d, dirs, files in os.walk(idx):
        for f in files:
            os.chmod(os.path.join(d, f), 0o444)
    for d, dirs, files in os.walk(idx, topdown=False):
        os.chmod(d, 0o555)
    return idx


def test_a_read_only_index_can_be_searched_and_served_and_writers_say_it_is_read_only(small, tmp_path, synth_dir):
    """Issue 31 item 11: a read-only index folder (a NAS copy, a CD: WAL's -shm cannot be made) was "not an
    mmsearch catalog". Searching it (CLI, API, server) works now; every writer says it is read-only."""
    from fastapi.testclient import TestClient

    from mmsearch.serve import create_app

    base = Path(tempfile.mkdtemp(prefix="mmsearch-ro-"))  # outside pytest's private tmp: another user can enter
    try:
        os.chmod(base, 0o755)
        photos = shutil.copytree(small[1], base / "photos")  # a folder `nobody` can read
        index_folders(base / "idx", [photos], spec=TINY)
        add_texts(IndexStore.open(base / "idx"), _captions(synth_dir, 20))
        texts = base / "more.txt"
        texts.write_text("a new caption\n")
        os.chmod(texts, 0o644)
        out = base / "out"
        out.mkdir(mode=0o777)
        os.chmod(out, 0o777)  # where the child may write an export
        warm = shutil.copytree(base / "idx", tmp_path / "warm")
        (warm / "vectors.faiss").unlink()

        def search_and_serve(index):
            r = CliRunner()
            found = r.invoke(cli, ["search", "a red circle", "--index", str(index), "--json", "-k", "50"])
            under = r.invoke(cli, ["search", "a red circle", "--index", str(index), "--json", "--under", str(photos),
                                   "--ext", "png"])
            texts_found = r.invoke(cli, ["search", "--texts", "--index", str(index), "--json", "-k", "50",
                                         "--image", str(next(photos.iterdir()))])
            info = r.invoke(cli, ["info", "--index", str(index), "--json"])
            others = [r.invoke(cli, [*args, "--index", str(index)]) for args in
                      (["errors"], ["dupes"], ["export", str(out / index.name)])]
            with TestClient(create_app(index, warm=False), base_url="http://127.0.0.1") as client:
                api = client.get("/api/search", params={"q": "a red circle", "k": 50})
                hit = api.json()["hits"][0]["id"] if api.status_code == 200 else None
                thumb = client.get(f"/api/images/{hit}/thumb").status_code if hit else None
            writers = [r.invoke(cli, [*args, "--index", str(index)]).output.strip() for args in
                       (["texts", "add", str(texts)], ["index", str(photos)], ["reindex", "--factory", "Flat"],
                        ["rerank", "disable"])]
            return {"search": (found.exit_code, len(found.output.splitlines()), found.output[-300:]),
                    "under": (under.exit_code, len(under.output.splitlines())),
                    "texts": (texts_found.exit_code, len(texts_found.output.splitlines())),
                    "info": (info.exit_code, json.loads(info.output)["images"] if info.exit_code == 0 else info.output),
                    "others": [(o.exit_code, o.output[-200:]) for o in others],
                    "api": (api.status_code, len(api.json().get("hits", []))), "thumb": thumb, "writers": writers}

        search_and_serve(warm)  # in this process first: every module the child needs is loaded before the fork
        idx = _make_read_only(base / "idx")
        got = _in_child_as_another_user(lambda: search_and_serve(idx))
        assert got["search"][:2] == [0, 12], got["search"]
        assert got["under"] == [0, 10] and got["texts"] == [0, 20] and got["info"] == [0, 12]
        assert got["api"] == [200, 12] and got["thumb"] == 200
        assert [code for code, _ in got["others"]] == [0, 0, 0], got["others"]
        assert got["others"][2][1].startswith("exported 12 embeddings")
        for message in got["writers"]:
            assert message == (f"Error: index {idx} is read-only (no write permission on the folder or its catalog, "
                               f"or a read-only disk): it can be searched and served, not changed; copy it to a "
                               f"writable folder to update it"), got["writers"]
        assert not (idx / "catalog.db-shm").exists() and not (idx / "vectors.faiss").exists()
    finally:
        for d, dirs, files in os.walk(base):
            os.chmod(d, 0o755)
        shutil.rmtree(base, ignore_errors=True)


# ---- 15: captions added while a server runs -------------------------------------------------------
def test_texts_added_while_the_server_runs_are_searched_and_saved_under_their_generation(small, tmp_path):
    """Issue 31 item 15: captions added with `mmsearch texts add` while the server ran were not searched
    until a restart, and the server saved its text index under a stale generation. The text vectors now
    follow the catalog's text generation on every query, as the image vectors do."""
    from fastapi.testclient import TestClient

    from mmsearch.serve import create_app

    idx = _copy(small, tmp_path / "idx")
    with TestClient(create_app(idx, warm=False), base_url="http://127.0.0.1") as client:
        before = client.get("/api/images/1/texts", params={"k": 50}).json()
        assert before["corpus"] == 20 and len(before["texts"]) == 20
        res = CliRunner().invoke(cli, ["texts", "add", str(_write(tmp_path / "new.txt", "a zebra on a tricycle\n")),
                                       "--index", str(idx)])
        assert res.exit_code == 0, res.output
        after = client.get("/api/images/1/texts", params={"k": 50}).json()
        assert after["corpus"] == 21 and "a zebra on a tricycle" in {t["text"] for t in after["texts"]}
    side = VectorIndex.sidecar(idx / "texts.faiss")
    gen = IndexStore.open(idx).catalog.text_generation()
    assert (side["generation"], side["ntotal"]) == (gen, 21)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
