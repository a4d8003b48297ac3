"""Fusion re-ranker benchmark: text→image recall@k with and without re-ranking the top K, and its cost.

    python benchmarks/rerank.py [--n 6000] [--encoder-steps 600] [--reranker-steps 2000] [--ks 8 16 32 64]

Trains (once, cached under benchmarks/.cache/) mmsearch-tiny and its re-ranker on the *same* training
split of a synthetic set, then measures on the held-out test split:
  * all test captions against all test images, plain vs re-ranked top K, for each K;
  * the relational captions alone (each one's swapped scene is in the gallery), same table;
  * true-vs-swap: each relational caption against exactly its image and its attribute-swapped scene;
  * ms per query for re-ranking K candidates, with this model and with random ViT-B-32-sized towers.
Re-ranked rows use the score users get by default: the blend of ITM probability and similarity that
train-reranker fitted on the validation split; one row per group shows the ITM score alone (alpha 0).
Prints Markdown tables and writes benchmarks/results/rerank.json.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from common import machine, machine_line, write_results

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

from mmsearch.rerank.blend import blend  # noqa: E402
from mmsearch.config import TINY_MODEL, ModelSpec  # noqa: E402
from mmsearch.datasets.readers import load_dataset  # noqa: E402
from mmsearch.towers.encoder import load_encoder  # noqa: E402
from mmsearch.evaluation.evaluate import embed_dataset  # noqa: E402
from mmsearch.evaluation.metrics import reranked_ranks, summarize, text_to_image_ranks, topk  # noqa: E402
from mmsearch.rerank.model import FusionModel, Reranker  # noqa: E402
from mmsearch.train.reranker import train_reranker  # noqa: E402
from mmsearch.datasets.synth import synthesize  # noqa: E402
from mmsearch.train import train_encoder  # noqa: E402


def prepare(args) -> tuple[Path, Path, Path]:
    """Synthetic data, encoder and re-ranker, trained on the same training split; cached by config."""
    cache = HERE / ".cache" / f"rerank-n{args.n}-e{args.encoder_steps}-r{args.reranker_steps}"
    data = cache / "data" / "captions.csv"
    enc, rr = cache / "encoder.pt", cache / "reranker.pt"
    if not data.exists():
        print(f"synthesising {args.n} images -> {data.parent}", flush=True)
        synthesize(data.parent, n=args.n, seed=0, size=64)
    t = time.perf_counter()
    if not enc.exists():
        print(f"training {TINY_MODEL}: {args.encoder_steps} steps", flush=True)
        train_encoder(data, ModelSpec(model=TINY_MODEL, pretrained=None), enc, steps=args.encoder_steps,
                      batch_size=64, lr=1e-3, log=lambda line: print("   ", line, flush=True))
    if not rr.exists():
        print(f"training the re-ranker: {args.reranker_steps} steps", flush=True)
        train_reranker(data, enc, rr, steps=args.reranker_steps, lr=1e-3,
                       log=lambda line: print("   ", line, flush=True))
    return data, enc, rr


def time_rerank(score, k: int, queries: int, repeat: int = 3) -> float:
    """Median ms per query of `score(q, k)` over `queries` queries."""
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for q in range(queries):
            score(q, k)
        runs.append((time.perf_counter() - t) * 1000 / queries)
    return statistics.median(runs)


def _ms(latency: dict, column: str) -> str:
    """A latency cell; blank for the dual encoder, which re-scores nothing."""
    return f"{latency[column]:.1f}" if column in latency else ""


def block(ranks_plain, cands, scores, is_pos, k, rows, ks):
    new = reranked_ranks(ranks_plain[rows], cands[rows, :k], scores[rows, :k], lambda q, c: is_pos(rows[q], c))
    return summarize(new, ks)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000, help="synthetic images (80%% train, 10%% val, 10%% test)")
    ap.add_argument("--encoder-steps", type=int, default=600)
    ap.add_argument("--reranker-steps", type=int, default=2000)
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32, 64], help="re-ranking depths K")
    ap.add_argument("--timing-queries", type=int, default=200)
    ap.add_argument("--data", type=Path, help="use this dataset and these checkpoints instead of training")
    ap.add_argument("--encoder", type=Path)
    ap.add_argument("--reranker", type=Path)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "rerank.json")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    if args.data and args.encoder and args.reranker:
        data, enc_path, rr_path = args.data, args.encoder, args.reranker
    else:
        data, enc_path, rr_path = prepare(args)
    encoder, reranker = load_encoder(ModelSpec(checkpoint=str(enc_path))), Reranker.load(rr_path)
    ds = load_dataset(data, split="test")
    img, txt, toks, states = embed_dataset(encoder, ds, token_grid=reranker.token_grid, with_states=True)
    toks = toks.astype(np.float32)
    cap_img = ds.caption_image
    plain = text_to_image_ranks(txt, img, cap_img)
    kmax = max(args.ks)
    cands, sims = topk(txt, img, kmax)
    alpha = reranker.alpha["text_to_image"]
    # an ITM score depends only on (query, candidate): scoring the top kmax once gives every K's prefix
    logits = np.stack([reranker.score_text_to_images(states[q], toks[cands[q]]) for q in range(len(txt))])
    scores = blend(logits, sims, alpha)
    is_pos = lambda q, c: cap_img[q] == c  # noqa: E731
    swap = ds.swap_images()
    groups = {"all captions": np.arange(len(txt)), "relational captions": np.flatnonzero(swap >= 0)}
    rng = np.random.default_rng(0)
    sample = rng.choice(len(txt), min(args.timing_queries, len(txt)), replace=False)

    def score_tiny(q, k):
        reranker.score_text_to_images(states[sample[q]], toks[cands[sample[q], :k]])

    big = Reranker(FusionModel(512, 768, toks.shape[1], **{k: reranker.model.config[k] for k in ("d", "layers", "heads")}),
                   "random")
    big_states = rng.standard_normal((12, 512)).astype(np.float32)  # a 10-word query with start/end tokens
    big_toks = rng.standard_normal((kmax, toks.shape[1], 768)).astype(np.float32)

    def score_big(q, k):
        big.score_text_to_images(big_states, big_toks[:k])

    ks = (1, 5, 10)
    result = {"n_test_images": len(ds.images), "n_test_captions": len(ds.captions),
              "n_relational": int((swap >= 0).sum()), "encoder": str(enc_path), "reranker": str(rr_path),
              "alpha": alpha,
              "config": vars(args) | {"out": str(args.out)}, "groups": {}, "latency_ms": {}}
    for name, rows in groups.items():
        g = {"plain": summarize(plain[rows], ks)}
        for k in args.ks:
            g[f"K={k}"] = block(plain, cands, scores, is_pos, k, rows, ks)
        g[f"K={min(32, kmax)}, ITM alone"] = block(plain, cands, logits, is_pos, min(32, kmax), rows, ks)
        result["groups"][name] = g
    for k in args.ks:
        result["latency_ms"][f"K={k}"] = {"demo model": round(time_rerank(score_tiny, k, len(sample)), 2),
                                          "ViT-B-32-sized, random": round(time_rerank(score_big, k, 50), 2)}
    rel = groups["relational captions"]
    true_i, swap_i = cap_img[rel], swap[rel]
    plain_win = np.einsum("nd,nd->n", txt[rel], img[true_i]) > np.einsum("nd,nd->n", txt[rel], img[swap_i])
    def wins(c, t, s):
        score = blend(reranker.score_text_to_images(states[c], toks[[t, s]]), img[[t, s]] @ txt[c], alpha)
        return score[0] > score[1]

    rr_win = np.array([wins(c, t, s) for c, t, s in zip(rel, true_i, swap_i)])
    result["true_vs_swap_R@1"] = {"plain": float(plain_win.mean()), "re-ranked": float(rr_win.mean())}

    print(f"\n{len(ds.images)} held-out test images, {len(ds.captions)} captions "
          f"({result['n_relational']} relational, each with its swapped scene in the gallery)\n")
    print("| queries | ranking | R@1 | R@5 | R@10 | mean rank | ms/query (demo model) | ms/query (ViT-B-32-sized) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, g in result["groups"].items():
        for label, m in g.items():
            lat = result["latency_ms"].get(label.split(",")[0], {})
            print(f"| {name} | {'dual encoder' if label == 'plain' else 're-ranked ' + label} | "
                  f"{100 * m['R@1']:.1f} | {100 * m['R@5']:.1f} | {100 * m['R@10']:.1f} | {m['mean_rank']:.2f} | "
                  f"{_ms(lat, 'demo model')} | {_ms(lat, 'ViT-B-32-sized, random')} |")
    ts = result["true_vs_swap_R@1"]
    print(f"\ntrue vs swapped scene (gallery of 2), R@1: dual encoder {100 * ts['plain']:.1f}, "
          f"re-ranked {100 * ts['re-ranked']:.1f}; score blend alpha {alpha:g} (fitted on validation)")
    result["machine"] = machine()
    print(machine_line(result["machine"]))
    write_results(args.out, result, default=str)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
