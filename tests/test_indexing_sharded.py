"""Issue 30, shards: a stable rule on the path, `shard split` without re-embedding, indexing straight into
a sharded layout with the one pipeline, and a shard map that refuses another model's shard or a missing one."""
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from helpers import mixture_vectors, synthetic_store
from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.errors import ModelMismatchError, ShardMapError
from mmsearch.indexing.pipeline import index_folders
from mmsearch.indexing.sharded import index_sharded, layout_info, split_index
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.shardmap import ShardMap, global_id, shard_of, split_id
from mmsearch.storage.store import IndexStore


def test_the_rule_is_a_hash_of_the_normalised_path():
    """The rule, against a naive reference: blake2b (8 bytes, big-endian) of the normalised path, mod n."""
    for path in ("/photos/a.jpg", "/photos/sub/../b.png", "/p/ünïcode é.jpg", "/x//y/./z.heic"):
        want = int(hashlib.blake2b(os.path.normpath(path).encode(), digest_size=8).hexdigest(), 16) % 7
        assert shard_of(path, 7) == want
    assert shard_of("/photos/sub/../b.png", 5) == shard_of("/photos/b.png", 5)
    counts = np.bincount([shard_of(f"/img/{i:06d}.jpg", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900  # spread evenly: 1000 each, give or take sampling noise
    for gid in (0, 1, 7, 12345):  # global ids name their owner
        s, local = split_id(gid, 4)
        assert global_id(local, s, 4) == gid and 0 <= s < 4


@pytest.fixture
def source(tmp_path):
    _, vecs = mixture_vectors(600)
    store = synthetic_store(tmp_path, vecs)
    with store.catalog.transaction():
        store.catalog.insert_text("a caption", vecs[0])
        store.catalog.record_failure("/img/a/broken.jpg", 3, 4, "cannot decode")
        store.catalog.set_tokens(5, np.ones((2, 3), np.float16))
    return store, vecs


def test_split_copies_every_row_to_its_shard_without_reembedding(source, tmp_path):
    store, vecs = source
    res = split_index(store.dir, 3, tmp_path / "shards")
    assert res["shards"] == 3 and sum(res["images"]) == 600 and min(res["images"]) > 150
    smap = ShardMap.load(tmp_path / "shards")
    assert smap.names == ["shard-0", "shard-1", "shard-2"] and smap.version == 1
    assert smap.record["fingerprint"] == "synthetic" and smap.record["dim"] == vecs.shape[1]
    src = {r[0]: r[1:] for r in store.catalog.conn.execute("SELECT path, id, embedding, tokens FROM images")}
    seen = {}
    for i, name in enumerate(smap.names):
        shard = IndexStore.open(smap.folder(name))
        rows = shard.catalog.conn.execute("SELECT path, id, embedding, tokens FROM images").fetchall()
        for path, *rest in rows:
            assert shard_of(path, 3) == i and path not in seen  # in the shard it routes to, and only there
            seen[path] = tuple(rest)
        assert shard.image_vectors().ntotal == len(rows) == res["images"][i]  # vectors built from its catalog
        assert shard.catalog.count_texts() == 1  # every shard keeps the text corpus
        assert [f["path"] for f in shard.catalog.failures()] == (["/img/a/broken.jpg"] if shard_of(
            "/img/a/broken.jpg", 3) == i else [])
    assert seen == src  # same ids, byte-identical embeddings and tokens
    with pytest.raises(ShardMapError, match="not empty"):
        split_index(store.dir, 2, tmp_path / "shards")


def test_a_shard_of_another_model_or_a_missing_shard_is_refused(source, tmp_path):
    store, _ = source
    split_index(store.dir, 3, tmp_path / "shards")
    smap = ShardMap.load(tmp_path / "shards")
    assert set(smap.check()) == {"shard-0", "shard-1", "shard-2"}
    other = Catalog.open(smap.folder("shard-1"))
    with other.transaction():
        other.set_meta(fingerprint="other-weights")
    other.close()
    with pytest.raises(ModelMismatchError, match="shard-1 .* was built with .*other-weights"):
        smap.check()
    with pytest.raises(ShardMapError, match="other-weights"):
        smap.swap("shard-0", smap.folder("shard-1"))  # a swap checks the replacement the same way
    shutil.rmtree(smap.folder("shard-2"))
    with pytest.raises(ShardMapError, match="shard-2: no index at .* missing"):
        smap.check_shard("shard-2")
    (tmp_path / "shards" / "shards.json").write_text("{not json")
    with pytest.raises(ShardMapError, match="not an mmsearch shard map"):
        ShardMap.load(tmp_path / "shards")


def test_swap_points_a_shard_at_a_copy_and_bumps_the_version(source, tmp_path):
    store, _ = source
    split_index(store.dir, 2, tmp_path / "shards")
    smap = ShardMap.load(tmp_path / "shards")
    shutil.copytree(smap.folder("shard-1"), tmp_path / "shard-1-v2")
    assert smap.swap("shard-1", tmp_path / "shard-1-v2") == 2
    again = ShardMap.load(tmp_path / "shards")
    assert again.version == 2 and again.folder("shard-1") == (tmp_path / "shard-1-v2").resolve()
    assert json.loads((tmp_path / "shards" / "shards.json").read_text())["shards"][0]["folder"] == "shard-0"


def test_cli_split_and_info(source, tmp_path):
    store, _ = source
    out = tmp_path / "cli-shards"
    res = CliRunner().invoke(cli, ["shard", "split", "--index", str(store.dir), "--shards", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("split 600 images into 2 shards in ")
    res = CliRunner().invoke(cli, ["shard", "info", str(out), "--json"])
    data = json.loads(res.output)
    assert data["images"] == 600 and [s["name"] for s in data["shards"]] == ["shard-0", "shard-1"]
    assert all(s["vectors"] == s["images"] for s in data["shards"])
    res = CliRunner().invoke(cli, ["shard", "info", str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and "no shard map at" in res.output


def _photos(synth_dir, dest, n):
    dest.mkdir(parents=True)
    for p in sorted((synth_dir / "images").glob("*.png"))[:n]:
        shutil.copy(p, dest / p.name)
    return dest


def test_indexing_into_shards_gives_the_single_index_split_by_the_rule(tiny_checkpoint, synth_dir, tmp_path):
    photos = _photos(synth_dir, tmp_path / "photos", 30)
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    spec = ModelSpec(checkpoint=str(tiny_checkpoint))
    single = index_folders(tmp_path / "single", [photos], spec=spec, precision="fp32")
    s = index_sharded(tmp_path / "sh", [photos], count=3, spec=spec, precision="fp32")
    assert (s.added, s.failed, s.created) == (single.added, single.failed, True) == (30, 1, True)
    ref = IndexStore.open(tmp_path / "single")
    want = {p: e for p, e in zip(*_by_path(ref))}
    smap = ShardMap.load(tmp_path / "sh")
    got = {}
    for i, name in enumerate(smap.names):
        shard = IndexStore.open(smap.folder(name))
        for p, e in zip(*_by_path(shard)):
            assert shard_of(p, 3) == i
            got[p] = e
        assert shard.image_vectors().ntotal == shard.catalog.count_images()
        assert (smap.folder(name) / "text_tower").is_dir()  # every shard answers text queries without torch
        broken = [f["path"] for f in shard.catalog.failures()]
        assert broken == ([str(photos / "broken.jpg")] if shard_of(str(photos / "broken.jpg"), 3) == i else [])
    assert sorted(got) == sorted(want)
    for p in want:
        np.testing.assert_allclose(got[p], want[p], atol=1e-5)
    again = index_sharded(tmp_path / "sh", [photos])  # the map's model: nothing to give
    assert (again.embedded, again.unchanged) == (0, 30)
    gone = sorted(photos.glob("*.png"))[0]
    moved = photos / "renamed" / "moved.png"
    moved.parent.mkdir()
    shutil.move(sorted(photos.glob("*.png"))[1], moved)
    gone.unlink()
    third = index_sharded(tmp_path / "sh", [photos])
    same = shard_of(str(moved), 3) == shard_of(str(sorted(want)[1]), 3)
    # a move that stays on its shard keeps its embedding; one that changes shard is a delete + an add
    assert (third.moved, third.added, third.removed) == ((1, 0, 1) if same else (0, 1, 2))
    assert layout_info(tmp_path / "sh")["images"] == 29
    with pytest.raises(ShardMapError, match="has 3 shards, not 2"):
        index_sharded(tmp_path / "sh", [photos], count=2)
    with pytest.raises(ModelMismatchError, match="not ViT-B-32"):
        index_sharded(tmp_path / "sh", [photos], spec=ModelSpec(model="ViT-B-32", pretrained=None))
    res = CliRunner().invoke(cli, ["index", str(photos), "--shards", str(tmp_path / "sh"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["unchanged"] == 29


def _by_path(store):
    rows = dict(store.catalog.conn.execute("SELECT id, path FROM images"))
    ids, emb = store.catalog.embeddings(store.dim)
    return [rows[int(i)] for i in ids], emb
