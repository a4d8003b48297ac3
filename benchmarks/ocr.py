"""Words in photos (issue 27): how well OCR reads, how fast, and what searching by words adds.

    python benchmarks/ocr.py [--n 300] [--scenes 200] [--pages 6] [--scale 100000] [--checkpoint FILE]

Builds a set with known ground truth under benchmarks/.cache/ocr-*: lines of words rendered with Debian's
fonts (DejaVu Sans; Noto Sans CJK for Chinese) onto varied backgrounds (plain, gradient, photo-like
texture, a synthetic scene), small to large (14 to 64 px), level or rotated a few degrees, PNG or
JPEG-compressed; screenshots of real rendered pages (headless Chromium: the mmsearch page itself and
pages of paragraphs), when chromium-headless-shell is installed; and synthetic scenes without text,
whose captions are the scene queries. Then:

- OCR quality: character error rate per image (edit distance / ground-truth characters) and word
  recall (whole words found), for words of 4+ letters on lines at least 20 px high and below;
- retrieval: the set indexed with mmsearch-tiny (the demo's checkpoint, trained here on synthetic shapes
  if not cached: it does not read words, which is the point) and OCR; R@1 / R@10 of dense, text and
  hybrid search for a word of the image, a quoted phrase of it, and a scene description;
- OCR throughput (img/s, OCR alone on decoded images) on photos without text and on images with text;
- the latency of a warm hybrid query at `--scale` images (synthetic vectors and word rows).

Prints Markdown tables and writes benchmarks/results/ocr.json. Small arguments (--n 20 --scenes 20
--pages 1 --scale 2000) check that it runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from common import CACHE, data_dir, demo_checkpoint, demo_config, machine, machine_line, make_photos, markdown_table, write_results

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
NOTO_CJK = "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"
CHROMIUM = "/usr/bin/chromium-headless-shell"
VOCAB = """harbour invoice receipt meeting station ticket museum garden kitchen window bridge market
library airport coffee bakery pharmacy hospital school parking entrance exit office printer monday
tuesday friday summer winter autumn spring holiday weekend travel journey mountain river forest
island village castle tower street avenue square theatre cinema concert festival gallery studio
pizza pasta salad dessert breakfast dinner lunch menu price total amount balance payment refund
order delivery package shipping address customer service support account password username login
report budget quarterly annual planning roadmap project release version update install settings
network server storage backup camera photo screen keyboard battery charger cable adapter monitor
doctor nurse patient teacher student lesson homework exam result grade science history music
violin guitar piano drums singer dancer painter writer reader notebook pencil marker eraser folder
yellow purple orange silver golden copper marble granite crystal diamond velvet cotton leather wooden
""".split()
KEYS, FILLER = VOCAB[:100], VOCAB[100:]  # a key word is in one image only; filler words are in many
CJK_WORDS = ["发票", "收据", "会议", "北京", "上海", "地铁", "出口", "餐厅", "医院", "学校", "银行", "机场",
             "图书馆", "超市", "药店", "停车场", "入口", "车站", "公园", "博物馆"]
SIZES = (14, 18, 24, 32, 48, 64)
CANVASES = ((640, 480), (800, 600), (1024, 768), (1280, 720))


# ---- the set ---------------------------------------------------------------------------------------
def background(kind: str, size, rng, photos: list, scenes: list) -> Image.Image:
    w, h = size
    if kind == "plain":
        return Image.new("RGB", size, tuple(int(v) for v in rng.integers(200, 256, 3)))
    if kind == "gradient":
        a, b = rng.integers(150, 256, 3), rng.integers(150, 256, 3)
        t = np.linspace(0, 1, w)[None, :, None]
        return Image.fromarray((a * (1 - t) + b * t).repeat(h, 0).astype(np.uint8))
    if kind == "texture":
        return Image.open(photos[int(rng.integers(len(photos)))]).convert("RGB").resize(size)
    return Image.open(scenes[int(rng.integers(len(scenes)))]).convert("RGB").resize(size, Image.BILINEAR)


def render_one(path: Path, i: int, rng, photos, scenes) -> dict:
    """One image of 1-3 lines; its first word is unique in the set (the word and phrase queries' target)."""
    size = CANVASES[int(rng.integers(len(CANVASES)))]
    kind = ("plain", "gradient", "texture", "scene")[i % 4]
    cjk = i % 10 == 9
    px = SIZES[int(rng.integers(len(SIZES)))]
    angle = float(rng.choice([0, 0, -2, 2, -4, 4]))
    quality = [None, 90, 60, 35][int(rng.integers(4))]
    key = KEYS[i % len(KEYS)] + (str(i // len(KEYS)) if i >= len(KEYS) else "")
    if cjk:
        lines = [" ".join([CJK_WORDS[i % len(CJK_WORDS)]] + list(rng.choice(CJK_WORDS, 2))) + f" {key}"]
    else:
        lines = [" ".join([key.capitalize()] + list(rng.choice(FILLER, int(rng.integers(1, 4)))))]
        lines += [" ".join(rng.choice(FILLER, int(rng.integers(2, 5)))) for _ in range(int(rng.integers(0, 3)))]
    img = background(kind, size, rng, photos, scenes)
    font = ImageFont.truetype(NOTO_CJK if cjk else DEJAVU, px)
    layer = Image.new("L", size, 0)
    draw = ImageDraw.Draw(layer)
    y = int(size[1] * 0.1)
    heights = []
    for line in lines:
        x0, y0, x1, y1 = draw.textbbox((int(size[0] * 0.06), y), line, font=font)
        if x1 > size[0] * 0.95:  # too long for the canvas: a smaller font for this line
            font = ImageFont.truetype(NOTO_CJK if cjk else DEJAVU, max(12, int(px * size[0] * 0.85 / (x1 - x0))))
            x0, y0, x1, y1 = draw.textbbox((int(size[0] * 0.06), y), line, font=font)
        draw.text((int(size[0] * 0.06), y), line, fill=255, font=font)
        heights.append(y1 - y0)
        y += int((y1 - y0) * 1.8) + 4
    if angle:
        layer = layer.rotate(angle, resample=Image.BICUBIC, center=(size[0] / 2, size[1] / 2))
    under = np.asarray(img.convert("L"), np.float32)[np.asarray(layer) > 0]
    ink = (15, 15, 15) if under.size == 0 or under.mean() > 110 else (250, 250, 250)
    img.paste(Image.new("RGB", size, ink), (0, 0), layer)
    name = f"t{i:04d}" + (".jpg" if quality else ".png")
    img.save(path / name, **({"quality": quality} if quality else {}))
    return {"path": str(path / name), "lines": lines, "heights": heights, "key": key, "kind": kind, "cjk": cjk,
            "px": px, "angle": angle, "jpeg": quality}


def render_pages(out: Path, n: int, rng) -> list[dict]:
    """Screenshots of pages in headless Chromium: the mmsearch page itself, then pages of paragraphs."""
    if n <= 0 or not os.path.exists(CHROMIUM):
        return []
    from playwright.sync_api import sync_playwright

    static = Path(__file__).resolve().parents[1] / "mmsearch" / "serve" / "static" / "index.html"
    items = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        page = browser.new_page(viewport={"width": 1024, "height": 700})
        for i in range(n):
            key = "mmsearch" if i == 0 else f"page{i}"  # the mmsearch page names itself once, in its header
            if i == 0:
                page.goto(static.as_uri())
                page.evaluate("() => { document.getElementById('empty').hidden = false; }")
            else:
                words = [" ".join(rng.choice(FILLER, 9)) for _ in range(4)]
                page.set_content(f"<h1 style='font:32px sans-serif'>{key} {' '.join(rng.choice(FILLER, 2))}</h1>"
                                 + "".join(f"<p style='font:20px sans-serif'>{w}</p>" for w in words))
            text = page.inner_text("body")
            path = out / f"s{i:02d}.png"
            page.screenshot(path=str(path))
            items.append({"path": str(path), "lines": [ln for ln in text.splitlines() if ln.strip()], "key": key,
                          "kind": "page", "cjk": False, "heights": None, "px": None, "angle": 0, "jpeg": None})
        browser.close()
    return items


def build(out: Path, n: int, n_scenes: int, n_pages: int, seed: int = 0) -> tuple[list, list]:
    """(text items, scene items [(path, caption)]) under `out` (made once per arguments)."""
    import csv

    rng = np.random.default_rng(seed)
    shutil.rmtree(out, ignore_errors=True)
    (out / "set").mkdir(parents=True)
    cfg = demo_config()
    synth = data_dir(CACHE, cfg["n"], cfg["seed"], cfg["size"])
    with open(synth / "captions.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    seen, scenes = set(), []
    for r in rows:
        if r["image"] not in seen and len(scenes) < n_scenes:
            seen.add(r["image"])
            shutil.copy(synth / r["image"], out / "set" / f"scene_{len(scenes):04d}.png")
            scenes.append((str(out / "set" / f"scene_{len(scenes):04d}.png"), r["caption"]))
    make_photos(out / "photos", 8, (1024, 768), seed=seed)
    photos = sorted((out / "photos").glob("*.jpg"))
    scene_files = [synth / r["image"] for r in rows[:50]]
    items = [render_one(out / "set", i, rng, photos, scene_files) for i in range(n)]
    items += render_pages(out / "set", n_pages, rng)
    return items, scenes


# ---- OCR quality -------------------------------------------------------------------------------------
def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def norm(text: str) -> str:
    from mmsearch.storage.words import fold

    return " ".join(fold(text).split())


def quality(items: list, read: dict) -> dict:
    """CER per image and word recall, split by what makes reading hard."""
    import re

    cer, words = {}, {"big": [0, 0], "small": [0, 0], "cjk": [0, 0], "page": [0, 0]}
    groups: dict = {}
    for it in items:
        got = norm(" ".join(read[it["path"]]))
        found = set(re.findall(r"[^\W_]+", got))
        if it["kind"] != "page":
            gt = norm(" ".join(it["lines"]))
            c = edit_distance(gt, got) / max(1, len(gt))
            cer[it["path"]] = c
            for g in (f"bg {it['kind']}", f"{it['px']} px", "rotated" if it["angle"] else "level",
                      f"jpeg q{it['jpeg']}" if it["jpeg"] else "png", "chinese" if it["cjk"] else "latin"):
                groups.setdefault(g, []).append(c)
        for n, line in enumerate(it["lines"]):
            for w in re.findall(r"[^\W_]+", norm(line)):
                if it["cjk"] and not w.isascii():
                    bucket = "cjk"
                    hit = w in got
                elif len(w) >= 4 and w.isalpha():
                    bucket = "page" if it["kind"] == "page" else ("big" if it["heights"][n] >= 20 else "small")
                    hit = w in found
                else:
                    continue
                words[bucket][0] += hit
                words[bucket][1] += 1
    recall = {k: (round(h / t, 4) if t else None, t) for k, (h, t) in words.items()}
    return {"cer_mean": round(float(np.mean(list(cer.values()))), 4) if cer else None,
            "cer_by": {g: round(float(np.mean(v)), 4) for g, v in sorted(groups.items())},
            "word_recall": recall}


# ---- retrieval ---------------------------------------------------------------------------------------
def retrieval(idx: Path, items: list, scenes: list) -> dict:
    from mmsearch.search.query import Searcher
    from mmsearch.storage.store import IndexStore

    s = Searcher(IndexStore.open(idx))
    queries = {"word": [], "phrase": [], "scene": [(cap, p) for p, cap in scenes]}
    for it in items:
        first = it["lines"][0].split()
        queries["word"].append((it["key"], it["path"]))
        i = next((j for j, w in enumerate(first) if w.lower() == it["key"].lower()), None)
        if i is not None and i + 1 < len(first):
            queries["phrase"].append((f'"{first[i]} {first[i + 1]}"', it["path"]))
    out = {}
    for kind, qs in queries.items():
        for mode in ("dense", "text", "hybrid"):
            ranks = []
            for q, target in qs:
                hits = s.search(q, k=10, mode=mode)
                paths = [h.path for h in hits]
                ranks.append(paths.index(target) + 1 if target in paths else None)
            out[f"{kind}/{mode}"] = {"n": len(qs), "R@1": round(sum(r == 1 for r in ranks) / max(1, len(ranks)), 4),
                                     "R@10": round(sum(r is not None for r in ranks) / max(1, len(ranks)), 4)}
    return out


# ---- throughput ------------------------------------------------------------------------------------------
def throughput(paths_text: list, paths_plain: list, limit: int = 60) -> dict:
    """img/s of OCR alone (Extractor on an image the indexer already decoded), and of its gate alone."""
    from mmsearch import media
    from mmsearch.indexing.extract import Extractor
    from mmsearch.indexing.ocr import shared_engine

    ex = Extractor(ocr=True)
    eng = shared_engine()
    out = {"threads": eng.threads, "engine": eng.engine_name}
    for name, paths in (("no_text", paths_plain[:limit]), ("text", paths_text[:limit])):
        imgs = [(p, media.load_image(p)) for p in paths]
        ex(*imgs[0])  # warm: the runtime compiles per input shape
        t = time.perf_counter()
        res = [ex(p, im) for p, im in imgs]
        wall = time.perf_counter() - t
        out[name] = {"images": len(imgs), "img_per_s": round(len(imgs) / wall, 2),
                     "found_text": sum(r.status == "ok" for r in res)}
    return out


# ---- a hybrid query at scale ---------------------------------------------------------------------------
def at_scale(small_idx: Path, folder: Path, n: int, rng, repeat: int = 40) -> dict:
    """Warm query latency over `n` images: synthetic vectors and word rows in an index of the same model."""
    import json as _json

    from mmsearch.search.query import Searcher
    from mmsearch.storage.store import IndexStore
    from mmsearch.storage.words import name_words

    base = IndexStore.open(small_idx)
    shutil.rmtree(folder, ignore_errors=True)
    store = IndexStore.open_or_create(folder, spec=base.spec, precision=base.precision)
    cat = store.catalog
    vecs = rng.normal(size=(n, store.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with cat.transaction():
        cat.conn.executemany(
            "INSERT INTO images (id, path, size, mtime_ns, width, height, ext, embedding) VALUES (?,?,?,?,?,?,?,?)",
            [(i + 1, f"/synthetic/{i // 1000:03d}/img_{i:06d}.jpg", 1, 1, 800, 600, ".jpg", vecs[i].tobytes())
             for i in range(n)])
        rows = []
        for i in range(n):
            lines = [" ".join(rng.choice(VOCAB, int(rng.integers(2, 6)))) for _ in range(int(rng.integers(0, 4)))]
            rows.append((i + 1, name_words(f"/synthetic/{i // 1000:03d}/img_{i:06d}.jpg"), "", "\n".join(lines),
                         "ok" if lines else "none", _json.dumps({})))
        cat.conn.executemany("INSERT INTO image_text (image_id, name, meta, ocr, ocr_status, meta_json) "
                             "VALUES (?,?,?,?,?,?)", rows)
        cat.bump_generation()
    s = Searcher(IndexStore.open(folder))
    queries = {"word": [str(w) for w in rng.choice(VOCAB, repeat)],
               "phrase": [f'"{a} {b}"' for a, b in rng.choice(VOCAB, (repeat, 2))],
               "scene": ["a red circle left of a blue square"] * repeat}
    s.search("warm up", k=10, mode="hybrid")  # loads (or builds) the vectors and the text tower
    out = {"images": n}
    for kind, qs in queries.items():
        for mode in ("dense", "hybrid"):
            ms = []
            for q in qs:
                t = time.perf_counter()
                s.search(q, k=10, mode=mode)
                ms.append((time.perf_counter() - t) * 1000)
            out[f"{kind}/{mode}"] = {"p50_ms": round(statistics.median(ms), 2),
                                     "p95_ms": round(float(np.percentile(ms, 95)), 2)}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="images with rendered words")
    ap.add_argument("--scenes", type=int, default=200, help="synthetic scenes without words (scene queries)")
    ap.add_argument("--pages", type=int, default=6, help="screenshots of pages in headless Chromium")
    ap.add_argument("--scale", type=int, default=100_000, help="images of the latency measurement")
    ap.add_argument("--checkpoint", type=Path, default=None, help="mmsearch-tiny weights [default: the demo's]")
    ap.add_argument("--out", type=Path, default=None, help="JSON path [default: benchmarks/results/ocr.json]")
    args = ap.parse_args(argv)
    for font in (DEJAVU, NOTO_CJK):
        if not os.path.exists(font):
            raise SystemExit(f"font {font} missing: apt-get install -y fonts-dejavu-core fonts-noto-cjk")
    from mmsearch.config import TINY_MODEL, ModelSpec
    from mmsearch.indexing.pipeline import index_folders
    from mmsearch.storage.store import IndexStore

    work = CACHE / f"ocr-n{args.n}-s{args.scenes}-p{args.pages}"
    ckpt = args.checkpoint or demo_checkpoint()
    t = time.perf_counter()
    items, scenes = build(work, args.n, args.scenes, args.pages)
    build_s = time.perf_counter() - t
    idx = work / "idx"
    summary = index_folders(idx, [work / "set"], spec=ModelSpec(model=TINY_MODEL, pretrained=None, checkpoint=str(ckpt)),
                            ocr=True)
    cat = IndexStore.open(idx).catalog
    read = {}
    for it in items:
        image_id = cat.id_for_path(it["path"])
        read[it["path"]] = [ln["text"] for ln in cat.ocr_lines(image_id)] if image_id else []
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "set": {"text_images": len(items), "scenes": len(scenes), "build_s": round(build_s, 1)},
              "index": {k: summary.to_dict()[k] for k in ("added", "failed", "seconds", "ocr_read", "ocr_text")},
              "quality": quality(items, read), "retrieval": retrieval(idx, items, scenes),
              "throughput": throughput([it["path"] for it in items if it["kind"] != "page"],
                                       [str(p) for p in sorted((work / "photos").glob("*.jpg"))] + [p for p, _ in scenes]),
              "scale": at_scale(idx, work / "scale", args.scale, np.random.default_rng(1))}
    result["machine"] = machine()
    path = write_results(args.out or "ocr", result)
    print(render(result))
    print(f"\nwrote {path}")


def render(r: dict) -> str:
    q, rt, tp, sc = r["quality"], r["retrieval"], r["throughput"], r["scale"]
    rec = q["word_recall"]
    cell = lambda v: "n/a" if v[0] is None else f"{v[0]:.3f} ({v[1]} words)"  # noqa: E731
    out = [machine_line(r["machine"]), "",
           markdown_table(["OCR", "value"], [
               ["character error rate (mean per image)", f"{q['cer_mean']:.3f}" if q["cer_mean"] is not None else "n/a"],
               ["word recall, 4+ letters, lines >= 20 px", cell(rec["big"])],
               ["word recall, 4+ letters, lines < 20 px", cell(rec["small"])],
               ["Chinese words found", cell(rec["cjk"])],
               ["page screenshots: word recall, 4+ letters", cell(rec["page"])]]),
           "", "CER by condition: " + ", ".join(f"{g} {v:.3f}" for g, v in q["cer_by"].items()), "",
           markdown_table(["query kind", "dense only R@1 / R@10", "text only", "hybrid"], [
               [label] + [f"{rt[f'{kind}/{m}']['R@1']:.2f} / {rt[f'{kind}/{m}']['R@10']:.2f}"
                          for m in ("dense", "text", "hybrid")]
               for kind, label in (("word", f"a word that appears in the image ({rt['word/dense']['n']})"),
                                   ("phrase", f"a quoted phrase ({rt['phrase/dense']['n']})"),
                                   ("scene", f"a description of the scene, no text in it ({rt['scene/dense']['n']})"))]),
           "", markdown_table(["OCR throughput", "img/s", "images", "found text in"], [
               ["photos and scenes without text", tp["no_text"]["img_per_s"], tp["no_text"]["images"], tp["no_text"]["found_text"]],
               ["images with text", tp["text"]["img_per_s"], tp["text"]["images"], tp["text"]["found_text"]]]),
           f"({tp['engine']}, {tp['threads']} threads; OCR alone on decoded images)", "",
           markdown_table([f"warm query at {sc['images']:,} images", "dense p50 / p95 ms", "hybrid p50 / p95 ms"], [
               [k] + [f"{sc[f'{k}/{m}']['p50_ms']} / {sc[f'{k}/{m}']['p95_ms']}" for m in ("dense", "hybrid")]
               for k in ("word", "phrase", "scene")])]
    return "\n".join(out)


if __name__ == "__main__":
    main()
