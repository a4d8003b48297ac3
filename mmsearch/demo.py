"""The offline end-to-end demo: synthesise captioned images, train mmsearch-tiny and its fusion re-ranker,
index the held-out images, run example queries plain and re-ranked, and report held-out recall@k both
ways. Reports through `log` (one line at a time)."""
from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from mmsearch.config import ModelSpec, TINY_MODEL

DEMO_IMAGES = 1500
MIN_DEMO_IMAGES = 100  # train, val and test splits of a few batches each
DEMO_TRAIN = dict(steps=300, batch_size=64, lr=1e-3, val_every=3)
DEMO_RERANKER = dict(steps=500, batch_size=64, lr=1e-3)
DEMO_SEED = 0


def _test_rows(data_dir: Path) -> list[dict]:
    with open(data_dir / "captions.csv", newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["split"] == "test"]


def _example_captions(rows: list[dict], n: int) -> list[str]:
    """The first caption of n test images spread over the split: different scenes, not one swap pair."""
    firsts: dict = {}
    for r in rows:
        firsts.setdefault(r["image"], r["caption"])
    images = sorted(firsts)
    return [firsts[images[i * len(images) // n]] for i in range(n)]


def _side_by_side(plain, reranked, truth: str) -> list[str]:
    """Top hits of both rankings in two columns; the image the caption was written for is marked *."""
    def cell(h, score):
        return f"{h.rank}. {score:.3f} {Path(h.path).name}{' *' if h.path == truth else '  '}"
    lines = [f"      {'dual encoder (cosine)':<24}re-ranked (blend of ITM and cosine)"]
    for a, b in zip(plain, reranked):
        lines.append(f"      {cell(a, a.similarity):<24}{cell(b, b.score)}")
    return lines


def run_demo(out, n: Optional[int] = None, steps: Optional[int] = None, reranker_steps: Optional[int] = None,
             log: Callable[[str], None] = print, progress_factory=None) -> dict:
    from mmsearch.checks import count
    from mmsearch.datasets.readers import load_dataset, synthesize
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.evaluation.evaluate import evaluate, render_markdown
    from mmsearch.indexing.pipeline import index_folders
    from mmsearch.search.query import Searcher
    from mmsearch.rerank.model import Reranker
    from mmsearch.train.reranker import train_reranker
    from mmsearch.storage.store import IndexStore
    from mmsearch.train import train_encoder

    n, steps = count("n", n, MIN_DEMO_IMAGES), count("steps", steps)
    reranker_steps = count("reranker_steps", reranker_steps)
    out = Path(out)
    bar = progress_factory or (lambda desc, unit="it": None)
    t0 = time.perf_counter()
    started: list = []

    def stage(line: str) -> None:
        """A numbered stage line; the previous stage's wall time first, so a user sees where time goes."""
        if started:
            log(f"    ({time.perf_counter() - started[-1]:.0f}s)")
        started.append(time.perf_counter())
        log(line)

    data = out / "data"
    stage(f"1/6 synthesising {n or DEMO_IMAGES} captioned images into {data}")
    synthesize(data, n=n or DEMO_IMAGES, seed=DEMO_SEED, size=64)

    ckpt = out / "mmsearch-tiny.pt"
    cfg = dict(DEMO_TRAIN, steps=steps or DEMO_TRAIN["steps"])
    stage(f"2/6 training {TINY_MODEL} for {cfg['steps']} steps (batch {cfg['batch_size']}) -> {ckpt}")
    p = bar("train", "step")
    res = train_encoder(data / "captions.csv", ModelSpec(model=TINY_MODEL, pretrained=None), ckpt,
                        progress=p, log=lambda line: log("    " + line), **cfg)
    if p is not None:
        p.close()

    rr = out / "reranker.pt"
    rcfg = dict(DEMO_RERANKER, steps=reranker_steps or DEMO_RERANKER["steps"])
    stage(f"3/6 training the fusion re-ranker for {rcfg['steps']} steps over the frozen towers -> {rr}")
    p = bar("train-reranker", "step")
    rres = train_reranker(data / "captions.csv", ckpt, rr, progress=p, log=lambda line: log("    " + line), **rcfg)
    if p is not None:
        p.close()

    rows = _test_rows(data)
    test_images = sorted({str((data / r["image"]).resolve()) for r in rows})
    idx = out / "index"
    if (idx / "catalog.db").is_file():  # the demo's own index from an earlier run, of an older model
        shutil.rmtree(idx)
    stage(f"4/6 indexing the {len(test_images)} held-out test images into {idx}, with re-ranker tokens")
    p = bar("embed")
    summary = index_folders(idx, test_images, spec=ModelSpec(checkpoint=str(ckpt)), reranker=str(rr), progress=p)
    if p is not None:
        p.close()
    log(f"    added {summary.added}, failed {summary.failed} in {summary.seconds:.1f}s")

    stage("5/6 example queries (top 3; the image the caption describes is marked *)")
    searcher = Searcher(IndexStore.open(idx))
    truth = {}
    for r in rows:
        truth.setdefault(r["caption"], str((data / r["image"]).resolve()))
    for caption in _example_captions(rows, 4):
        log(f'    "{caption}"')
        for line in _side_by_side(searcher.search(caption, k=3, rerank=False), searcher.search(caption, k=3),
                                  truth[caption]):
            log(line)
    q = test_images[0]
    log(f"    image query {Path(q).name}:")
    for h in searcher.search(images=[q], k=3):
        log(f"      {h.rank}. {h.score:.3f} {Path(h.path).name}")

    stage("6/6 held-out recall@k (CLIP_benchmark definitions), plain and re-ranked")
    ds = load_dataset(data / "captions.csv", split="test")
    p = bar("eval")
    report = evaluate(load_encoder(ModelSpec(checkpoint=str(ckpt))), ds, ks=(1, 5, 10), reranker=Reranker.load(rr),
                      progress=p)
    if p is not None:
        p.close()
    for line in render_markdown(report).splitlines():
        log("    " + line)
    chance = 1.0 / max(1, report["n_images"])
    log(f"    ({time.perf_counter() - started[-1]:.0f}s)")
    elapsed = time.perf_counter() - t0
    log(f"done in {elapsed:.0f}s; chance R@1 for text->image is {chance:.3f}. Try:\n"
        f'    mmsearch search "a red circle left of a blue square" --index {idx}             # re-ranked\n'
        f'    mmsearch search "a red circle left of a blue square" --index {idx} --no-rerank')
    return {"report": report, "train": res, "train_reranker": rres, "seconds": elapsed, "index": str(idx),
            "checkpoint": str(ckpt), "reranker": str(rr)}
