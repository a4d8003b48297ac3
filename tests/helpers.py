"""Shared test helpers (imported by test modules; fixtures live in conftest.py).

- make_photo_folder: a real photo folder with every kind of file a user may have, good and bad.
- build_hf_cache: an offline stand-in for the Hugging Face hub files some families fetch (tokenizers,
  shrunk text-tower configs), in the hub's cache layout, so HF_HUB_OFFLINE=1 finds them as it finds a
  real cache. Nothing is downloaded.
- build_served_index / exif_rotated_jpeg: a small served index for the server tests (PNGs, JPEGs in a
  subfolder, an EXIF-rotated JPEG, captions).
- render / need_font / need_ocr: images with known words for the OCR tests (a missing font or rapidocr
  skips off CI and fails on CI, where .ci/run and the dev extra install them).
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from mmsearch.config import ModelSpec
from mmsearch.indexing.corpus import add_texts
from mmsearch.indexing.pipeline import index_folders
from mmsearch.storage.store import IndexStore


# ---- a photo folder with every kind of file, good and bad --------------------------------------------
@dataclass
class PhotoFolder:
    root: Path
    good: dict = field(default_factory=dict)  # name -> path, each must index
    bad: dict = field(default_factory=dict)  # name -> path, each must become a recorded failure


def _picture(size, seed):
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 255, 3)))
    d = ImageDraw.Draw(img)
    w, h = size
    d.rectangle([w // 8, h // 8, w // 2, h // 2], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    d.ellipse([w // 2, h // 3, w - 4, h - 4], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def _bomb_png(w=30000, h=30000) -> bytes:
    """A tiny valid PNG header declaring a huge 1-bit image (decompression bomb)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    raw = zlib.compress(b"\x00" * (w // 8 + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def make_photo_folder(root: Path, size=(96, 72)) -> PhotoFolder:
    root = Path(root)
    (root / "sub").mkdir(parents=True, exist_ok=True)
    (root / ".hidden").mkdir(exist_ok=True)
    f = PhotoFolder(root)

    def good(name, save):
        p = root / name
        save(p)
        f.good[name] = p

    pic = lambda seed: _picture(size, seed)
    good("rgb.jpg", lambda p: pic(1).save(p, quality=90))
    good("big.jpg", lambda p: pic(2).resize((2000, 1500)).save(p, quality=85))
    good("gray.jpg", lambda p: pic(3).convert("L").save(p))
    good("cmyk.jpg", lambda p: pic(4).convert("CMYK").save(p))
    good("palette.png", lambda p: pic(5).convert("P", palette=Image.ADAPTIVE, colors=16).save(p))
    good("alpha.png", lambda p: pic(6).convert("RGBA").save(p))
    good("la.png", lambda p: pic(7).convert("LA").save(p))
    arr16 = (np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0])).astype(np.uint16)
    good("png16.png", lambda p: Image.fromarray(arr16).save(p))
    good("anim.gif", lambda p: pic(8).save(p, save_all=True, append_images=[pic(9)], duration=100))
    good("img.webp", lambda p: pic(10).save(p))
    good("img.bmp", lambda p: pic(11).save(p))
    good("img.tiff", lambda p: pic(12).save(p))
    base = pic(13)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    good("rotated_tag.jpg", lambda p: base.save(p, exif=exif, quality=95))
    good("rotated_real.jpg", lambda p: base.transpose(Image.Transpose.ROTATE_270).save(p, quality=95))
    good("sub/nested.jpg", lambda p: pic(14).save(p))
    try:
        import pillow_heif

        pillow_heif.register_heif_opener()
        good("img.heic", lambda p: pic(15).save(p, format="HEIF"))
    except Exception:
        pass
    pic(16).save(root / ".hidden" / "secret.jpg")
    (root / "notes.txt").write_text("not an image")

    def bad(name, make):
        p = root / name
        make(p)
        f.bad[name] = p

    buf = io.BytesIO()
    pic(17).resize((400, 300)).save(buf, format="JPEG")
    bad("truncated.jpg", lambda p: p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2]))
    bad("zero.jpg", lambda p: p.write_bytes(b""))
    bad("text.jpg", lambda p: p.write_text("hello, I am a text file"))
    bad("garbage.png", lambda p: p.write_bytes(np.random.default_rng(0).bytes(3000)))
    bad("bomb.png", lambda p: p.write_bytes(_bomb_png()))
    bad("broken_link.jpg", lambda p: os.symlink(root / "does-not-exist.jpg", p))
    bad("self_loop.jpg", lambda p: os.symlink(p, p))
    os.symlink(root, root / "sub" / "loop")  # a directory loop: must terminate
    if os.geteuid() != 0:  # root reads anything, so a chmod-000 file only fails for other users
        def unreadable(p):
            pic(18).save(p)
            os.chmod(p, 0)
        bad("unreadable.jpg", unreadable)
    return f


