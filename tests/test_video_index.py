"""Issue 29, videos indexed beside photos: shots as catalog rows through the one plan -> decode -> encode ->
commit; moments in search (text, image, filters, grouping, the CLI's table and --json, the re-ranker); the
incremental rules (unchanged re-runs decode nothing, renames reuse vectors, deleted videos leave, broken ones are
error rows); without PyAV one notice; an index of schema 1 migrates."""
import csv
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmsearch import video
from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.datasets.synthvideo import Segment, write_audio_only, write_video
from mmsearch.indexing import pipeline
from mmsearch.indexing.pipeline import index_folders
from mmsearch.search.query import Searcher
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.store import IndexStore

from helpers import untrained_reranker

STEP = video.SAMPLE_STEP_S


def distinct_scenes(synth_dir, n=3):
    """n one-object pictures of the synthetic set, each of its own colour on its own background (what the tiny
    model tells apart; swapped pairs it cannot, and that is the re-ranker's job, not this test's)."""
    picked, colours, bgs = [], set(), set()
    with open(synth_dir / "captions.csv") as fh:
        for r in csv.DictReader(fh):
            words = r["caption"].split()
            if words[1] != "large" or " on " not in r["caption"]:
                continue
            colour, bg = words[2], r["caption"].rsplit(" on ", 1)[1].split()[1]
            if colour in colours or bg in bgs or any(p == r["image"] for p, _ in picked):
                continue
            picked.append((r["image"], r["caption"]))
            colours.add(colour)
            bgs.add(bg)
            if len(picked) == n:
                return [(synth_dir / p, c) for p, c in picked]
    raise AssertionError("the synthetic set has too few distinct scenes")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, synth_dir):
    """photos/: 8 PNGs, clip.mp4 (black intro + three scenes, cuts between keyframes), and three bad videos."""
    root = tmp_path_factory.mktemp("videos")
    photos = root / "photos"
    photos.mkdir()
    scenes = distinct_scenes(synth_dir)
    used = {p.name for p, _ in scenes}
    for name in [n for n in sorted((synth_dir / "images").iterdir()) if n.name not in used][:8]:
        shutil.copy(name, photos / name.name)
    segs = [Segment(1.0, (0, 0, 0))] + [Segment(3.3, Image.open(p).convert("RGB"), caption=c, moving_dot=True)
                                        for p, c in scenes]
    info = write_video(photos / "clip.mp4", segs, size=(128, 128), creation_time="2021-06-05T10:00:00Z")
    data = (photos / "clip.mp4").read_bytes()
    (photos / "truncated.mp4").write_bytes(data[: len(data) // 3])
    write_audio_only(photos / "voice.mp4")
    (photos / "notes.mkv").write_text("not a video")
    return root, photos, info


@pytest.fixture(scope="module")
def indexed(folder, tiny_checkpoint):
    root, photos, info = folder
    idx = root / "idx"
    summary = index_folders(idx, [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None,
                                                          checkpoint=str(tiny_checkpoint)))
    return idx, summary


def scene_of(info, t):
    return next(n for n, (s, e, c) in enumerate(info["scenes"]) if s <= t < e)


def test_videos_index_beside_photos_with_error_rows(indexed, folder):
    idx, summary = indexed
    _, photos, info = folder
    assert (summary.added, summary.videos, summary.shots) == (9, 1, 3)
    reasons = dict(summary.failures)
    assert "truncated" in reasons[str(photos / "truncated.mp4")]
    assert "no video stream" in reasons[str(photos / "voice.mp4")]
    assert "not a video" in reasons[str(photos / "notes.mkv")]
    store = IndexStore.open(idx)
    assert store.catalog.count_videos() == (1, 3) and store.catalog.count_images() == 11
    assert store.image_vectors().ntotal == 11  # FAISS ids are catalog ids, one per shot
    vid = store.catalog.id_for_path(str(photos / "clip.mp4"))
    rows = store.catalog.rows(store.catalog.video_rows([vid]))
    assert {r["path"] for r in rows.values()} == {str(photos / "clip.mp4")}
    assert {r["taken_at"] for r in rows.values()} == {1622887200.0}  # the container's creation_time
    for r, (start, end, _) in zip(sorted(rows.values(), key=lambda r: r["start_s"]), info["scenes"][1:]):
        assert start <= r["start_s"] <= start + STEP + 1e-6 and start <= r["frame_s"] < end


def test_a_caption_finds_the_moment_in_its_scene(indexed, folder, synth_dir):
    """The query for a scene's caption returns the video first, its best moment inside that scene; the scene's
    picture as a query image finds the same moment."""
    idx, _ = indexed
    _, photos, info = folder
    searcher = Searcher(IndexStore.open(idx))
    pictures = [p for p, _ in distinct_scenes(synth_dir)]
    for n, (start, end, caption) in enumerate(info["scenes"][1:], start=1):
        hits = searcher.search(caption, k=5)
        top = hits[0]
        assert top.path == str(photos / "clip.mp4") and top.kind == "video", [h.path for h in hits]
        assert scene_of(info, top.frame_s) == n and top.start_s <= top.frame_s < top.end_s
        assert [h.path for h in hits].count(top.path) == 1  # grouped: one hit per video
        assert top.moments[0]["id"] == top.id and top.moments[0]["start_s"] == top.start_s
        by_image = searcher.search(images=[str(pictures[n - 1])], k=3)[0]
        assert by_image.path == top.path and scene_of(info, by_image.frame_s) == n


def test_grouping_filters_and_json(indexed, folder):
    idx, _ = indexed
    _, photos, info = folder
    searcher = Searcher(IndexStore.open(idx))
    caption = info["scenes"][2][2]
    flat = searcher.search(caption, k=20, group=False)
    assert sum(h.path == str(photos / "clip.mp4") for h in flat) == 3  # every shot, ungrouped
    grouped = searcher.search(caption, k=20)
    assert len(grouped) == len(flat) - 2
    only_videos = searcher.search(caption, k=20, exts=["mp4"])
    assert [h.kind for h in only_videos] == ["video"]
    assert all(h.kind == "image" for h in searcher.search(caption, k=20, exts=["png"]))
    assert searcher.search(caption, k=20, before="2021-06-01", exts=["mp4"]) == []  # its date is the container's
    # pages count hits: two pages of 3 are the first 6 hits
    assert [h.id for o in (0, 3) for h in searcher.search(caption, k=3, offset=o)] == [h.id for h in grouped[:6]]

    runner = CliRunner()
    res = runner.invoke(cli, ["search", caption, "--index", str(idx), "-k", "3", "--json"])
    assert res.exit_code == 0, res.output
    top = json.loads(res.output.splitlines()[0])
    assert top["kind"] == "video" and top["path"] == str(photos / "clip.mp4")
    assert {"video_id", "start_s", "end_s", "frame_s", "duration_s", "moments"} <= set(top)
    assert scene_of(info, top["frame_s"]) == 2
    table = runner.invoke(cli, ["search", caption, "--index", str(idx), "-k", "3"])
    start = int(top["start_s"])
    assert f"{photos / 'clip.mp4'} @ 00:{start:02d}" in table.output


def test_reranker_tokens_of_shots(indexed, tmp_path, tiny_checkpoint):
    """A re-ranker (random weights: the plumbing is under test) back-fills each shot's tokens from its frame,
    which are the tokens the indexer stores for it, and re-ranks video moments like photos."""
    from mmsearch.indexing.backfill import enable_reranker

    idx = tmp_path / "idx"
    shutil.copytree(indexed[0], idx)
    untrained_reranker(idx, tmp_path / "rr.pt")
    res = enable_reranker(idx, tmp_path / "rr.pt")
    assert res["failed"] == 0 and res["images"] == 11
    store = IndexStore.open(idx)
    shot_ids = store.catalog.video_rows([store.catalog.id_for_path(str(indexed[0].parent / "photos" / "clip.mp4"))])
    filled = store.catalog.tokens(shot_ids, store.token_shape())
    # index the video again with the re-ranker on: the indexer's tokens equal the back-filled ones
    again = tmp_path / "again"
    index_folders(again, [indexed[0].parent / "photos" / "clip.mp4"], reranker=str(tmp_path / "rr.pt"),
                  spec=ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint)))
    s2 = IndexStore.open(again)
    fresh = s2.catalog.tokens(s2.catalog.video_rows([1]), s2.token_shape())
    a = np.stack([filled[i] for i in sorted(filled)]).astype(np.float32)
    b = np.stack([fresh[i] for i in sorted(fresh)]).astype(np.float32)
    assert a.shape == b.shape and np.abs(a - b).max() < 0.05
    hits = Searcher(store).search("a large red circle", k=5)
    assert all(h.itm is not None for h in hits) and any(h.kind == "video" for h in hits)


