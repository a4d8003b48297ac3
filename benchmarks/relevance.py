"""Does the good-match flag tell a search whose image is in the index from one whose image is gone?
The measurement behind `--good-only` and its default threshold (mmsearch/search/relevance.py).

    PYTHONPATH=. python benchmarks/relevance.py [--checkpoint demo-out/mmsearch-tiny.pt --data demo-out/data]
        [--n 300 --steps 40]  (a quick check; the defaults are the demo's data and model, cached in benchmarks/.cache)
        [--seeds 5] [--k 10] [--vec-images 30000] [--vec-dim 256] [--vec-queries 1000]
        [--reranker demo-out/reranker.pt]  (also: the flag on the re-ranked score, text queries of the demo world)

Two worlds, each with text and image queries made from one target image apiece:
- the demo's held-out data: its test split (mmsearch synth, seed 0, 1500 images; the demo's model, or one
  trained here with the demo's recipe). Text queries are the test captions; image queries are edited
  copies of the test images (crop 5-15 %, brightness +-20 %, JPEG 50-85).
- synthvec (mmsearch/datasets/synthvec.py): clustered CLIP-like vectors; text queries off the manifold
  by the modality gap, image queries near copies (paired_queries).
For each of --seeds random halvings, the targets of one half are removed from the index. Every query
returns its top k by exact cosine; a hit is a true match when it is the query's target. The flag is
judged per hit: recall = true matches flagged good / true matches returned; a false good = a flagged hit
that is not the target (in a query whose target was removed, every flagged hit is one). Compared, at
recall >= 0.9 of true matches: the best fixed cosine cut-off tuned on the same hits, the calibrated score
with its threshold tuned the same way, and the calibrated score at the shipped default threshold. Also
reported: how often a query whose target is gone gets no good hit at all (the page's "no good match").
Writes benchmarks/results/relevance.json (or --out).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import numpy as np

from common import CACHE, checkpoint_path, data_dir, demo_config, machine_line, train_run, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RECALL = 0.9


def at_recall(scores: np.ndarray, truth: np.ndarray, target: float = TARGET_RECALL) -> float:
    """The highest threshold whose flag (score >= threshold) keeps `target` of the true matches."""
    ts = np.sort(scores[truth])[::-1]
    return float(ts[max(0, int(np.ceil(target * len(ts))) - 1)])


def judge(scores, truth, absent, threshold) -> dict:
    good = scores >= threshold
    tp, fp = int((good & truth).sum()), int((good & ~truth).sum())
    return {"threshold": round(float(threshold), 4), "recall": round(tp / max(1, truth.sum()), 4),
            "precision": round(tp / max(1, tp + fp), 4), "false_good": fp,
            "absent_without_good": round(float((~good[absent].any(1)).mean()), 4) if absent.any() else None}


def oracle_false_goods(truth: np.ndarray, target: float = TARGET_RECALL) -> float:
    """The fewest false goods any flag that is monotone in each query's own cosine order can have at
    `target` recall, whatever its per-query threshold: flagging a true match at rank r flags the r - 1
    hits above it, a query whose target is gone flags nothing, and the cheapest true matches are taken
    first. A calibrated score is such a flag (a per-query rescaling of the cosine), so it cannot beat
    the fixed cut-off by more than fixed / oracle."""
    ranks = np.sort(np.nonzero(truth)[1])  # rank of each returned true match (one per query at most)
    need = int(np.ceil(target * len(ranks)))
    return float(ranks[:need].sum())


def family_best_ratio(cos, z, truth, absent, tries: int, seed: int = 1) -> dict:
    """How far a broad family of per-query rules gets, each TUNED ON THE SAME HITS (so an optimistic bound
    that still respects what a rule can see: a query's own cosines and z-scores, never the truth): a hit
    is good when conf_q (1 + k) - (cos_best - cos) / m reaches a threshold set for `target` recall,
    conf_q a weighted sum of five standardised features of the query's top hits (cos_1, z_1, cos_1 - cos_2,
    z_1 - z_2, cos_1 - mean cos_2..k), weights drawn at random `tries` times, m and k from a small grid."""
    fixed = judge(cos, truth, absent, at_recall(cos, truth))["false_good"]
    feats = np.stack([cos[:, 0], z[:, 0], cos[:, 0] - cos[:, 1], z[:, 0] - z[:, 1], cos[:, 0] - cos[:, 1:].mean(1)], 1)
    feats = (feats - feats.mean(0)) / np.maximum(feats.std(0), 1e-9)
    rng, best = np.random.default_rng(seed), {"false_good": float("inf")}
    for _ in range(tries):
        conf = feats @ rng.normal(size=feats.shape[1])
        for m in (0.01, 0.02, 0.04, 1.0):
            for k in (0.0, 0.5, 1.0):
                score = conf[:, None] * (1 + k) - (cos[:, :1] - cos) / m
                got = judge(score, truth, absent, at_recall(score, truth))
                if got["false_good"] < best["false_good"]:
                    best = got
    return {"fixed_false_good": fixed, "best_false_good": best["false_good"], "tries": tries,
            "best_ratio": round(fixed / best["false_good"], 3) if best["false_good"] else None}


def hits(queries, targets, base, keep, calibration_of, k):
    """Top-k cosines of each query over base[keep], whether each hit is the target, calibrated scores."""
    sims = queries @ base[keep].T
    top = np.argsort(-sims, 1)[:, :k]
    cos = np.take_along_axis(sims, top, 1)
    cal = calibration_of(base[keep])
    standings = [cal.standing(q) for q in queries]
    z = np.stack([[st.with_best(row[0]).score(c) for c in row] for st, row in zip(standings, cos)])
    plain = (cos - np.array([[st.mean] for st in standings])) / np.array([[st.std] for st in standings])
    return cos, z, keep[top] == targets[:, None], ~np.isin(targets, keep), plain


def evaluate(world: str, base: np.ndarray, kinds: dict, seeds: int, k: int, default: float,
             family_tries: int = 0) -> dict:
    """kinds: name -> (queries [q, d], target row of each query in base)."""
    from mmsearch.search.relevance import SAMPLE_SIZE, Calibration

    rng_sample = np.random.default_rng(0)

    def calibration_of(vectors):  # what an index of these vectors draws: at most SAMPLE_SIZE of them
        pick = rng_sample.choice(len(vectors), min(SAMPLE_SIZE, len(vectors)), replace=False)
        return Calibration(vectors[pick], default)

    per_seed = {name: [] for name in list(kinds) + ["pooled"]}
    every: dict = {}  # name -> each seed's hits, for the rule-family bound
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        targets = np.unique(np.concatenate([t for _, t in kinds.values()]))
        removed = rng.choice(targets, len(targets) // 2, replace=False)
        keep = np.setdiff1d(np.arange(len(base)), removed)
        got = {name: hits(q, t, base, keep, calibration_of, k) for name, (q, t) in kinds.items()}
        got["pooled"] = tuple(np.concatenate([g[i] for g in got.values()]) for i in range(5))
        for name, hit in got.items():
            every.setdefault(name, []).append(hit)
        for name, (cos, z, truth, absent, _) in got.items():
            per_seed[name].append({
                "fixed_cosine": judge(cos, truth, absent, at_recall(cos, truth)),
                "calibrated_tuned": judge(z, truth, absent, at_recall(z, truth)),
                "calibrated_default": judge(z, truth, absent, default),
                "oracle_false_good": oracle_false_goods(truth),
                "true_matches": int(truth.sum()), "hits": int(truth.size)})
    out = {}
    for name, runs in per_seed.items():
        out[name] = {m: {key: round(float(np.mean([r[m][key] for r in runs])), 4) for key in runs[0][m]
                         if runs[0][m][key] is not None} for m in ("fixed_cosine", "calibrated_tuned",
                                                                    "calibrated_default")}
        out[name]["true_matches"] = float(np.mean([r["true_matches"] for r in runs]))
        out[name]["oracle_false_good"] = float(np.mean([r["oracle_false_good"] for r in runs]))
        oracle = out[name]["oracle_false_good"]
        # the most any per-query score could gain over the fixed cut-off (> 2 needed for the target)
        out[name]["best_possible_ratio"] = round(out[name]["fixed_cosine"]["false_good"] / oracle, 3) if oracle else None
        out[name]["hits"] = runs[0]["hits"]
        fc, ct = out[name]["fixed_cosine"]["false_good"], out[name]["calibrated_tuned"]["false_good"]
        out[name]["false_good_ratio"] = round(fc / ct, 3) if ct else None  # > 1: the calibrated flag is better
        if family_tries and name != "pooled":
            cos, _, truth, absent, plain = (np.concatenate([h[i] for h in every[name]]) for i in range(5))
            out[name]["rule_family"] = family_best_ratio(cos, plain, truth, absent, family_tries)
    return {"world": world, "seeds": seeds, "k": k, "kinds": out}


def reranked_text(data: Path, ckpt, reranker_path, seeds: int, k: int, rerank_k: int = 32) -> dict:
    """Text queries of the demo world, re-ranked as a search re-ranks them (the top rerank_k by cosine,
    re-scored by the fusion model, blended with the cosine by the re-ranker's own alpha): does a flag on
    the re-ranked score, or on the ITM probability alone, tell the target from its colour-swapped twin
    better than a fixed cosine cut-off on the plain top k? The same halvings as evaluate()."""
    from mmsearch.config import ModelSpec
    from mmsearch.datasets.readers import load_dataset
    from mmsearch.evaluation.evaluate import embed_dataset
    from mmsearch.rerank.blend import blend
    from mmsearch.rerank.model import Reranker
    from mmsearch.towers.encoder import load_encoder

    rr = Reranker.load(reranker_path)
    ds = load_dataset(data / "captions.csv", split="test")
    img, txt, toks, states = embed_dataset(load_encoder(ModelSpec(checkpoint=str(ckpt))), ds,
                                           token_grid=rr.token_grid, with_states=True)
    alpha, target = rr.alpha["text_to_image"], np.asarray(ds.caption_image)
    cols = {m: [] for m in ("cos", "cos_truth", "blend", "itm", "truth", "absent")}
    for seed in range(seeds):
        removed = np.random.default_rng(seed).choice(len(img), len(img) // 2, replace=False)
        keep = np.setdiff1d(np.arange(len(img)), removed)
        sims = txt @ img[keep].T
        for q, order in enumerate(np.argsort(-sims, 1)[:, :rerank_k]):
            cos, logits = sims[q, order], rr.score_text_to_images(states[q], toks[keep[order]])
            score = blend(logits, cos, alpha)
            top = np.argsort(-score, kind="stable")[:k]
            cols["cos"].append(cos[:k])
            cols["cos_truth"].append(keep[order[:k]] == target[q])
            cols["blend"].append(score[top])
            cols["itm"].append(1 / (1 + np.exp(-logits[top])))
            cols["truth"].append(keep[order[top]] == target[q])
            cols["absent"].append(target[q] not in keep)
    c = {m: np.array(v) for m, v in cols.items()}
    fixed = judge(c["cos"], c["cos_truth"], c["absent"], at_recall(c["cos"], c["cos_truth"]))
    out = {"alpha": alpha, "rerank_k": rerank_k, "reranker": str(reranker_path), "fixed_cosine": fixed}
    for m in ("blend", "itm"):
        out[m] = judge(c[m], c["truth"], c["absent"], at_recall(c[m], c["truth"]))
        out[m]["ratio"] = round(fixed["false_good"] / max(1, out[m]["false_good"]), 3)  # > 1: fewer than fixed
    return out


def edited(path, rng):
    from PIL import Image, ImageEnhance

    im = Image.open(path).convert("RGB")
    w, h = im.size
    c = int(rng.uniform(0.05, 0.15) * w)
    im = ImageEnhance.Brightness(im.crop((c, c, w - c, h - c)).resize((w, h))).enhance(rng.uniform(0.8, 1.2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.uniform(50, 85)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def demo_world(args):
    from PIL import Image

    from mmsearch.config import ModelSpec
    from mmsearch.towers.encoder import load_encoder

    cfg = demo_config()
    cfg.update({k: v for k, v in (("n", args.n), ("steps", args.steps)) if v})
    data = Path(args.data) if args.data else data_dir(CACHE, cfg["n"], cfg["seed"], cfg["size"])
    ckpt = args.checkpoint
    if ckpt is None:  # the demo's model, cached under benchmarks/.cache (trained once, here or by train_synth.py)
        ckpt = checkpoint_path(CACHE, cfg)
        if not ckpt.exists():
            train_run(CACHE, cfg)
    enc = load_encoder(ModelSpec(checkpoint=str(ckpt)))
    with open(data / "captions.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    names = sorted({r["image"] for r in rows})
    base = enc.encode_images([Image.open(data / n).convert("RGB") for n in names])
    texts = enc.encode_texts([r["caption"] for r in rows])
    rng = np.random.default_rng(0)
    copies = enc.encode_images([edited(data / n, rng) for n in names])
    row_of = {n: i for i, n in enumerate(names)}
    kinds = {"text": (texts, np.array([row_of[r["image"]] for r in rows])), "image": (copies, np.arange(len(names)))}
    return base, kinds, {"data": str(data), "checkpoint": str(ckpt), "images": len(names), "captions": len(rows)}


def vec_world(args):
    from mmsearch.datasets import synthvec as sv

    mix = sv.make_mixture(n_clusters=max(10, args.vec_images // 100), dim=args.vec_dim, seed=0)
    base = sv.sample_images(mix, args.vec_images, seed=1)
    targets = np.random.default_rng(5).choice(len(base), min(args.vec_queries, len(base)), replace=False)
    kinds = {"text": (sv.paired_queries(mix, base, targets, "text"), targets),
             "image": (sv.paired_queries(mix, base, targets, "image"), targets)}
    return base, kinds, {"images": len(base), "dim": args.vec_dim, "queries": len(targets)}


def render(result: dict) -> list[str]:
    lines = [f"### {result['world']} ({result['about']})", "",
             "| queries | method | threshold | recall | precision | false good | gone, no good hit |",
             "|---|---|---|---|---|---|---|"]
    for kind, r in result["kinds"].items():
        for method, label in (("fixed_cosine", "best fixed cosine"), ("calibrated_tuned", "calibrated, tuned"),
                              ("calibrated_default", "calibrated, default")):
            m = r[method]
            lines.append(f"| {kind} | {label} | {m['threshold']:.3f} | {m['recall']:.3f} | {m['precision']:.3f} | "
                         f"{m['false_good']:.1f} | {m.get('absent_without_good', float('nan')):.3f} |")
        lines.append(f"| {kind} | per-query oracle (the bound) | | {TARGET_RECALL:.3f} | | {r['oracle_false_good']:.1f} | |")
        lines.append(f"| {kind} | fixed / calibrated false goods | | | | {r['false_good_ratio']} | |")
        lines.append(f"| {kind} | fixed / oracle: the most any per-query score can gain | | | | "
                     f"{r['best_possible_ratio']} | |")
        if "rule_family" in r:
            f = r["rule_family"]
            lines.append(f"| {kind} | fixed / best of {f['tries']} rules tuned on these hits (all seeds) | | "
                         f"{TARGET_RECALL:.3f} | | {f['best_false_good']} of {f['fixed_false_good']} | {f['best_ratio']} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="The demo's model [default: train one, the demo's recipe].")
    ap.add_argument("--data", default=None, help="The demo's data folder [default: synthesise it].")
    ap.add_argument("--n", type=int, default=None, help="Images to synthesise [default: the demo's 1500].")
    ap.add_argument("--steps", type=int, default=None, help="Training steps [default: the demo's].")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("-k", "--k", type=int, default=10)
    ap.add_argument("--vec-images", type=int, default=30000)
    ap.add_argument("--vec-dim", type=int, default=256)
    ap.add_argument("--vec-queries", type=int, default=1000)
    ap.add_argument("--family-tries", type=int, default=1500,
                    help="Random rules of the family tuned in-sample on the demo world's hits (0: skip).")
    ap.add_argument("--reranker", default=None,
                    help="The demo's re-ranker: also judge the flag on re-ranked text queries [default: skip].")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "relevance.json"))
    args = ap.parse_args()
    from mmsearch.config import GOOD_MATCH

    t0 = time.perf_counter()
    default = float(GOOD_MATCH["threshold"])
    results = []
    base, kinds, about = demo_world(args)
    results.append(dict(evaluate("demo held-out", base, kinds, args.seeds, args.k, default, args.family_tries),
                        about=about))
    if args.reranker:
        results[0]["reranked_text"] = reranked_text(Path(about["data"]), about["checkpoint"], args.reranker,
                                                    args.seeds, args.k)
    base, kinds, about = vec_world(args)
    results.append(dict(evaluate("synthvec", base, kinds, args.seeds, args.k, default), about=about))
    out = {"target_recall": TARGET_RECALL, "default_threshold": default, "method": GOOD_MATCH["method"],
           "results": results, "seconds": round(time.perf_counter() - t0, 1)}
    for r in results:
        print("\n".join(render(r)) + "\n")
    if "reranked_text" in results[0]:
        rt = results[0]["reranked_text"]
        print(f"demo text queries re-ranked (top {rt['rerank_k']} re-scored, alpha {rt['alpha']:g}), each flag "
              f"tuned at recall {TARGET_RECALL}; false goods summed over the {args.seeds} halvings\n\n"
              "| flag | threshold | recall | precision | false good | fixed / this |\n|---|---|---|---|---|---|")
        for m, label in (("fixed_cosine", "fixed cosine, plain top k"), ("blend", "re-ranked score"),
                         ("itm", "ITM probability alone")):
            r = rt[m]
            print(f"| {label} | {r['threshold']:.3f} | {r['recall']:.3f} | {r['precision']:.3f} | {r['false_good']} | "
                  f"{r.get('ratio', '')} |")
    print(machine_line())
    write_results(Path(args.out), out)


if __name__ == "__main__":
    main()
