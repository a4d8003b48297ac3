"""What an idle watcher costs: CPU seconds per hour, native events against polling, for a tree of photos.

    PYTHONPATH=. python benchmarks/watch_idle.py [--files 20000] [--per-folder 200] [--seconds 60]
        [--poll 60] [--extrapolate 100000]

Builds a tree of --files empty *.jpg files (--per-folder to a folder; an empty file stats like a photo),
then measures, by the process's CPU time (all threads, Rust's too):
- polling: the walk that compares every image file's size and mtime with the last one (PollSource),
  averaged over a few walks; an hour costs 3600 / --poll walks;
- native: arming one watch per folder (once), then --seconds of idle waiting (NativeSource);
- the watcher's own loop: a Watcher of a 3-image index (mmsearch-tiny, random weights: no training)
  left idle for --seconds in each mode (root checks, ticks), with the tree's walk cost added for polling.
A walk's cost grows with the number of files, an idle native watch's does not (inotify costs no CPU while
nothing changes; the kernel keeps one watch per folder, ~1 KB each), so --extrapolate scales the polling
walk linearly in files and keeps the native figure. Writes benchmarks/results/watch_idle.json.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine_line, write_results

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu() -> float:
    return time.process_time()


def build_tree(root: Path, files: int, per_folder: int) -> int:
    folders = 0
    for i in range(files):
        if i % per_folder == 0:
            folder = root / f"{i // (per_folder * 20):03d}" / f"{i // per_folder:05d}"
            folder.mkdir(parents=True, exist_ok=True)
            folders += 1
        (folder / f"IMG_{i:06d}.jpg").touch()
    return folders


def idle_watcher(tmp: Path, mode: str, seconds: float) -> float:
    """CPU seconds of a Watcher's loop idling `seconds` over a tiny index (its catch-up excluded)."""
    from PIL import Image

    from mmsearch.config import ModelSpec
    from mmsearch.indexing.watch import Watcher

    photos = tmp / f"small-{mode}"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 60, 0, 0)).save(photos / f"{i}.png")
    w = Watcher(tmp / "idx", [photos], poll=60.0 if mode == "poll" else None,
                index_options=dict(spec=ModelSpec(model="mmsearch-tiny", pretrained=None)))
    t = threading.Thread(target=w.run, daemon=True)
    t.start()
    while w.phase != "watching":
        time.sleep(0.05)
    time.sleep(1.0)
    start = cpu()
    time.sleep(seconds)
    used = cpu() - start
    w.stop()
    t.join(10)
    return used


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--per-folder", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--poll", type=float, default=60.0, help="The polling interval an hour is counted at.")
    ap.add_argument("--extrapolate", type=int, default=100000)
    ap.add_argument("--walks", type=int, default=5)
    args = ap.parse_args()
    from mmsearch.indexing.events import IgnoreList, NativeSource, PollSource

    tmp = Path(tempfile.mkdtemp(prefix="watch_idle_"))
    try:
        tree = tmp / "tree"
        folders = build_tree(tree, args.files, args.per_folder)
        stop = threading.Event()
        poll = PollSource(args.poll, IgnoreList(), stop)
        poll.add_root(str(tree))  # warms the dentry cache, as a running watcher's walks do
        start = cpu()
        for _ in range(args.walks):
            poll.snapshots[str(tree)] = poll.snapshot(str(tree))
        walk = (cpu() - start) / args.walks
        native = NativeSource(IgnoreList(), 0.5, stop)
        start = cpu()
        native.add_root(str(tree))
        arm = cpu() - start
        start = cpu()
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            native.changes(0.5)
        native_idle = (cpu() - start) / args.seconds * 3600
        native.close()
        loop = {mode: idle_watcher(tmp, mode, args.seconds) / args.seconds * 3600 for mode in ("native", "poll")}
        scale = args.extrapolate / args.files
        per_hour_poll = walk * 3600 / args.poll
        out = {
            "files": args.files, "folders": folders, "seconds": args.seconds, "poll_interval_s": args.poll,
            "poll_walk_cpu_s": round(walk, 4), "poll_walk_us_per_file": round(walk / args.files * 1e6, 2),
            "native_arm_cpu_s": round(arm, 4), "native_idle_cpu_s_per_h": round(native_idle, 2),
            "watcher_loop_cpu_s_per_h": {k: round(v, 2) for k, v in loop.items()},
            "measured_cpu_s_per_h": {"native": round(native_idle + loop["native"], 2),
                                     "poll": round(per_hour_poll + loop["poll"], 2)},
            "extrapolated_files": args.extrapolate,
            "extrapolated_cpu_s_per_h": {"native": round(native_idle + loop["native"], 2),
                                         "poll": round(per_hour_poll * scale + loop["poll"], 2)},
            "extrapolated_native_arm_cpu_s": round(arm * scale, 3),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"| mode | CPU s/hour, {args.files:,} files ({folders} folders) | CPU s/hour, {args.extrapolate:,} files |")
    print("|---|---|---|")
    m, e = out["measured_cpu_s_per_h"], out["extrapolated_cpu_s_per_h"]
    print(f"| native events | {m['native']} | {e['native']} (+{out['extrapolated_native_arm_cpu_s']} s once, to arm) |")
    print(f"| polling every {args.poll:g} s | {m['poll']} | {e['poll']} |")
    print(f"walk: {out['poll_walk_cpu_s']} CPU s for {args.files:,} files ({out['poll_walk_us_per_file']} us/file)")
    print(machine_line())
    write_results("watch_idle", out)


if __name__ == "__main__":
    main()