def test_incremental_rules(folder, tiny_checkpoint, tmp_path, monkeypatch):
    """Unchanged re-runs decode nothing; a rename reuses the shots' vectors; a changed video is re-cut; a
    deleted one leaves with all its shots; the vector index always matches the catalog."""
    _, photos, info = folder
    work = tmp_path / "photos"
    shutil.copytree(photos, work)
    idx = tmp_path / "idx"
    spec = ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint))
    index_folders(idx, [work], spec=spec)
    store = IndexStore.open(idx)
    vid = store.catalog.id_for_path(str(work / "clip.mp4"))
    ids = sorted(store.catalog.video_rows([vid]))
    emb = store.catalog.embeddings(store.dim, ids)[1]

    def no_decode(*a, **k):
        raise AssertionError("decoded a video on an unchanged re-run")

    with monkeypatch.context() as m:
        m.setattr(video, "read_shots", no_decode)
        again = index_folders(idx, [work])
        assert (again.embedded, again.unchanged, again.failed) == (0, 9, 3)
        (work / "sub").mkdir()
        (work / "clip.mp4").rename(work / "sub" / "moved.mp4")
        moved = index_folders(idx, [work])
        assert (moved.moved, moved.embedded) == (1, 0)
    store = IndexStore.open(idx)
    assert sorted(store.catalog.video_rows([vid])) == ids
    assert {r["path"] for r in store.catalog.rows(ids).values()} == {str(work / "sub" / "moved.mp4")}
    assert np.array_equal(store.catalog.embeddings(store.dim, ids)[1], emb)
    hit = Searcher(store).search(info["scenes"][1][2], k=1)[0]
    assert hit.path == str(work / "sub" / "moved.mp4")

    # changed: two scenes now; the old shots are gone, the new ones are searchable
    write_video(work / "sub" / "moved.mp4", [Segment(2.3, (200, 30, 30)), Segment(2.3, (30, 60, 220))], size=(64, 64))
    changed = index_folders(idx, [work])
    assert (changed.updated, changed.shots) == (1, 2)
    store = IndexStore.open(idx)
    new_ids = store.catalog.video_rows([vid])
    assert len(new_ids) == 2 and vid in new_ids and not (set(new_ids) - {vid}) & set(ids)
    assert store.image_vectors().ntotal == store.catalog.count_images() == 10

    (work / "sub" / "moved.mp4").unlink()
    gone = index_folders(idx, [work])
    assert gone.removed == 1
    store = IndexStore.open(idx)
    assert store.catalog.count_videos() == (0, 0)
    assert store.image_vectors().ntotal == store.catalog.count_images() == 8


