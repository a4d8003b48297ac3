"""Precision selection (no GPU here: the choice is a pure function of device and capability) and
what a run records: precision, device, world size and accumulation in the checkpoint's train_args."""
import pytest
import torch

from mmsearch.errors import DeviceError, TrainingError
from mmsearch.train.precision import Precision, choose_precision, cpu_multiplies_bf16


@pytest.mark.parametrize("requested, device, bf16, expected", [
    ("auto", "cuda", True, "bf16"),  # Ampere and later: bf16, no loss scaling
    ("auto", "cuda", False, "fp16"),  # older GPUs: fp16 with GradScaler
    ("auto", "cpu", False, "fp32"),  # bf16 would be emulated: slower than fp32
    ("auto", "cpu", True, "bf16"),  # AVX512_BF16 or AMX
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
    auto = Precision.create("auto", torch.device("cpu"))
    assert auto.name == ("bf16" if cpu_multiplies_bf16() else "fp32") and auto.scaler is None
    bf16 = Precision.create("bf16", torch.device("cpu"))
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_cpu_bf16_attention_takes_the_math_path_and_gives_it_back():
    """The flash kernel's bf16 backward is slow on CPUs; the run's kernel choice is undone after it."""
    bf16 = Precision.create("bf16", torch.device("cpu"))
    before = torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()
    with bf16.kernels():
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == before
    with Precision.create("fp32", torch.device("cpu")).kernels():
        assert torch.backends.cuda.flash_sdp_enabled() == before[0]


def test_a_bf16_step_follows_the_fp32_gradient(synth_dir):
    """One contrastive step of mmsearch-tiny in bf16 (autocast, math attention) against fp32: same loss
    to 2 %, and a gradient pointing the same way (cosine > 0.99)."""
    from mmsearch.config import ModelSpec
    from mmsearch.towers.encoder import load_encoder
    from mmsearch.train.data import BatchPlan, StepBatches, open_source
    from mmsearch.train.step import clip_loss, contrastive_backward, tower_features

    enc = load_encoder(ModelSpec(model="mmsearch-tiny", pretrained=None))
    model = enc.model.train()
    source = open_source(synth_dir / "captions.csv", "train")
    batch = StepBatches(source, enc.preprocess_train, BatchPlan(len(source), 32, seed=0), 0, enc.image_size)[0]
    micro = [(batch["pixels"], enc.tokenize(batch["texts"]))]
    out = {}
    for name in ("fp32", "bf16"):
        prec = Precision.create(name, torch.device("cpu"))
        model.zero_grad()
        with prec.kernels():
            loss = contrastive_backward(tower_features(enc), micro, model.logit_scale, clip_loss(), prec)
        out[name] = loss, torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    assert out["bf16"][0] == pytest.approx(out["fp32"][0], rel=0.02)
    assert not torch.equal(out["bf16"][1], out["fp32"][1])  # it really ran in bf16
    assert torch.nn.functional.cosine_similarity(out["bf16"][1], out["fp32"][1], dim=0) > 0.99


def test_train_records_precision_device_and_world(trained):
    from mmsearch.towers.encoder import load_checkpoint_file

    args = load_checkpoint_file(trained[0])["train_args"]
    auto = "bf16" if cpu_multiplies_bf16() else "fp32"
    assert (args["precision"], args["device"], args["world_size"], args["accum_steps"]) == (auto, "cpu", 1, 1)


def test_unknown_device_is_refused_before_any_work(synth_dir, tmp_path):
    from mmsearch.config import ModelSpec
    from mmsearch.train import train_encoder

    with pytest.raises(DeviceError):
        train_encoder(synth_dir / "captions.csv", ModelSpec(), tmp_path / "m.pt", device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="cuda"):
            train_encoder(synth_dir / "captions.csv", ModelSpec(), tmp_path / "m.pt", device="cuda")
