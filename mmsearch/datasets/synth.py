"""A deterministic synthetic captioned dataset: scenes of one to three coloured shapes.

Half the scenes are two-object relational scenes generated in *swap pairs*: the same layout with the
two colours exchanged ("a red circle left of a blue square" / "a blue circle left of a red square").
Both scenes of a pair share a split, and each caption carries its swap as a `negative`, so a held-out
query's hardest distractor is its swapped scene: the case a dual encoder cannot tell apart and a
fusion re-ranker can.
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

from PIL import Image, ImageDraw

from mmsearch.checks import MAX_SEED, count
from mmsearch.errors import DatasetError

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "purple": (140, 40, 170), "orange": (250, 140, 0), "white": (250, 250, 250), "black": (10, 10, 10)}
BACKGROUNDS = {"gray": (128, 128, 128), "beige": (215, 200, 160), "teal": (0, 120, 120)}
SHAPES = ("circle", "square", "triangle", "diamond")
MIN_SIZE, MAX_SIZE = 16, 4096  # image side in pixels: below 16 the shapes vanish
MAX_SYNTH_IMAGES = 10_000_000
SYNONYMS = {"circle": ("circle", "disc", "round dot"), "square": ("square", "box", "block"),
            "triangle": ("triangle", "wedge", "triangle"), "diamond": ("diamond", "rhombus", "diamond")}
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}


def _shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)


def draw_scene(objects, bg: str, size: int) -> Image.Image:
    """A scene as the data set draws it: [(colour, shape, (fx, fy), radius)] on a named background."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[bg])
    draw = ImageDraw.Draw(img)
    for colour, shape, (fx, fy), radius in objects:
        _shape(draw, shape, fx * size, fy * size, radius * size, COLOURS[colour])
    return img


def _render(objects, bg: str, size: int, path: Path) -> None:
    draw_scene(objects, bg, size).save(path, format="PNG", optimize=False)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _single_captions(rng, c, s, size_word, pos, bg):
    name = rng.choice(SYNONYMS[s])
    where = "in the center" if pos == "center" else f"at the {pos}"
    return [f"a {size_word} {c} {s} {where} on {_a(bg)} background",
            f"{_a(bg)} picture with one {size_word} {c} {name} {where}"]


def _pair_captions(rng, a, b, vertical):
    (ca, sa), (cb, sb) = a, b
    rel, inv = ("above", "below") if vertical else ("left of", "right of")
    first = "top" if vertical else "left"
    na, nb = rng.choice(SYNONYMS[sa]), rng.choice(SYNONYMS[sb])
    return [f"{_a(ca)} {sa} {rel} {_a(cb)} {sb}",
            f"{_a(cb)} {nb} {inv} {_a(ca)} {na}",
            f"{_a(ca)} {na} and {_a(cb)} {nb}, the {sa} on the {first}"]


def _triple_captions(objs, vertical):
    words = [f"{_a(c)} {s}" for c, s, *_ in objs]
    order = "from top to bottom" if vertical else "from left to right"
    return [f"{words[0]}, {words[1]} and {words[2]} {order}",
            f"three shapes {order}: " + ", ".join(f"{c} {s}" for c, s, *_ in objs)]


def synthesize(out, n: int = 1000, seed: int = 0, size: int = 64, relational: float = 0.5, progress=None) -> dict:
    """Write OUT/images/*.png and OUT/captions.csv (image,caption,split,negative). Same seed, same bytes.

    `relational` is the share of scenes drawn as swap pairs; the rest are split evenly between one-object
    and three-object scenes.
    """
    if not 0.0 <= relational <= 1.0:
        raise DatasetError(f"relational must be between 0 and 1, got {relational}")
    n, size = count("n", n, 1, MAX_SYNTH_IMAGES, optional=False), count("size", size, MIN_SIZE, MAX_SIZE, optional=False)
    seed = count("seed", seed, 0, MAX_SEED, optional=False)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    used: set = set()
    rows: list[tuple] = []
    counts = {"train": 0, "val": 0, "test": 0}
    i = 0

    def split_for():
        u = rng.random()
        return "train" if u < 0.8 else ("val" if u < 0.9 else "test")

    def emit(objects, bg, caps, negs, split):
        nonlocal i
        name = f"images/{i:05d}.png"
        _render(objects, bg, size, out / name)
        for c, neg in zip(caps, negs):
            rows.append((name, c, split, neg or ""))
        counts[split] += 1
        i += 1
        if progress:
            progress(i, n, stage="synth")

    attempts = 0
    while i < n and attempts < 50 * n:
        attempts += 1
        kind = rng.random()
        bg = rng.choice(list(BACKGROUNDS))
        if kind < relational and n - i >= 2:  # relational swap pair
            ca, cb = rng.sample(list(COLOURS), 2)
            sa, sb = rng.sample(SHAPES, 2)
            vertical = rng.random() < 0.4
            key_a, key_b = ("pair", ca, sa, cb, sb, vertical), ("pair", cb, sa, ca, sb, vertical)
            if key_a in used or key_b in used:
                continue
            used.update({key_a, key_b})
            pa, pb = (POSITIONS["top"], POSITIONS["bottom"]) if vertical else (POSITIONS["left"], POSITIONS["right"])
            jit = [(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)) for _ in range(2)]
            pa, pb = (pa[0] + jit[0][0], pa[1] + jit[0][1]), (pb[0] + jit[1][0], pb[1] + jit[1][1])
            ra, rb = rng.choice((0.14, 0.18)), rng.choice((0.14, 0.18))
            split = split_for()
            state = rng.getstate()
            caps_a = _pair_captions(rng, (ca, sa), (cb, sb), vertical)
            rng.setstate(state)  # same synonyms for the swap, so captions differ only in colours
            caps_b = _pair_captions(rng, (cb, sa), (ca, sb), vertical)
            emit([(ca, sa, pa, ra), (cb, sb, pb, rb)], bg, caps_a, caps_b, split)
            emit([(cb, sa, pa, ra), (ca, sb, pb, rb)], bg, caps_b, caps_a, split)
        elif kind < relational + (1 - relational) / 2:  # one object
            c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            pos, big = rng.choice(list(POSITIONS)), rng.random() < 0.5
            key = ("one", c, s, pos, big, bg)
            if key in used or COLOURS[c] == BACKGROUNDS[bg]:
                continue
            used.add(key)
            fx, fy = POSITIONS[pos]
            caps = _single_captions(rng, c, s, "large" if big else "small", pos, bg)
            emit([(c, s, (fx, fy), 0.24 if big else 0.13)], bg, caps, [None] * len(caps), split_for())
        else:  # three objects in a row
            cols = rng.sample(list(COLOURS), 3)
            shapes = [rng.choice(SHAPES) for _ in range(3)]
            vertical = rng.random() < 0.3
            key = ("three", tuple(cols), tuple(shapes), vertical)
            if key in used:
                continue
            used.add(key)
            coords = [(0.5, f) if vertical else (f, 0.5) for f in (0.18, 0.5, 0.82)]
            objs = [(c, s, xy, 0.12) for c, s, xy in zip(cols, shapes, coords)]
            caps = _triple_captions(objs, vertical)
            emit(objs, bg, caps, [None] * len(caps), split_for())
    with open(out / "captions.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["image", "caption", "split", "negative"])
        w.writerows(rows)
    return {"out": str(out), "images": i, "captions": len(rows), "splits": counts, "seed": seed, "size": size}