# ---- an offline Hugging Face hub cache -----------------------------------------------------------
# Its one copy lives in benchmarks/common.py (benchmarks/families.py needs it too, and no benchmark may
# import from tests/); loaded by path, since benchmarks/ is not a package.
def _benchmarks_common():
    import importlib.util
    import sys

    name = "mmsearch_benchmarks_common"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "benchmarks" / "common.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def build_hf_cache(cache: Path) -> Path:
    return _benchmarks_common().build_hf_cache(cache)


# ---- a small served index ----------------------------------------------------------------------------
def exif_rotated_jpeg(path):
    """A 60x30 landscape JPEG whose EXIF orientation (6 = rotate 90 CW) makes it 30x60 portrait."""
    img = Image.new("RGB", (60, 30), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif.tobytes())


def build_served_index(root, synth_dir, checkpoint, n_png=24, n_jpg=6, n_texts=80):
    """(index dir, photos dir): n_png PNGs, n_jpg JPEGs under sub/, rotated.jpg, and a caption corpus."""
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    names = sorted(os.listdir(synth_dir / "images"))[:n_png + n_jpg]
    for n in names[:n_png]:
        shutil.copy(synth_dir / "images" / n, photos / n)
    for n in names[n_png:]:
        Image.open(synth_dir / "images" / n).convert("RGB").save(photos / "sub" / (n[:-4] + ".jpg"), quality=95)
    exif_rotated_jpeg(photos / "rotated.jpg")
    idx = root / "idx"
    index_folders(idx, [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(checkpoint)))
    with open(synth_dir / "captions.csv") as fh:
        captions = [r["caption"] for r in csv.DictReader(fh)][:n_texts]
    add_texts(IndexStore.open(idx), captions)
    return idx, photos


# ---- synthetic CLIP-like catalogs (no model) ---------------------------------------------------------
SYNTH_DIM = 64


def synthetic_store(tmp_path, vecs, first_id=1, store=None):
    """An IndexStore over a model-less catalog holding `vecs` (paths /img/a|b/NNNNN.jpg|png)."""
    from mmsearch.storage.catalog import Catalog

    if store is None:
        cat = Catalog.create(tmp_path / "idx", {"dim": int(vecs.shape[1]), "fingerprint": "synthetic",
                                                "model": {"model": "synthetic"}, "factory": "auto"})
        store = IndexStore(tmp_path / "idx", cat)
    rows = [dict(path=f"/img/{'a' if i % 2 else 'b'}/{i:05d}.{'jpg' if i % 3 else 'png'}", size=1, mtime_ns=i,
                 ext=".jpg" if i % 3 else ".png") for i in range(first_id, first_id + len(vecs))]
    with store.catalog.transaction():
        store.catalog.upsert_images(rows, vecs)
        store.catalog.bump_generation()
    return store


def mixture_vectors(n, seed=0):
    from mmsearch.datasets.synthvec import make_mixture, sample_images

    mix = make_mixture(n_clusters=40, dim=SYNTH_DIM, seed=seed, topic_size=4)
    return mix, sample_images(mix, n, seed=seed + 1)


def recall(truth, found):
    from mmsearch.storage import ann

    return ann.recall_at_k(np.asarray(truth), np.asarray(found))


