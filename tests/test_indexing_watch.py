"""Issue 28, watch mode: the watcher is another executor of the indexing plan, fed by file events (native) or a
polling walk. Short debounces, 64 px images and the session's tiny model keep these fast."""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmsearch.config import ModelSpec
from mmsearch.errors import MediaError, MmsearchError
from mmsearch.indexing import mounts
from mmsearch.indexing.events import DEFAULT_IGNORE, IgnoreList, caseless_glob
from mmsearch.indexing.pipeline import index_folders
from mmsearch.indexing.plan import plan_changes
from mmsearch.indexing.watch import Watcher
from mmsearch.storage.catalog import Catalog
from mmsearch.storage.store import IndexStore

MODES = ["native", "poll"]
POLL_S = 0.2


def images(synth_dir, n, start=0):
    return sorted((Path(synth_dir) / "images").glob("*.png"))[start:start + n]


def wait_for(cond, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def states(idx) -> dict:
    """path -> (id, size, mtime_ns, quick_hash), read through a connection of its own."""
    cat = Catalog.open(idx, readonly=True)
    try:
        return cat.image_states()
    finally:
        cat.close()


def settled_count(idx):
    """Images in the catalog, or None while another process is still creating it."""
    try:
        return len(states(idx))
    except MmsearchError:
        return None


@contextlib.contextmanager
def watching(idx, roots, checkpoint, mode="native", debounce=0.15, **kw):
    """A Watcher in a thread; yields (watcher, run summaries after the catch-up)."""
    runs, failure = [], []
    w = Watcher(idx, roots, poll=POLL_S if mode == "poll" else None, debounce=debounce,
                index_options=dict(spec=ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(checkpoint)),
                                   batch_size=kw.pop("batch_size", 32)),
                on_run=lambda s, paths: runs.append((s, list(paths))), **kw)

    def run():
        try:
            w.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failure.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for(lambda: w.phase == "watching" or not t.is_alive(), what="the watcher to start")
    assert not failure, failure
    del runs[:]  # the catch-up run
    try:
        yield w, runs
    finally:
        w.stop()
        t.join(20)
        assert not t.is_alive()
    assert not failure, failure


def idle(w):
    """Wait until the run that committed what a test saw has returned (its summary is in `runs` only then)."""
    wait_for(lambda: w.status()["pending"] == 0 and w.status()["state"] == "watching", what="the run to finish")


def totals(runs) -> dict:
    keys = ("added", "updated", "moved", "removed")
    return {k: sum(getattr(s, k) for s, _ in runs) for k in keys} | {"failed": sum(len(s.failures) for s, _ in runs)}


@pytest.mark.parametrize("mode", MODES)
def test_watcher_sees_new_changed_renamed_and_deleted_files(tmp_path, synth_dir, tiny_checkpoint, mode):
    """Issue 28: a watcher sees new, changed, renamed and deleted files, in native and polling mode."""
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    photos.mkdir()
    srcs = images(synth_dir, 8)
    for s in srcs[:3]:
        shutil.copy(s, photos / s.name)
    with watching(idx, [photos], tiny_checkpoint, mode) as (w, runs):
        assert w.status()["roots"][0]["mode"] == mode
        assert len(states(idx)) == 3
        shutil.copy(srcs[3], photos / "new.png")  # new
        wait_for(lambda: str(photos / "new.png") in states(idx), what="the new file")
        before = states(idx)[str(photos / srcs[0].name)]
        shutil.copy(srcs[4], photos / srcs[0].name)  # changed: other pixels under the same name
        wait_for(lambda: states(idx)[str(photos / srcs[0].name)][1:3] != before[1:3], what="the change")
        assert states(idx)[str(photos / srcs[0].name)][1] == os.path.getsize(srcs[4])
        moved_id = states(idx)[str(photos / "new.png")][0]
        (photos / "sub").mkdir()
        os.rename(photos / "new.png", photos / "sub" / "renamed.png")  # a rename is a move: same row, new path
        wait_for(lambda: str(photos / "sub" / "renamed.png") in states(idx), what="the rename")
        st = states(idx)
        assert str(photos / "new.png") not in st and st[str(photos / "sub" / "renamed.png")][0] == moved_id
        os.remove(photos / srcs[1].name)  # deleted
        wait_for(lambda: str(photos / srcs[1].name) not in states(idx), what="the deletion")
        idle(w)
        t = totals(runs)
    assert t == {"added": 1, "updated": 1, "moved": 1, "removed": 1, "failed": 0}
    assert sorted(states(idx)) == sorted(str(p) for p in [photos / srcs[0].name, photos / srcs[2].name,
                                                          photos / "sub" / "renamed.png"])
    store = IndexStore.open(idx)
    ids, _ = store.catalog.embeddings(store.dim)
    assert store.vectors_fresh() and store.image_vectors().ntotal == len(ids) == 3


