"""The loss sees the global batch: accumulation and two gloo processes give the full batch's loss and
gradients; a two-process torchrun run resumes after kill -9 and ends where one process ends; a resume
with another process count is refused."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmsearch.config import ModelSpec
from mmsearch.towers.encoder import load_checkpoint_file
from mmsearch.errors import TrainingError
from mmsearch.train import train_encoder
from conftest import one_torch_thread
from ddp_step import step_gradients

HERE = Path(__file__).parent
ROOT = HERE.parent


def _close(a: dict, b: dict, rtol=1e-4, atol=1e-6) -> None:
    assert abs(a["loss"] - b["loss"]) < 1e-5, (a["loss"], b["loss"])
    for k in a["grads"]:
        ga, gb = a["grads"][k], b["grads"][k]
        scale = ga.abs().max().item()
        assert torch.allclose(ga, gb, rtol=rtol, atol=atol + rtol * scale), \
            f"{k}: max diff {(ga - gb).abs().max().item():.3g} (|g| max {scale:.3g})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{HERE}", OMP_NUM_THREADS="1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def test_accumulation_and_two_processes_equal_the_full_batch(synth_dir, tmp_path):
    data = synth_dir / "captions.csv"
    with one_torch_thread():
        full = step_gradients(data, accum_steps=1)
        accum = step_gradients(data, accum_steps=4)
    _close(full, accum)

    port, out = _free_port(), tmp_path / "ddp.pt"
    procs = [subprocess.Popen([sys.executable, str(HERE / "ddp_step.py"), str(data), str(out)],
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port))) for r in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ddp, ddp_accum = torch.load(out, weights_only=True)
    _close(full, ddp)  # each rank holds 8 pairs, the loss and gradients are those of all 16
    _close(full, ddp_accum)  # 2 processes x 2 micro-batches of 4

    # the naive alternative (a sum of per-micro-batch losses) is a different gradient: the check can fail
    with one_torch_thread():
        halves = [step_gradients(data, 1, batch_size=8, step=s) for s in (0, 1)]
    with pytest.raises(AssertionError):
        _close(full, halves[0])


def _torchrun(data, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mmsearch", "train", str(data), "--out", str(out), "--steps", "14", "--batch-size", "16",
           "--lr", "1e-3", "--device", "cpu", "--precision", "fp32", "--workers", "0", "--save-every", "2", *extra]
    return subprocess.Popen(cmd, env=_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_two_process_run_resumes_after_kill_and_matches_one_process(synth_dir, tmp_path):
    data = synth_dir / "captions.csv"
    killed = tmp_path / "killed.pt"
    proc = _torchrun(data, killed)
    deadline = time.time() + 240
    step = 0
    while time.time() < deadline and proc.poll() is None and step < 4:
        time.sleep(0.3)
        try:
            step = load_checkpoint_file(killed)["resume"]["step"] if killed.exists() else 0
        except Exception:
            step = 0
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks: the session we started
    proc.wait()
    state = load_checkpoint_file(killed)
    assert 4 <= state["resume"]["step"] < 14, proc.stdout.read()
    assert state["train_args"]["world_size"] == 2 and state["train_args"]["precision"] == "fp32"
    assert state["train_args"]["device"] == "cpu"

    with pytest.raises(TrainingError, match="trained by 2 process.*this run has 1.*--nproc-per-node 2"):
        train_encoder(data, ModelSpec(), killed, resume=killed)

    proc = _torchrun(data, killed, "--resume", str(killed))
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert output.count('"checkpoint"') == 1  # only rank 0 reports
    resumed = load_checkpoint_file(killed)
    assert "resume" not in resumed and resumed["train_args"]["steps"] == 14

    one = tmp_path / "one.pt"
    with one_torch_thread():
        train_encoder(data, ModelSpec(model="mmsearch-tiny", pretrained=None), one, steps=14, batch_size=16,
                      lr=1e-3, workers=0, val_split="none", precision="fp32")
    single = load_checkpoint_file(one)
    for k, v in single["state_dict"].items():
        assert torch.allclose(v, resumed["state_dict"][k], atol=2e-4), (k, (v - resumed["state_dict"][k]).abs().max())
