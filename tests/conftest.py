"""Session fixtures: one synthetic dataset and one tiny model trained on it, shared by the suite."""
import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest

from mmsearch.config import ModelSpec
from mmsearch.datasets.readers import synthesize


@contextlib.contextmanager
def one_torch_thread():
    """Train fixtures on one thread: on a shared CI core, two spinning OpenMP threads were ~7x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def idle_torch_threads():
    """The session's big training fixtures on the cores idle right now, as `mmsearch train` runs
    (train/threads.py): two on a quiet 2-core machine (the re-ranker's 600 steps took 60 s there
    against 90 s on one), one where the suite shares its core with other work."""
    from mmsearch.train.threads import cpu_threads

    return cpu_threads()


@pytest.fixture(scope="session", autouse=True)
def tower_cache(tmp_path_factory):
    """Exported towers shared between indexes (mmsearch.towers.cache) go to a temporary folder, not ~/.cache."""
    os.environ["MMSEARCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("mmsearch-cache"))
    return os.environ["MMSEARCH_CACHE_DIR"]


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, n=600, seed=0, size=64)
    return out


@pytest.fixture(scope="session")
def trained(synth_dir, tmp_path_factory):
    """(checkpoint path, training result) of a short run: the same command a user runs."""
    from mmsearch.train import train_encoder

    # `make test` runs the suite in several processes, two at a time (tests/run_suite.sh); they share one
    # run through MMSEARCH_TEST_SHARE, a folder that make test creates and removes: the first to need it
    # trains (20 s) under a lock, the others wait for it and read it
    share = Path(os.environ["MMSEARCH_TEST_SHARE"]) if os.environ.get("MMSEARCH_TEST_SHARE") else None
    with _share_lock(share):
        if share is not None and (share / "tiny.json").exists():  # written after the checkpoint: both are whole
            return share / "tiny.pt", dict(json.loads((share / "tiny.json").read_text()),
                                           checkpoint=str(share / "tiny.pt"))
        out = tmp_path_factory.mktemp("model") / "tiny.pt"
        with idle_torch_threads():
            res = train_encoder(synth_dir / "captions.csv", ModelSpec(model="mmsearch-tiny", pretrained=None), out,
                                steps=160, batch_size=48, lr=1e-3)
        if share is not None:
            shutil.copy(out, share / "tiny.pt")
            (share / "tiny.json").write_text(json.dumps(res, default=str))
        return out, res


@contextlib.contextmanager
def _share_lock(share):
    """An exclusive lock on the shared folder's lock file (none without a shared folder)."""
    if share is None:
        yield
        return
    import fcntl

    with open(share / "tiny.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_checkpoint(trained):
    return trained[0]


@pytest.fixture
def small_tiers(monkeypatch):
    """ANN tiers ~50x smaller than the real ones (Flat up to 1000 vectors, IVF16 up to 3000, IVF64 up to
    100k), so every tier is reached in seconds."""
    from mmsearch.storage import ann

    monkeypatch.setattr(ann, "FLAT_MAX", 1000)
    monkeypatch.setattr(ann, "IVF_TIERS", ((3000, 16), (100_000, 64)))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without the interpreter's teardown once every plugin has finished. This process holds the
    native state of hundreds of tests: ONNX Runtime and OpenVINO sessions, Ray, torch and BLAS thread
    pools. Their destructors at exit crashed once (SIGSEGV) after a run in which every test had passed
    and the summary was printed. The result is decided by then; an ordinary mmsearch process holds one of
    each and exits normally."""
    status = config.stash.get(_EXIT_STATUS, None)
    if status is not None and os.environ.get("MMSEARCH_TEST_FAST_EXIT", "1") == "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


_EXIT_STATUS = pytest.StashKey[int]()