def test_without_pyav_videos_are_skipped_with_one_notice(folder, tiny_checkpoint, tmp_path, monkeypatch):
    _, photos, _ = folder
    monkeypatch.setattr(video, "_av_state", False)
    summary = index_folders(tmp_path / "idx", [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None,
                                                                       checkpoint=str(tiny_checkpoint)))
    assert summary.added == 8 and summary.failures == [] and summary.skipped_videos == 4
    assert len(summary.notes) == 1 and "mmsearch[video]" in summary.notes[0]
    res = CliRunner().invoke(cli, ["index", str(photos), "--index", str(tmp_path / "idx")])
    assert res.exit_code == 0 and res.output.count("video support is not installed") == 1


def test_a_schema_1_catalog_migrates(tmp_path):
    """An index written before videos: opened read-only (a server) it answers without video columns; opened
    for writing, the columns and indices are added in place."""
    cat = Catalog.create(tmp_path, {"dim": 4, "fingerprint": "x", "model": {"model": "x"}})
    with cat.transaction():
        cat.insert_image(dict(path="/p/a.jpg", size=1, mtime_ns=1, ext=".jpg"), np.ones(4, np.float32))
        cat.conn.executescript("DROP INDEX images_video; DROP INDEX images_shots;" + "".join(
            f"ALTER TABLE images DROP COLUMN {c};" for c in ("video_id", "start_s", "end_s", "frame_s", "duration_s")))
        cat.set_meta(schema_version=1)
    cat.close()
    ro = Catalog.open(tmp_path, readonly=True)
    assert not ro.has_video_columns() and ro.rows([1])[1]["path"] == "/p/a.jpg" and not ro.has_videos()
    ro.close()
    rw = Catalog.open(tmp_path)
    assert rw.has_video_columns() and rw.meta()["schema_version"] == 2 and rw.count_videos() == (0, 0)
    assert "video_id" not in rw.rows([1])[1]


def test_export_and_import_keep_the_shots(indexed, folder, tmp_path):
    """clip-retrieval's layout: a shot's image_path is its video, `shot` and the times beside it; importing
    the shards gives the same video rows back (times, links, vectors), and search finds the same moments."""
    from mmsearch.storage.exchange import export_embeddings, import_embeddings

    idx, _ = indexed
    _, photos, info = folder
    export_embeddings(IndexStore.open(idx), tmp_path / "out")
    import pyarrow.parquet as pq

    meta = pq.read_table(tmp_path / "out" / "metadata" / "metadata_0.parquet").to_pylist()
    shots = [m for m in meta if m["shot"] is not None]
    assert len(shots) == 3 and {m["image_path"] for m in shots} == {str(photos / "clip.mp4")}
    assert sorted(m["shot"] for m in shots) == [0, 1, 2]
    copy = tmp_path / "idx"
    shutil.copytree(idx, copy)
    store = IndexStore.open(copy)
    with store.catalog.transaction():
        store.catalog.delete_images(store.catalog.image_ids().tolist())
        store.catalog.bump_generation()
    import_embeddings(store, tmp_path / "out")
    back = IndexStore.open(copy)
    assert back.catalog.count_videos() == (1, 3) and back.catalog.count_images() == 11

    def moments(s):
        r = s.catalog.rows(s.catalog.video_rows([s.catalog.id_for_path(str(photos / "clip.mp4"))]))
        return sorted((v["start_s"], v["end_s"], v["frame_s"], v["duration_s"]) for v in r.values())

    assert moments(back) == moments(IndexStore.open(idx))
    caption = info["scenes"][3][2]
    a, b = Searcher(IndexStore.open(idx)).search(caption, k=3), Searcher(back).search(caption, k=3)
    assert [(h.path, h.start_s, h.frame_s) for h in a] == [(h.path, h.start_s, h.frame_s) for h in b]