@pytest.mark.parametrize("mode", MODES)
def test_a_file_written_slowly_is_indexed_once_complete(tmp_path, synth_dir, tiny_checkpoint, mode):
    """Issue 28: a file still being written is indexed once it stops changing: one embedding, of the whole file."""
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    photos.mkdir()
    shutil.copy(images(synth_dir, 1)[0], photos / "first.png")
    data = images(synth_dir, 1, start=5)[0].read_bytes()
    with watching(idx, [photos], tiny_checkpoint, mode, debounce=0.6) as (w, runs):
        target = photos / "slow.png"
        with open(target, "wb") as fh:
            for i in range(6):  # ~1.5 s of writing, in pauses shorter than debounce + settle (1.2 s)
                fh.write(data[i * len(data) // 6:(i + 1) * len(data) // 6])
                fh.flush()
                time.sleep(0.25)
        wait_for(lambda: str(target) in states(idx), what="the slow file")
        time.sleep(1.5)  # nothing more happens to it
        idle(w)
        t = totals(runs)
    assert t == {"added": 1, "updated": 0, "moved": 0, "removed": 0, "failed": 0}
    assert states(idx)[str(target)][1] == len(data)


def test_a_burst_of_1000_files_is_indexed_in_batches(tmp_path, tiny_checkpoint):
    """Issue 28: a burst of 1,000 tiny files is indexed in a few runs, not one run per file."""
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    (photos / "burst").mkdir(parents=True)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(photos / "seed.png")
    with watching(idx, [photos], tiny_checkpoint, debounce=0.3, batch_size=128) as (w, runs):
        rng = np.random.default_rng(0)
        for i in range(1000):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(photos / "burst" / f"{i:04d}.png")
        wait_for(lambda: len(states(idx)) == 1001, timeout=180, what="1,000 files indexed")
        idle(w)
        t = totals(runs)
        n_runs = len(runs)
    assert t["added"] == 1000 and t["failed"] == 0
    assert 1 <= n_runs <= 5, f"{n_runs} runs for one burst"


KILLER = textwrap.dedent("""
    import os, signal, sys
    from mmsearch.config import ModelSpec
    from mmsearch.indexing.watch import Watcher
    idx, photos, ckpt = sys.argv[1:4]
    def progress(done, total=None, stage=None, **info):
        if stage == "embed" and done >= 64:  # two batches committed, more in flight: die the hard way
            os.kill(os.getpid(), signal.SIGKILL)
    Watcher(idx, [photos], debounce=0.3, index_options=dict(
        spec=ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=ckpt), batch_size=32,
        progress=progress)).run()
""")


def test_a_watcher_killed_mid_batch_loses_and_duplicates_nothing(tmp_path, synth_dir, tiny_checkpoint):
    """Issue 28: killing the watcher mid-batch (SIGKILL) and restarting it loses nothing and duplicates nothing."""
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    photos.mkdir()
    shutil.copy(images(synth_dir, 1)[0], photos / "first.png")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(idx), str(photos), str(tiny_checkpoint)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: settled_count(idx) == 1 or proc.poll() is not None, what="the watcher's catch-up")
        time.sleep(0.5)  # armed
        srcs = images(synth_dir, 200, start=1)
        for s in srcs:
            shutil.copy(s, photos / s.name)
        assert proc.wait(timeout=180) == -signal.SIGKILL, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = len(states(idx))
    assert 1 + 64 <= partial < 201  # it died with work left: committed batches stay, the one in flight is gone
    with watching(idx, [photos], tiny_checkpoint):  # the restart's catch-up plans what is left
        pass
    st = states(idx)
    assert sorted(st) == sorted([str(photos / "first.png")] + [str(photos / s.name) for s in srcs])
    store = IndexStore.open(idx)
    ids, emb = store.catalog.embeddings(store.dim)
    assert len(ids) == 201 and len(set(st)) == 201
    index = store.image_vectors()
    assert index.ntotal == 201
    scores, found = index.search(emb[:5], 1)
    assert [int(i) for i in found[:, 0]] == [int(i) for i in ids[:5]]  # the vectors are the catalog's rows


def test_an_unmounted_folder_keeps_its_photos_and_is_watched_for_its_return(tmp_path, synth_dir, tiny_checkpoint):
    """Issue 28: a root that disappears (renamed away, as an unmounted disk) is reported once, keeps its photos,
    and is caught up when it returns."""
    photos, away, idx = tmp_path / "photos", tmp_path / "photos-away", tmp_path / "idx"
    photos.mkdir()
    srcs = images(synth_dir, 6)
    for s in srcs[:4]:
        shutil.copy(s, photos / s.name)
    with watching(idx, [photos], tiny_checkpoint) as (w, runs):
        os.rename(photos, away)
        wait_for(lambda: w.status()["roots"][0]["away"], what="the folder to be reported away")
        assert w.status()["roots"][0]["away"] == "missing"
        shutil.copy(srcs[4], away / "while-away.png")  # changed while away: seen when it returns
        time.sleep(1.0)
        assert len(states(idx)) == 4  # nothing removed, nothing added under the other name
        os.rename(away, photos)
        wait_for(lambda: w.status()["roots"][0]["present"], what="the folder's return")
        wait_for(lambda: str(photos / "while-away.png") in states(idx), what="the catch-up after the return")
        idle(w)
        t = totals(runs)
    assert len(states(idx)) == 5 and t["removed"] == 0


def test_the_plan_treats_a_missing_or_emptied_watched_root_as_away(tmp_path, synth_dir, tiny_checkpoint):
    """The guard in the plan: a watched root that is missing, or empty while the catalog holds photos under
    it (an unmounted disk's mount point), is away: nothing under it is deleted. Without `watched` a missing
    root is still an error."""
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    photos.mkdir()
    for s in images(synth_dir, 3):
        shutil.copy(s, photos / s.name)
    index_folders(idx, [photos], spec=ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint)))
    cat = Catalog.open(idx)
    hidden = tmp_path / "elsewhere"
    os.rename(photos, hidden)
    plan = plan_changes(cat, [str(photos)], (), False, watched=[str(photos)])
    assert plan.away == [str(photos)] and plan.deleted_ids == []
    photos.mkdir()  # the empty mount point an unmounted disk leaves behind
    plan = plan_changes(cat, [str(photos / "a.png"), str(photos)], (), False, watched=[str(photos)])
    assert plan.away == [str(photos)] and plan.deleted_ids == []
    with pytest.raises(MediaError, match="no such file"):
        index_folders(idx, [tmp_path / "missing"])
    summary = index_folders(idx, [photos / "gone.png"], watched=[photos])
    assert summary.away == [str(photos)] and summary.removed == 0
    photos.rmdir()
    os.rename(hidden, photos)
    os.remove(photos / images(synth_dir, 1)[0].name)  # a path gone from a present root: really deleted
    summary = index_folders(idx, [photos / images(synth_dir, 1)[0].name], watched=[photos])
    assert summary.removed == 1 and summary.away == [] and len(states(idx)) == 2
    assert sorted(Catalog.open(idx, readonly=True).meta()["roots"]) == [str(photos)]


