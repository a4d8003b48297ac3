"""Contrastive training: the loss falls, held-out recall beats chance widely, resume after kill -9 is
exact, and every command loads the checkpoint without being told the architecture."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.datasets.readers import load_dataset
from mmsearch.towers.encoder import load_checkpoint_file, load_encoder
from mmsearch.errors import CheckpointError
from mmsearch.evaluation.evaluate import evaluate
from mmsearch.train import train_encoder


def test_loss_falls_and_recall_beats_chance(trained, synth_dir):
    ckpt, res = trained
    assert res["final_loss"] < 0.5 * res["first_loss"]
    ds = load_dataset(synth_dir / "captions.csv", split="test")
    report = evaluate(load_encoder(ModelSpec(checkpoint=str(ckpt))), ds)
    chance = 1 / report["n_images"]
    assert report["text_to_image"]["R@1"] > 10 * chance
    assert report["text_to_image"]["R@10"] > 0.6
    assert report["image_to_text"]["R@1"] > 10 * chance


def test_checkpoint_is_one_self_describing_file(trained):
    ckpt, _ = trained
    data = load_checkpoint_file(ckpt)
    assert data["arch"] == "mmsearch-tiny" and data["model_cfg"]["embed_dim"] == 128
    assert data["train_args"]["steps"] == 160 and "val" in data["metrics"] and "resume" not in data
    enc = load_encoder(ModelSpec(checkpoint=str(ckpt)))
    assert enc.fingerprint == data["fingerprint"]


def test_bad_checkpoints_are_typed_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(ModelSpec(checkpoint=str(tmp_path / "nope.pt")))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_encoder(ModelSpec(checkpoint=str(tmp_path / "junk.pt")))
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an mmsearch checkpoint"):
        load_encoder(ModelSpec(checkpoint=str(tmp_path / "other.pt")))


def test_index_and_search_load_the_checkpoint(trained, synth_dir, tmp_path):
    ckpt, _ = trained
    ds = load_dataset(synth_dir / "captions.csv", split="test")
    idx = tmp_path / "idx"
    r = CliRunner().invoke(cli, ["index", *ds.images[:30], "--index", str(idx), "--checkpoint", str(ckpt)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["search", ds.captions[0], "--index", str(idx), "-k", "5", "--paths"])
    assert r.exit_code == 0 and ds.images[int(ds.caption_image[0])] in r.output.split()
    r = CliRunner().invoke(cli, ["info", "--index", str(idx), "--json"])
    assert str(ckpt) in r.output


RUN = textwrap.dedent("""
    import sys
    from mmsearch.config import ModelSpec
    from mmsearch.train import train_encoder
    train_encoder(sys.argv[1], ModelSpec(model="mmsearch-tiny", pretrained=None), sys.argv[2], steps=40,
                  batch_size=16, lr=1e-3, save_every=5, val_split="none")
""")


def test_resume_after_kill_is_exact(synth_dir, tmp_path):
    data = synth_dir / "captions.csv"
    straight = tmp_path / "straight.pt"
    subprocess.run([sys.executable, "-c", RUN, str(data), str(straight)], check=True)
    killed = tmp_path / "killed.pt"
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(data), str(killed)])
    deadline = time.time() + 120
    while time.time() < deadline:
        if killed.exists():
            try:
                step = torch.load(killed, weights_only=False)["resume"]["step"]
            except Exception:
                step = 0
            if step >= 10:
                break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted = torch.load(killed, weights_only=False)
    assert 10 <= interrupted["resume"]["step"] < 40
    res = train_encoder(data, ModelSpec(), killed, resume=killed)
    assert res["steps"] == 40
    a, b = load_checkpoint_file(straight), load_checkpoint_file(killed)
    assert "resume" not in b and a["train_args"] == b["train_args"]
    for k in a["state_dict"]:
        assert torch.allclose(a["state_dict"][k], b["state_dict"][k], atol=1e-5), k


def test_val_every_validates_every_nth_epoch_and_the_last_step(synth_dir, tmp_path):
    out = tmp_path / "m.pt"
    r = CliRunner().invoke(cli, ["train", str(synth_dir / "captions.csv"), "--epochs", "5", "--batch-size", "64",
                                 "--val-every", "2", "--lr", "1e-3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    ckpt = load_checkpoint_file(out)
    history = ckpt["metrics"]["history"]
    assert [round(h["epoch"]) for h in history] == [1, 2, 3, 4, 5]
    assert [round(h["epoch"]) for h in history if "val" in h] == [2, 4, 5]
    assert ckpt["train_args"]["val_every"] == 2 and ckpt["metrics"]["val"] == history[-1]["val"]
    assert sum("| val" in line for line in r.output.splitlines()) == 3
