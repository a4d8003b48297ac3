"""Loading a model never runs code: checkpoints, re-rankers and resume files are read with torch's
weights-only unpickler. A file whose pickle carries a payload is refused with one line and the
payload never runs; every file mmsearch itself writes (final and in-progress) still loads."""
import os

import pytest
import torch
from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.datasets.readers import synthesize
from mmsearch.towers.encoder import CHECKPOINT_FORMAT, load_checkpoint_file, load_encoder
from mmsearch.errors import CheckpointError
from mmsearch.rerank.model import RERANKER_FORMAT, Reranker
from mmsearch.train.reranker import train_reranker
from mmsearch.towers.safeload import safe_torch_load
from mmsearch.train import train_encoder
from conftest import one_torch_thread


class Payload:
    """Unpickling this calls os.makedirs(marker): what a malicious shared checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


class _Stop(Exception):
    pass


def _stop_at(step):
    def progress(done, total=None, stage=None, **_):
        if stage in ("train", "train-reranker") and done >= step:
            raise _Stop  # a run killed mid-way: the last in-progress checkpoint is on disk
    return progress


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("safe-synth")
    synthesize(out, n=96, seed=3, size=64)
    return out / "captions.csv"


def _evil(path, marker, obj):
    torch.save(dict(obj, payload=Payload(marker)), path)
    return path


def _refused(exc_info, path, marker):
    msg = str(exc_info.value)
    assert msg.startswith("refused ") and str(path) in msg and "os.makedirs" in msg and "\n" not in msg
    assert not marker.exists(), "the payload ran"


def test_the_payload_really_runs_under_plain_pickle(tmp_path):
    """The fixture is a real attack: the unsafe load mmsearch used before creates the marker."""
    marker = tmp_path / "ran"
    path = _evil(tmp_path / "x.pt", marker, {"format": CHECKPOINT_FORMAT})
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_with_payload_is_refused(tiny_checkpoint, tmp_path):
    marker = tmp_path / "ran"
    ckpt = load_checkpoint_file(tiny_checkpoint)  # a real checkpoint loads weights-only
    path = _evil(tmp_path / "evil.pt", marker, ckpt)
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint_file(path)
    _refused(exc_info, path, marker)
    with pytest.raises(CheckpointError):
        load_encoder(ModelSpec(checkpoint=str(path)))
    assert not marker.exists()


def test_cli_refuses_with_one_line(tiny_checkpoint, synth_dir, tmp_path):
    marker = tmp_path / "ran"
    path = _evil(tmp_path / "evil.pt", marker, load_checkpoint_file(tiny_checkpoint))
    res = CliRunner().invoke(cli, ["eval", str(synth_dir / "captions.csv"), "--checkpoint", str(path)])
    assert res.exit_code == 1 and res.output.startswith("Error: refused checkpoint") and res.output.count("\n") == 1
    assert not marker.exists()


def test_reranker_file_with_payload_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = _evil(tmp_path / "rr.pt", marker, {"format": RERANKER_FORMAT, "config": {}, "state_dict": {}})
    with pytest.raises(CheckpointError) as exc_info:
        Reranker.load(path)
    _refused(exc_info, path, marker)


def test_encoder_resume_file_loads_safely_and_payload_is_refused(small_data, tmp_path):
    out = tmp_path / "run.pt"
    with one_torch_thread(), pytest.raises(_Stop):
        train_encoder(small_data, ModelSpec(model="mmsearch-tiny", pretrained=None), out, steps=6, batch_size=16,
                      save_every=2, progress=_stop_at(3), val_split="none")
    state = load_checkpoint_file(out)  # optimizer state, history, train args: all weights-only loadable
    assert state["resume"]["step"] == 2 and state["resume"]["optimizer"]["state"]
    marker = tmp_path / "ran"
    evil = _evil(tmp_path / "evil-resume.pt", marker, state)
    with pytest.raises(CheckpointError) as exc_info:
        train_encoder(small_data, ModelSpec(), evil, resume=evil)
    _refused(exc_info, evil, marker)
    with one_torch_thread():
        res = train_encoder(small_data, ModelSpec(), out, resume=out)
    assert res["steps"] == 6 and "resume" not in load_checkpoint_file(out)


def test_reranker_resume_file_loads_safely_and_payload_is_refused(small_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "rr.pt"
    with one_torch_thread(), pytest.raises(_Stop):
        train_reranker(small_data, tiny_checkpoint, out, steps=60, batch_size=8, d=32, layers=1,
                       progress=_stop_at(51))
    state = safe_torch_load(out, "re-ranker")
    assert state["resume"]["step"] == 50
    marker = tmp_path / "ran"
    evil = _evil(tmp_path / "evil-rr.pt", marker, state)
    with pytest.raises(CheckpointError) as exc_info:
        train_reranker(small_data, tiny_checkpoint, tmp_path / "x.pt", resume=evil)
    _refused(exc_info, evil, marker)
    with one_torch_thread():
        train_reranker(small_data, tiny_checkpoint, out, resume=out)
    rr = Reranker.load(out)  # the finished file (alpha, metrics) loads weights-only too
    assert rr.meta["train_args"]["steps"] == 60


@pytest.mark.parametrize("content, why", [(b"", "cannot read"), (b"not a torch file at all", "cannot read")])
def test_unreadable_files_get_one_line(tmp_path, content, why):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc_info:
        load_checkpoint_file(path)
    assert str(exc_info.value).startswith(f"{why} checkpoint {path}") and "\n" not in str(exc_info.value)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint_file(tmp_path / "missing.pt")
