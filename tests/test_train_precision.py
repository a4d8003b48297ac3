"""Precision selection (no GPU here: the choice is a pure function of device and capability) and
what a run records: precision, device, world size and accumulation in the checkpoint's train_args."""
import pytest
import torch

from mmsearch.errors import DeviceError, TrainingError
from mmsearch.train.precision import Precision, choose_precision


@pytest.mark.parametrize("requested, device, bf16, expected", [
    ("auto", "cuda", True, "bf16"),  # Ampere and later: bf16, no loss scaling
    ("auto", "cuda", False, "fp16"),  # older GPUs: fp16 with GradScaler
    ("auto", "cpu", False, "fp32"),
    ("auto", "mps", False, "fp32"),
    ("fp32", "cuda", True, "fp32"),
    ("bf16", "cpu", False, "bf16"),
    ("fp16", "cuda", True, "fp16"),
])
def test_precision_choice(requested, device, bf16, expected):
    assert choose_precision(requested, device, bf16) == expected


@pytest.mark.parametrize("requested, device, bf16, message", [
    ("fp16", "cpu", False, "needs a CUDA device"),
    ("bf16", "cuda", False, "does not support bfloat16"),
    ("bf16", "mps", False, "not mps"),
    ("int4", "cpu", False, "unknown precision"),
])
def test_impossible_precisions_are_refused(requested, device, bf16, message):
    with pytest.raises(TrainingError, match=message):
        choose_precision(requested, device, bf16)


def test_cpu_precision_objects():
    fp32 = Precision.create("auto", torch.device("cpu"))
    assert fp32.name == "fp32" and fp32.scaler is None
    bf16 = Precision.create("bf16", torch.device("cpu"))
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_train_records_precision_device_and_world(trained):
    from mmsearch.encoder import load_checkpoint_file

    args = load_checkpoint_file(trained[0])["train_args"]
    assert (args["precision"], args["device"], args["world_size"], args["accum_steps"]) == ("fp32", "cpu", 1, 1)


def test_unknown_device_is_refused_before_any_work(synth_dir, tmp_path):
    from mmsearch.config import ModelSpec
    from mmsearch.train import train_encoder

    with pytest.raises(DeviceError):
        train_encoder(synth_dir / "captions.csv", ModelSpec(), tmp_path / "m.pt", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda"):
            train_encoder(synth_dir / "captions.csv", ModelSpec(), tmp_path / "m.pt", device="cuda")