def test_ignored_folders_are_ignored(tmp_path, synth_dir, tiny_checkpoint):
    """Issue 28: hidden and system folders (@eaDir, #recycle, .Trash-*, $RECYCLE.BIN in any case ...) and the
    user's --ignore names are neither indexed at start nor watched."""
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    srcs = iter(images(synth_dir, 16))
    ignored = ["@eaDir/a.jpg.png", "#recycle/b.png", ".Trash-1000/c.png", "$Recycle.Bin/d.png", "private/e.png",
               "sub/@eaDir/thumb.png", "lost+found/f.png"]
    for rel in ignored + ["keep.png"]:
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(next(srcs), photos / rel)
    with watching(idx, [photos], tiny_checkpoint, ignore=["private"]) as (w, runs):
        assert sorted(states(idx)) == [str(photos / "keep.png")]
        for rel in ["@eaDir/late.png", "sub/@eaDir/late.png", "private/late.png", "#recycle/late.png"]:
            shutil.copy(next(srcs), photos / rel)
        shutil.copy(next(srcs), photos / "sub" / "seen.png")
        wait_for(lambda: str(photos / "sub" / "seen.png") in states(idx), what="the file outside ignored folders")
        time.sleep(0.5)
    assert sorted(states(idx)) == sorted([str(photos / "keep.png"), str(photos / "sub" / "seen.png")])
    watched = w.sources["native"].folders[str(photos)]
    assert str(photos / "sub") in watched and not any("@eaDir" in f or "private" in f for f in watched)


