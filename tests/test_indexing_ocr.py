"""Issue 27 with the real OCR models (rapidocr's PP-OCR, shipped in its wheel): rows written with their
image, reused on an unchanged re-run, re-read on a change, removed with the file; a corrupt image, an
OCR failure and a detector that finds 10,000 boxes; search by words through the CLI and the library."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.indexing.pipeline import index_folders
from mmsearch.search.query import Searcher
from mmsearch.storage.store import IndexStore
from helpers import NOTO_CJK, need_ocr, render


def spec(checkpoint):
    return ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(checkpoint))


@pytest.fixture(scope="module")
def folder(tmp_path_factory, synth_dir):
    """A few small images with known words, three without, a corrupt one, one with typed EXIF keywords."""
    need_ocr()
    root = tmp_path_factory.mktemp("ocr") / "photos"
    (root / "screens").mkdir(parents=True)
    render(root / "screens" / "receipt.png", ["Invoice 2023 total", "Thank you"])
    render(root / "screens" / "sign.png", ["Harbour cafe", "Opening hours"])
    render(root / "cn.png", ["发票 金额"], font=NOTO_CJK)
    for n in sorted(os.listdir(synth_dir / "images"))[:3]:
        shutil.copy(synth_dir / "images" / n, root / n)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    exif = Image.Exif()
    exif[0x010E] = "Sunset over the lighthouse"  # ImageDescription
    exif[0x9C9E] = "holiday;brittany".encode("utf-16-le")  # XPKeywords
    exif[0x010F] = "Fujifilm"
    Image.new("RGB", (96, 64), (200, 120, 40)).save(root / "tagged.jpg", exif=exif.tobytes())
    return root


@pytest.fixture(scope="module")
def indexed(folder, tmp_path_factory, tiny_checkpoint):
    idx = tmp_path_factory.mktemp("ocr-idx") / "idx"
    summary = index_folders(idx, [folder], spec=spec(tiny_checkpoint))
    return idx, summary


def lines_by_name(idx):
    cat = IndexStore.open(idx, readonly=True).catalog
    rows = cat.conn.execute("SELECT i.path, l.text FROM ocr_lines l JOIN images i ON i.id = l.image_id").fetchall()
    out = {}
    for p, t in rows:
        out.setdefault(os.path.basename(p), []).append(t)
    return out


def test_ocr_rows_are_written_with_their_images(indexed):
    """Issue 27: OCR rows written (Latin and Chinese), metadata fields searchable, a corrupt file is a failure."""
    idx, summary = indexed
    assert summary.added == 7 and summary.failed == 1 and "corrupt.png" in summary.failures[0][0]
    assert summary.ocr_read == 7 and summary.ocr_text >= 3
    got = lines_by_name(idx)
    assert "Invoice 2023 total" in got["receipt.png"] and "Harbour cafe" in got["sign.png"]
    assert any("发票" in t for t in got["cn.png"])
    store = IndexStore.open(idx, readonly=True)
    assert store.meta["ocr"]["enabled"] and store.meta["ocr"]["reader"] == "rapidocr"
    meta = [json.loads(m) for (m,) in store.catalog.conn.execute(
        "SELECT meta_json FROM image_text WHERE meta_json IS NOT NULL")]
    assert {"description": "Sunset over the lighthouse", "keywords": ["holiday", "brittany"], "make": "Fujifilm"} in meta


def test_search_by_words(indexed, folder):
    """Issue 27: a word in one image finds it first; quoted phrases must appear; text-only hits; modes; offsets."""
    idx, _ = indexed
    s = Searcher(IndexStore.open(idx))
    top = s.search("invoice", k=3)
    assert top[0].path.endswith("receipt.png") and top[0].matches
    m = top[0].matches[0]
    assert m["field"] == "ocr" and m["text"][m["spans"][0][0]:m["spans"][0][1]].lower() == "invoice"
    assert [h.path for h in s.search('"invoice 2023"', k=5)] == [str(folder / "screens" / "receipt.png")]
    assert s.search('"2023 invoice"', k=5) == []  # the phrase in that order is in no image
    assert [os.path.basename(h.path) for h in s.search("cafe", k=5, mode="text")] == ["sign.png"]
    assert s.search("发票", k=1)[0].path.endswith("cn.png")
    assert s.search("lighthouse", k=1)[0].path.endswith("tagged.jpg")  # EXIF description
    assert s.search("brittany", k=1, mode="text")[0].path.endswith("tagged.jpg")  # XPKeywords
    dense = s.search("invoice", k=7, mode="dense")
    assert all(h.matches is None for h in dense) and len(dense) == 7
    assert [h.path for h in s.search("invoice", k=5, exts=["jpg"], mode="text")] == []  # filters: both sides
    assert [h.path for h in s.search("cafe", k=5, under=str(folder / "screens"))][0].endswith("sign.png")
    with pytest.raises(Exception, match="needs words"):
        s.search(None, images=[str(folder / "tagged.jpg")], mode="text")


def test_cli_json_text_command_and_errors(indexed, folder):
    idx, _ = indexed
    r = CliRunner().invoke(cli, ["search", '"invoice 2023"', "--index", str(idx), "--json"])
    assert r.exit_code == 0, r.output
    hit = json.loads(r.output.splitlines()[0])
    (m,) = [m for m in hit["matches"] if m["field"] == "ocr"]
    assert m["text"] == "Invoice 2023 total" and m["spans"] == [[0, 12]] and len(m["box"]) == 4
    r = CliRunner().invoke(cli, ["text", str(folder / "screens" / "sign.png"), "--index", str(idx)])
    assert r.exit_code == 0 and r.stdout.splitlines()[:2] == ["Harbour cafe", "Opening hours"], r.output
    assert "from the index" in r.stderr
    outside = render(folder.parent / "outside.png", ["Parking ticket"])
    r = CliRunner().invoke(cli, ["text", str(outside), "--index", str(idx), "--json"])
    res = json.loads(r.stdout)
    assert res["source"] == "ocr" and [ln["text"] for ln in res["lines"]] == ["Parking ticket"]
    r = CliRunner().invoke(cli, ["text", str(folder / "corrupt.png"), "--index", str(idx)])
    assert r.exit_code == 1 and "corrupt" in r.output.lower() and "Traceback" not in r.output


def test_unchanged_rerun_reads_nothing_changed_file_is_read_again_deleted_leaves(folder, tmp_path, tiny_checkpoint,
                                                                                    monkeypatch):
    """Issue 27: OCR rows re-used on an unchanged re-run, re-read on a changed file, removed with a deleted file;
    a moved file keeps what OCR read and its name words follow it."""
    from mmsearch.indexing.ocr import OcrEngine

    photos = tmp_path / "photos"
    shutil.copytree(folder, photos)
    idx = tmp_path / "idx"
    index_folders(idx, [photos], spec=spec(tiny_checkpoint))
    before = lines_by_name(idx)
    reads = []
    real = OcrEngine.read
    monkeypatch.setattr(OcrEngine, "read", lambda self, img, full=None: reads.append(img.size) or real(self, img, full))
    s = index_folders(idx, [photos])
    assert reads == [] and s.ocr_read == 0 and lines_by_name(idx) == before

    render(photos / "screens" / "receipt.png", ["Refund 2024 issued"], size=(480, 120))
    os.utime(photos / "screens" / "receipt.png", ns=(1, 10**18))  # a different mtime, whatever the clock
    (photos / "screens" / "sign.png").rename(photos / "harbour-sign.png")
    os.remove(photos / "cn.png")
    s = index_folders(idx, [photos])
    assert (s.updated, s.moved, s.removed, s.ocr_read) == (1, 1, 1, 1) and len(reads) == 1
    after = lines_by_name(idx)
    assert after["receipt.png"] == ["Refund 2024 issued"] and "cn.png" not in after
    assert after["harbour-sign.png"] == before["sign.png"]
    search = Searcher(IndexStore.open(idx))
    assert search.search("invoice", mode="text") == [] and search.search("发票", mode="text") == []
    assert search.search("refund", mode="text")[0].path.endswith("receipt.png")
    assert search.search("harbour", mode="text")[0].path.endswith("harbour-sign.png")
    cat = IndexStore.open(idx).catalog
    assert cat.conn.execute("SELECT count(*) FROM ocr_lines WHERE image_id NOT IN (SELECT id FROM images)").fetchone()[0] == 0
    cat.conn.execute("INSERT INTO image_text_fts(image_text_fts, rank) VALUES ('integrity-check', 1)")


def test_ocr_off_then_on_reads_only_the_unread(folder, tmp_path, tiny_checkpoint):
    """--no-ocr is recorded in the index; names and metadata are still searchable; --ocr later reads the images once."""
    photos = tmp_path / "p"
    photos.mkdir()
    shutil.copy(folder / "screens" / "receipt.png", photos / "receipt.png")
    shutil.copy(folder / "tagged.jpg", photos / "tagged.jpg")
    idx = tmp_path / "idx"
    s = index_folders(idx, [photos], spec=spec(tiny_checkpoint), ocr=False)
    assert s.ocr_read == 0 and IndexStore.open(idx).meta["ocr"]["enabled"] is False
    search = Searcher(IndexStore.open(idx))
    assert search.search("invoice", mode="text") == [] and search.search("lighthouse", mode="text")
    assert index_folders(idx, [photos]).ocr_read == 0  # the index's own setting: still off
    s = index_folders(idx, [photos], ocr=True)
    assert s.ocr_read == 2 and index_folders(idx, [photos]).ocr_read == 0
    assert Searcher(IndexStore.open(idx)).search("invoice", mode="text")[0].path.endswith("receipt.png")


def test_an_ocr_failure_is_an_error_row_not_a_stopped_run(folder, tmp_path, tiny_checkpoint, monkeypatch):
    from mmsearch.indexing.ocr import OcrEngine

    photos = tmp_path / "p"
    shutil.copytree(folder / "screens", photos)
    real = OcrEngine.read

    def flaky(self, img, full=None):
        if img.size == (480, 200) and getattr(flaky, "n", 0) == 0:
            flaky.n = 1
            raise RuntimeError("detector exploded")
        return real(self, img, full)

    monkeypatch.setattr(OcrEngine, "read", flaky)
    idx = tmp_path / "idx"
    s = index_folders(idx, [photos], spec=spec(tiny_checkpoint))
    assert s.added == 2 and s.failed == 0 and len(s.ocr_failures) == 1 and "detector exploded" in s.ocr_failures[0][1]
    r = CliRunner().invoke(cli, ["errors", "--index", str(idx)])
    assert "OCR failed (the image is indexed): RuntimeError: detector exploded" in r.output


def test_a_detector_that_finds_ten_thousand_boxes_is_bounded(monkeypatch):
    """Issue 27: an image that makes the detector find 10,000 boxes: at most max_boxes are recognised."""
    need_ocr()
    from mmsearch.indexing.ocr import DEFAULT_MAX_BOXES, shared_engine

    eng = shared_engine()
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 300, size=(10_000, 1, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + [[8, 0]], xy + [[8, 6]], xy + [[0, 6]]], axis=1)
    scores = rng.uniform(0.5, 1, size=10_000).tolist()
    monkeypatch.setattr(eng, "has_text", lambda bgr, side=None: True)
    monkeypatch.setattr(eng, "detect", lambda bgr: (boxes, scores))
    seen = []
    monkeypatch.setattr(eng, "recognize", lambda crops: seen.append(len(crops)) or [("x1", 0.9)] * len(crops))
    res = eng.read(Image.new("RGB", (320, 320), (255, 255, 255)))
    assert seen == [DEFAULT_MAX_BOXES] and len(res.lines) == DEFAULT_MAX_BOXES
    assert res.note == f"kept the {DEFAULT_MAX_BOXES} most confident of 10000 text boxes"
    kept_scores = sorted(scores, reverse=True)[:DEFAULT_MAX_BOXES]
    assert min(kept_scores) >= sorted(scores, reverse=True)[DEFAULT_MAX_BOXES]


def test_ocr_input_is_capped_and_plain_images_stop_at_the_gate(monkeypatch):
    need_ocr()
    from mmsearch.indexing import ocr

    eng = ocr.shared_engine()
    sizes = []
    real = eng.detect
    monkeypatch.setattr(eng, "detect", lambda bgr: sizes.append(bgr.shape[:2]) or real(bgr))
    res = eng.read(Image.new("RGB", (4000, 1000), (90, 140, 200)))  # a plain sky: no text
    assert res.gated and res.lines == [] and sizes == []
    monkeypatch.setattr(eng, "has_text", lambda bgr, side=None: True)
    eng.read(Image.new("RGB", (4000, 1000), (90, 140, 200)))
    assert max(sizes[0]) == ocr.DEFAULT_MAX_SIDE


def test_a_small_photo_is_gated_at_half_its_size():
    """The gate runs at about half the OCR input (256 to 640 px): a 500 x 375 photo at 256, a 1600 px input
    at 640; an input barely larger than the smallest gate is read whole."""
    need_ocr()
    from mmsearch.indexing import ocr

    eng = ocr.shared_engine()
    assert eng.gate_size(375, 500) == 256 and eng.gate_size(1200, 1600) == 640 and eng.gate_size(600, 800) == 416
    assert eng.gate_size(240, 320) == 256 > 0.75 * 320  # so read() skips the gate there


def test_a_big_jpeg_is_read_from_a_small_decode_unless_it_has_text(tmp_path, monkeypatch):
    """OCR of an indexed 12 MP JPEG decodes it once at 1/4 scale for the gate; only a photo with text is
    decoded again at OCR size, and what is read then equals reading that decode directly. The encoder's
    decode is the same with OCR on or off (the embedding never depends on OCR)."""
    need_ocr()
    from mmsearch import media
    from mmsearch.indexing import stage
    from mmsearch.indexing.extract import Extractor
    from mmsearch.indexing.ocr import DEFAULT_MAX_SIDE, GATE_DECODE_SIDE, shared_engine
    from mmsearch.indexing.scan import FileInfo

    plain, texty = tmp_path / "sky.jpg", tmp_path / "sign.jpg"
    Image.new("RGB", (4000, 3000), (90, 140, 200)).save(plain, quality=90)
    sign = Image.new("RGB", (4000, 3000), (250, 250, 250))
    render(tmp_path / "line.png", ["Harbour Station"], size=(2400, 400), font_size=200)
    sign.paste(Image.open(tmp_path / "line.png").convert("RGB"), (600, 1200))
    sign.save(texty, quality=90)
    decodes = []
    real_load = media.load_image
    monkeypatch.setattr(media, "load_image", lambda p, min_size=None, **kw: decodes.append(min_size) or
                        real_load(p, min_size=min_size, **kw))
    ex = Extractor(ocr=True)
    st = os.stat(plain)
    info = FileInfo(str(plain), st.st_size, st.st_mtime_ns)
    with_ocr = stage.decode_file(info, 64, lambda im: im.size, ex)
    assert with_ocr[0] == stage.decode_file(info, 64, lambda im: im.size, None)[0] == (500, 375)
    decodes.clear()
    assert ex(str(plain)).status == "none" and decodes == [GATE_DECODE_SIDE]
    decodes.clear()
    words = ex(str(texty))
    assert len(decodes) == 2 and decodes[0] == GATE_DECODE_SIDE
    assert "Harbour Station" in " ".join(t for t, _, _ in words.lines)
    direct = shared_engine().read(real_load(texty, min_size=decodes[1]))
    assert [t for t, _, _ in words.lines] == [t for t, _, _ in direct.lines]
    assert max(real_load(texty, min_size=decodes[1]).size) >= DEFAULT_MAX_SIDE


KILL_SCRIPT = """
import sys
from mmsearch.config import ModelSpec
from mmsearch.indexing.pipeline import index_folders
def progress(done, total, **kw):
    if done:
        print("BATCH", done, flush=True)
