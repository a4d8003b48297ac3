"""mmsearch vs rclip 3.3.0, side by side, whole processes as a user runs them (medians of --runs).

    python benchmarks/vs_rclip.py [--runs 3] [--precisions fp32,int8] [--n-big 200] [--n-small 500]

Both tools run ViT-B-32-256 with random weights (speed does not depend on them), offline:
rclip is installed from the package index into its own venv (benchmarks/.cache/rclip-venv) and given
random-init ONNX files exported here from open_clip, in the layout its model loader looks for
($RCLIP_DATADIR/ViT-B-32-256-datacomp_s34b_b86k/{visual,textual}.onnx + the BPE vocabulary);
mmsearch runs `index --model ViT-B-32-256 --pretrained none [--precision P]`. The two tools alternate
run by run, so a noisy neighbour hits both alike. Rows: cold index of 200 × 12 MP and 500 × 500×375
JPEG, unchanged re-run, fresh-process text query, and 10 new photos (new content each time: rclip
reuses the vector of bytes it has seen) into an existing 500-photo index. Prints a Markdown table
and writes benchmarks/results/vs_rclip.json with every run and the load average before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

from common import load_average, machine, machine_line, write_results

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RCLIP_VERSION = "3.3.0"
RCLIP_MODEL = "ViT-B-32-256-datacomp_s34b_b86k"
MODEL = "ViT-B-32-256"


# ---- rclip, offline ------------------------------------------------------------------------------
def rclip_venv(venv: Path) -> Path:
    exe = venv / "bin" / "rclip"
    if not exe.exists():
        # a plain venv of the system Python: rclip gets only what its own requirements pull in
        subprocess.run([shutil.which("python3") or sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"rclip=={RCLIP_VERSION}"],
                       check=True)
    return exe


def rclip_models(datadir: Path) -> None:
    """Random-init open_clip ViT-B-32-256 as the two ONNX files rclip loads (unnormalised outputs)."""
    model_dir = datadir / RCLIP_MODEL
    if (model_dir / "visual.onnx").exists() and (model_dir / "textual.onnx").exists():
        return
    import logging
    import warnings

    import open_clip
    import torch

    warnings.filterwarnings("ignore")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    (datadir / "tokenizer").mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, pretrained=None).eval()

    class Visual(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.encode_image(x)

    class Textual(Visual):
        def forward(self, t):
            return self.m.encode_text(t)

    torch.backends.mha.set_fastpath_enabled(False)
    kw = dict(input_names=["input"], output_names=["output"], opset_version=17, dynamo=False,
              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    with torch.no_grad():
        torch.onnx.export(Visual(model), (torch.zeros(1, 3, 256, 256),), str(model_dir / "visual.onnx"), **kw)
        torch.onnx.export(Textual(model), (torch.zeros(1, 77, dtype=torch.long),), str(model_dir / "textual.onnx"), **kw)
    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copy2(vocab, datadir / "tokenizer" / vocab.name)
    for name in ("LICENSE", "OPENAI-CLIP-MIT.txt", "README.md", "THIRD_PARTY_NOTICES.md"):
        (datadir / name).write_text("placeholder for an offline benchmark: random weights, not the real model\n")


# ---- photos --------------------------------------------------------------------------------------
def _photo(job) -> None:
    """Photo-like JPEG: smooth colour field + shapes + per-image noise (~3 MB at 12 MP, q90); every
    file differs, so rclip's hash de-duplication never applies."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, seed, w, h = job
    rng = np.random.default_rng(seed)
    lw, lh = int(rng.integers(3, 14)), int(rng.integers(3, 10))
    img = Image.fromarray(rng.integers(0, 256, (lh, lw, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(8, 60))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 60, w // 3)), y0 + int(rng.integers(h // 60, h // 3))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.integers(0, 2) else d.rectangle)((x0, y0, x1, y1), fill=col)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * float(rng.uniform(6, 14))
    tmp = path.with_suffix(".tmp")
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(tmp, format="JPEG", quality=90)
    os.replace(tmp, path)


def make_photos(folder: Path, n: int, w: int, h: int, seed0: int, pool: Pool) -> None:
    """`n` of `_photo`'s JPEGs, in parallel. Not common.make_photos: these are other images (a random
    colour field per file, in parallel, one seed a file), the ones this comparison has been measured on."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"img_{i:05d}.jpg", seed0 + i, w, h) for i in range(n)]
    pool.map(_photo, [j for j in jobs if not j[0].exists()], chunksize=2)


# ---- timing --------------------------------------------------------------------------------------
SUMMARIES = []  # mmsearch's --json summaries: where the embedding phase spent its time


def timed(cmd, cwd=None, env=None) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): {' '.join(map(str, cmd))}\n{res.stderr[-2000:]}")
    if "--json" in cmd:
        try:
            s = json.loads(res.stdout.strip().splitlines()[-1])
            SUMMARIES.append({k: s.get(k) for k in ("embedded", "seconds", "embed_seconds", "encode_seconds",
                                                     "wait_seconds", "images_per_s")}
                             | {"wall_s": round(wall, 3), "precision": cmd[cmd.index("--precision") + 1],
                                "index": Path(cmd[cmd.index("--index") + 1]).name})
        except (ValueError, IndexError):
            pass
    return wall


class Tools:
    def __init__(self, rclip: Path, datadir: Path, work: Path, precisions):
        self.rclip, self.work, self.precisions = rclip, work, precisions
        # both tools start as a user's Python does, writing and reusing bytecode (an environment with
        # PYTHONDONTWRITEBYTECODE=1 recompiles every module at every start: +0.1-0.3 s a process here)
        base = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.renv = dict(base, RCLIP_DATADIR=str(datadir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # mmsearch keeps exported towers per model (mmsearch.towers.cache), as rclip keeps its ONNX files
        self.mcache = work / "mmsearch-cache"
        self.menv = dict(base, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                         MMSEARCH_CACHE_DIR=str(self.mcache))
        self.mm = [sys.executable, "-m", "mmsearch"]
        self.datadir = datadir

    def names(self):
        return ["rclip"] + [f"mmsearch {p}" for p in self.precisions]

    def rclip_db_reset(self):
        for f in self.datadir.glob("db.sqlite3*"):
            f.unlink()

    def index_dir(self, name, tag):
        return self.work / f"idx-{name.split()[-1].replace('/', '-')}-{tag}"

    def index(self, name, folder, tag, cold):
        if name == "rclip":
            if cold:
                self.rclip_db_reset()
            return timed([self.rclip, "-t", "1", "a dog"], cwd=folder, env=self.renv)
        idx = self.index_dir(name, tag)
        if cold:
            shutil.rmtree(idx, ignore_errors=True)
        prec, _, flag = name.split()[-1].partition("/")  # "fp32/no-ocr": like rclip, no words read
        return timed(self.mm + ["index", folder, "--index", idx, "--model", MODEL, "--pretrained", "none",
                                "--precision", prec, "--json"] + ([f"--{flag}"] if flag else []), env=self.menv)

    def query(self, name, folder, tag):
        if name == "rclip":
            return timed([self.rclip, "-n", "-t", "10", "a dog"], cwd=folder, env=self.renv)
        return timed(self.mm + ["search", "a dog", "--index", self.index_dir(name, tag), "-k", "10"], env=self.menv)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--precisions", default="fp32,int8",
                    help="mmsearch precisions to time (comma-separated); P/no-ocr: P without reading the words "
                         "(rclip reads none; OCR is on by default)")
    ap.add_argument("--n-big", type=int, default=200)
    ap.add_argument("--n-small", type=int, default=500)
    ap.add_argument("--n-new", type=int, default=10)
    ap.add_argument("--cache", type=Path, default=CACHE / "vs_rclip")
    ap.add_argument("--rclip-venv", type=Path, default=CACHE / "rclip-venv")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "vs_rclip.json")
    ap.add_argument("--setup-only", action="store_true", help="install, export and generate, then stop")
    ap.add_argument("--startup-only", action="store_true",
                    help="only the unchanged re-run and the fresh-process text query, on the indexes an earlier "
                         "full run left in the cache (to JSON --out)")
    args = ap.parse_args(argv)
    precisions = [p for p in args.precisions.split(",") if p]

    t0 = time.perf_counter()
    rclip = rclip_venv(args.rclip_venv)
    datadir = args.cache / "rclip-data"
    rclip_models(datadir)
    big, small = args.cache / "big_4000x3000", args.cache / "small_500x375"
    with Pool(os.cpu_count()) as pool:
        make_photos(big, args.n_big, 4000, 3000, 0, pool)
        make_photos(small, args.n_small, 500, 375, 100_000, pool)
    print(f"setup (venv, ONNX export, photos) {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    if args.setup_only:
        return
    work = args.cache / "work"
    work.mkdir(exist_ok=True)
    tools = Tools(rclip, datadir, work, precisions)
    names = tools.names()
    times = {}  # (row, tool) -> [seconds]
    load_before = load_average()
    first = {}

    def report(final=False):
        """Table + JSON after every measurement: a run cut short still leaves what it measured."""
        med = {k: statistics.median(v) for k, v in times.items()}
        rows = list(dict.fromkeys(r for r, _ in times))
        lines = ["| | rclip | " + " | ".join(f"{n} | rclip / {n.split()[-1]}" for n in names[1:]) + " |",
                 "|---" * (2 * len(names)) + "|"]
        for r in rows:
            cells = [f"{med[(r, 'rclip')]:.2f} s" if (r, "rclip") in med else "—"]
            for n in names[1:]:
                ok = (r, n) in med and (r, "rclip") in med
                cells += [f"{med[(r, n)]:.2f} s" if (r, n) in med else "—",
                          f"**{med[(r, 'rclip')] / med[(r, n)]:.2f}×**" if ok else "—"]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        if first:
            lines.append("| first index of the model on this machine (torch + export, once; rclip: its download) | — | "
                         + " | ".join(f"{first[n]:.2f} s | —" for n in names[1:] if n in first) + " |")
        lines.append(f"({'medians of ' + str(args.runs) if final else 'PARTIAL'}; load average before {load_before}, "
                     f"now {load_average()}; {os.cpu_count()} CPUs; {platform.machine()})")
        m = machine()
        lines.append(machine_line(m))
        result = {"complete": final, "runs": args.runs, "load_before": load_before, "load_after": load_average(),
                  "cpu_count": os.cpu_count(), "rclip_version": RCLIP_VERSION, "model": MODEL, "precisions": precisions,
                  "rows": {r: {n: {"median_s": round(med[(r, n)], 3), "runs_s": [round(v, 3) for v in times[(r, n)]]}
                               for n in names if (r, n) in med} for r in rows},
                  "first_index_of_model_s": {n: round(v, 3) for n, v in first.items()},
                  "mmsearch_summaries": SUMMARIES, "table": lines, "total_s": round(time.perf_counter() - t0, 1),
                  "machine": m}
        write_results(args.out, result, ensure_ascii=False)
        if final:
            print("\n".join(lines))
            print(f"wrote {args.out}", file=sys.stderr)

    def rec(row, name, seconds):
        times.setdefault((row, name), []).append(seconds)
        print(f"  {row:<40} {name:<14} {seconds:7.2f}s  load {load_average()[0]:.2f}", file=sys.stderr)
        report()

    def startup_rows():
        """The two rows that are mostly process start-up, on the small-photo indexes."""
        for _ in range(args.runs):
            for name in names:
                rec("unchanged re-run", name, tools.index(name, small, "small", cold=False))
        for _ in range(args.runs):
            for name in names:
                rec("fresh-process text query", name, tools.query(name, small, "small"))

    if args.startup_only:
        for name in names:  # bytecode written, caches warm: as every start after a user's first
            tools.index(name, small, "small", cold=False)
            tools.query(name, small, "small")
        startup_rows()
        report(final=True)
        return
    # the first index of a model on a machine loads torch and exports the towers (then cached): once
    shutil.rmtree(tools.mcache, ignore_errors=True)
    few = work / "first-photos"
    shutil.rmtree(few, ignore_errors=True)
    few.mkdir()
    for f in sorted(small.glob("img_*.jpg"))[: args.n_new]:
        shutil.copy2(f, few / f.name)
    for name in names[1:]:
        first[name] = tools.index(name, few, "first", cold=True)
        print(f"  first index of the model ({args.n_new} photos)  {name:<14} {first[name]:7.2f}s", file=sys.stderr)

    # most telling rows first (small photos, the incremental run), so a run cut short still answers them
    small_row = f"{args.n_small} × 500×375 JPEG, cold"
    for _ in range(args.runs):
        for name in names:
            rec(small_row, name, tools.index(name, small, "small", cold=True))
    # 10 new photos into the existing 500-photo index: new content every run (rclip reuses the vector of
    # bytes it has seen); every index is first brought back to the 500 photos, untimed
    row = f"{args.n_new} new photos into a {args.n_small}-photo index"
    seed = 900_000
    with Pool(os.cpu_count()) as pool:
        for r in range(args.runs):
            for name in names:
                for other in names:
                    tools.index(other, small, "small", cold=False)
                new = [small / f"new_{seed + i}.jpg" for i in range(args.n_new)]
                pool.map(_photo, [(p, seed + i, 500, 375) for i, p in enumerate(new)])
                seed += args.n_new
                rec(row, name, tools.index(name, small, "small", cold=False))
                for p in new:
                    p.unlink()
    for name in names:  # the last tool's index still holds its new photos: every index back to the folder
        tools.index(name, small, "small", cold=False)
    startup_rows()
    big_row = f"{args.n_big} × 12 MP JPEG, cold"
    for _ in range(args.runs):
        for name in names:
            rec(big_row, name, tools.index(name, big, "big", cold=True))
    for _ in range(args.runs):
        for name in names:
            rec("unchanged re-run (12 MP)", name, tools.index(name, big, "big", cold=False))
    report(final=True)


if __name__ == "__main__":
    main()