def test_an_idle_watcher_runs_nothing(tmp_path, synth_dir, tiny_checkpoint):
    photos, idx = tmp_path / "photos", tmp_path / "idx"
    photos.mkdir()
    shutil.copy(images(synth_dir, 1)[0], photos / "a.png")
    with watching(idx, [photos], tiny_checkpoint) as (w, runs):
        (photos / "notes.txt").write_text("not a photo")
        time.sleep(1.0)
        assert runs == [] and w.status()["pending"] == 0


MOUNTS = """\
/dev/sda1 / ext4 rw,relatime 0 0
nas:/volume1/photo /mnt/nas nfs4 rw,relatime 0 0
//box/share /mnt/my\\040share cifs rw 0 0
user@host:/pics /home/u/remote fuse.sshfs rw 0 0
/dev/sdb1 /media/usb fuseblk rw 0 0
tmpfs /tmp tmpfs rw 0 0
"""


def test_network_and_fuse_mounts_are_polled():
    table = mounts.read_mounts(MOUNTS)
    assert ("/mnt/my share", "cifs") in table
    assert mounts.polling_reason("/mnt/nas/2024/a", table) == "nfs4 mount at /mnt/nas"
    assert mounts.polling_reason("/mnt/my share/x", table) == "cifs mount at /mnt/my share"
    assert mounts.polling_reason("/home/u/remote/pics", table) == "fuse.sshfs mount at /home/u/remote"
    assert mounts.polling_reason("/media/usb/DCIM", table) is None  # a local disk through FUSE
    assert mounts.polling_reason("/home/u/photos", table) is None
    assert mounts.polling_reason("/mnt/nasty", table) is None  # a prefix of the name is not the mount


def test_the_ignore_list_matches_names_without_case():
    ig = IgnoreList(["Private*"])
    assert {"@eaDir", "#recycle", "$RECYCLE.BIN", ".thumbnails", "lost+found"} <= set(DEFAULT_IGNORE)
    for name in ["@eadir", "$Recycle.Bin", "#Recycle", ".Trash-1000", "privateStuff", ".hidden", "System Volume Information"]:
        assert ig.name(name), name
    for name in ["eaDir", "recycle", "photos", "Trash-1000"]:
        assert not ig.name(name), name
    assert ig.path("/r/a/@eaDir/x.jpg", "/r") and not ig.path("/r/a/b/x.jpg", "/r")
    assert IgnoreList(include_hidden=True).name(".hidden") is False
    assert caseless_glob(".Trash-[0-9]*") == ".[tT][rR][aA][sS][hH]-[0-9]*"
    with pytest.raises(Exception, match="not a path"):
        IgnoreList(["a/b"])