def filter_kwargs(filters: dict, root: Path, to_time) -> dict:
    """A test's filter parameters as Searcher.search takes them: `under` relative to `root`, `after` and
    `before` through `to_time` (a day number or a date string -> epoch seconds)."""
    kw = dict(filters)
    if "under" in kw:
        kw["under"] = str(root / kw["under"])
    for key in ("after", "before"):
        if key in kw:
            kw[key] = to_time(kw[key])
    return kw


# ---- images with known words (issue 27): Debian's fonts, .ci/run installs them -------------------------

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
NOTO_CJK = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"
FONTS_INSTALL = "apt-get install -y fonts-dejavu-core fonts-noto-cjk"


def need_font(path: str) -> str:
    if os.path.exists(path):
        return path
    if os.environ.get("CI"):
        pytest.fail(f"font {path} missing on CI (.ci/run installs it: {FONTS_INSTALL})")
    pytest.skip(f"font {path} missing: {FONTS_INSTALL}")


def need_ocr():
    from mmsearch.indexing.ocr import ocr_available

    if not ocr_available():
        if os.environ.get("CI"):
            pytest.fail("rapidocr missing on CI (pip install -e '.[dev]' installs it)")
        pytest.skip("rapidocr missing: pip install 'mmsearch[ocr]'")


def render(path, lines, size=(480, 200), font_size=30, font=DEJAVU, bg=(245, 245, 240), fg=(20, 20, 20),
           exif=None, fmt=None):
    """Black text lines on a light background, saved to `path` (EXIF: a PIL Image.Exif)."""
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    f = ImageFont.truetype(need_font(font), font_size)
    for i, line in enumerate(lines):
        draw.text((24, 24 + int(font_size * 1.6) * i), line, fill=fg, font=f)
    kw = {"exif": exif.tobytes()} if exif is not None else {}
    img.save(path, fmt, **kw)
    return path


# ---- a small served index with a video ------------------------------------------------------------------
def build_video_index(root, synth_dir, checkpoint, ext=".webm"):
    """(index dir, photos dir, the video's truth): 6 PNGs and clip.webm (VP8: what headless Chromium plays) of a
    black second then three synthetic scenes of 3.3 s, each scene's first caption as its truth."""
    from mmsearch.datasets.synthvideo import Segment, write_video

    photos = Path(root) / "photos"
    photos.mkdir(parents=True)
    with open(synth_dir / "captions.csv") as fh:
        first = {}
        for r in csv.DictReader(fh):
            first.setdefault(r["image"], r["caption"])
    singles = [(p, c) for p, c in first.items() if c.startswith("a large ")]
    scenes, colours = [], set()
    for p, c in singles:  # three one-object scenes of three colours
        if c.split()[2] not in colours:
            scenes.append((p, c))
            colours.add(c.split()[2])
        if len(scenes) == 3:
            break
    others = [p for p in sorted(first) if p not in {s for s, _ in scenes}][:6]
    for p in others:
        shutil.copy(synth_dir / p, photos / Path(p).name)
    segs = [Segment(1.0, (0, 0, 0))] + [Segment(3.3, Image.open(synth_dir / p).convert("RGB"), caption=c,
                                                moving_dot=True) for p, c in scenes]
    info = write_video(photos / f"clip{ext}", segs, size=(128, 128))
    idx = Path(root) / "idx"
    index_folders(idx, [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(checkpoint)))
    return idx, photos, info


def untrained_reranker(index_dir, out):
    """A re-ranker file for the index's encoder with seeded random weights (what the tests of its plumbing
    need: the tokens and scores flow, not their quality)."""
    import torch

    from mmsearch.rerank.model import RERANKER_FORMAT, TOKEN_GRID, FusionModel

    store = IndexStore.open(index_dir)
    torch.manual_seed(0)
    model = FusionModel(int(store.meta["text_width"]), int(store.meta["vision_width"]), 1 + TOKEN_GRID ** 2)
    torch.save({"format": RERANKER_FORMAT, "config": model.config, "state_dict": model.state_dict(),
                "encoder_fingerprint": store.meta["fingerprint"], "token_grid": TOKEN_GRID,
                "alpha": {"text_to_image": 0.5, "image_to_text": 0.5}}, out)
    return out