index_folders(sys.argv[1], [sys.argv[2]], spec=ModelSpec(model="mmsearch-tiny", pretrained=None,
              checkpoint=sys.argv[3]), batch_size=2, workers=1, progress=progress)
"""


def _words_consistent(idx):
    """Catalog, FTS5 and FAISS agree: every image has its document, no words without an image, the FTS
    index matches its content table, FAISS ids are the catalog's."""
    store = IndexStore.open(idx)
    cat = store.catalog
    images = {i for (i,) in cat.conn.execute("SELECT id FROM images")}
    docs = {i for (i,) in cat.conn.execute("SELECT image_id FROM image_text")}
    lined = {i for (i,) in cat.conn.execute("SELECT DISTINCT image_id FROM ocr_lines")}
    assert docs == images and lined <= images
    cat.conn.execute("INSERT INTO image_text_fts(image_text_fts, rank) VALUES ('integrity-check', 1)")
    assert cat.conn.execute("SELECT count(*) FROM image_text_fts").fetchone()[0] == len(images)
    ids, emb = cat.embeddings(store.dim)
    v = store.image_vectors()
    assert v.ntotal == len(ids)
    if len(ids):
        assert list(v.search(emb, 1)[1][:, 0]) == list(ids)
    return store


def test_kill_9_mid_index_leaves_catalog_fts_and_faiss_consistent(tmp_path, tiny_checkpoint):
    """Issue 27: a kill -9 mid-index leaves catalog, FTS and FAISS consistent; the re-run completes them."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    need_ocr()
    photos = tmp_path / "shots"
    photos.mkdir()
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
             "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
    for i, w in enumerate(words):
        render(photos / f"{i:02d}.png", [f"{w} {i}"], size=(320, 100))
    idx = tmp_path / "idx"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(idx), str(photos), str(tiny_checkpoint)],
                            stdout=subprocess.PIPE, text=True, env=env)
    seen = 0
    for line in proc.stdout:
        if line.startswith("BATCH"):
            seen = int(line.split()[1])
            if seen >= 4:
                break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < seen < len(words)
    cat = _words_consistent(idx).catalog
    partial, unread = cat.count_images(), len(cat.ids_needing_ocr())  # on a CPU OCR follows the embed phase
    assert 0 < partial < len(words) and unread <= partial
    s = index_folders(idx, [photos])
    assert s.added == len(words) - partial and s.ocr_read == s.added + unread
    store = _words_consistent(idx)
    found = Searcher(store).search("november", mode="text")
    assert [os.path.basename(h.path) for h in found] == ["13.png"]


def test_on_a_cpu_ocr_follows_the_embed_phase(folder, tmp_path, tiny_checkpoint, monkeypatch):
    """On a CPU the words are read after every image is embedded and the vectors saved (inside the embed
    phase OCR's threads slowed the encoder's), and a crash there loses no embedding."""
    from mmsearch.indexing.ocr import OcrEngine
    from mmsearch.storage.store import IndexStore as Store

    events, real = [], OcrEngine.read
    monkeypatch.setattr(OcrEngine, "read", lambda self, img, full=None: events.append("read") or real(self, img, full))
    real_save = Store.save_vectors
    monkeypatch.setattr(Store, "save_vectors", lambda self, *a, **kw: events.append("saved") or real_save(self, *a, **kw))
    s = index_folders(tmp_path / "idx", [folder], spec=spec(tiny_checkpoint),
                      progress=lambda done, total, stage=None, **kw: events.append(stage))
    assert s.ocr_read > 0 and "read" in events
    first_read = events.index("read")
    assert "saved" in events[:first_read] and "embed" not in events[first_read:]
    assert events[-1] == "ocr"


def test_replicas_read_side_by_side_and_agree_with_one_reader(tmp_path):
    """Two indexer threads read two images at once on two replicas (each on threads // 2), and what they
    read is what a single reader with every thread reads."""
    need_ocr()
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from mmsearch.indexing.ocr import OcrEngine

    paths = []
    for i, words in enumerate([["Invoice 2023 total"], ["Harbour cafe"], ["Opening hours"], ["Thank you"]]):
        render(tmp_path / f"t{i}.png", words)
        paths.append(tmp_path / f"t{i}.png")
    imgs = [Image.open(p).convert("RGB") for p in paths]
    one = OcrEngine(threads=2, replicas=1)
    expected = [[t for t, _, _ in one.read(im).lines] for im in imgs]
    assert all(expected)

    two = OcrEngine(threads=2, replicas=2)
    assert two.threads_each == 1 and two._made == 1  # the second replica loads only when a reader waits
    inside, peak, both_in = [0], [0], threading.Condition()
    real_detect = two.detect

    def detect(bgr):
        with both_in:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            both_in.notify_all()
            # the first reader in waits for the second: on a loaded machine one read could otherwise end
            # before the other starts. If reads were serialised, the second never gets in and peak stays 1
            both_in.wait_for(lambda: peak[0] >= 2, timeout=20)
        try:
            return real_detect(bgr)
        finally:
            with both_in:
                inside[0] -= 1

    two.detect = detect
    barrier = threading.Barrier(2)

    def read(im):
        barrier.wait(timeout=30)  # both start together, so both replicas are in use at once
        return [t for t, _, _ in two.read(im).lines]

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(read, imgs[:2])) + list(pool.map(read, imgs[2:]))
    assert got == expected
    assert two._made == 2 and peak[0] == 2
