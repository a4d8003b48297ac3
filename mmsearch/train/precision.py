"""Numeric precision of a training run: bf16 autocast where the device multiplies bf16 natively (GPUs
from Ampere on; CPUs with AVX512_BF16 or AMX), fp16 with loss scaling (GradScaler) on older GPUs, fp32
elsewhere. Weights and optimiser state stay fp32 in every mode, so a checkpoint is the same kind of
file whatever trained it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from mmsearch.errors import TrainingError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def choose_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> the precision to run, or TrainingError saying why not.

    auto: bf16 where supported (no loss scaling needed: bf16 has fp32's range), fp16 with loss scaling
    on older GPUs, fp32 elsewhere. On a CPU "supported" means native bf16 products: there a training
    step of mmsearch-tiny takes 0.68x (1 thread) to 0.75x (2 threads) fp32's time
    (benchmarks/train_throughput.py --precisions fp32,bf16); without them bf16 is emulated and slower
    than fp32. MPS autocast is still incomplete."""
    requested = (requested or "auto").lower()
    if requested not in PRECISIONS:
        raise TrainingError(f"unknown precision '{requested}' (choose {', '.join(PRECISIONS)})")
    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if bf16_supported else "fp16"
        return "bf16" if device_type == "cpu" and bf16_supported else "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise TrainingError(f"--precision fp16 needs a CUDA device (this run is on {device_type}); use bf16 or fp32")
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        raise TrainingError("--precision bf16: this GPU does not support bfloat16; use fp16 (loss-scaled) or fp32")
    if requested == "bf16" and device_type not in ("cuda", "cpu"):
        raise TrainingError(f"--precision bf16 is supported on CUDA and CPU, not {device_type}; use fp32")
    return requested


def cpu_multiplies_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512_BF16 or AMX): mmsearch.towers.cpu, the one
    probe every CPU default reads (MMSEARCH_CPU_FLAGS simulates another CPU; ONEDNN_MAX_CPU_ISA caps it,
    as it caps torch's oneDNN kernels)."""
    from mmsearch.towers.cpu import native_bf16

    return native_bf16()


@dataclass
class Precision:
    name: str
    device_type: str
    scaler: Optional[torch.amp.GradScaler] = None

    @classmethod
    def create(cls, requested: str, device: torch.device) -> "Precision":
        bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_multiplies_bf16()
        name = choose_precision(requested, device.type, bf16)
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name, device.type, scaler)

    def autocast(self):
        """Thread-local: a thread that runs the model enters it itself (train/lanes.py)."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def kernels(self):
        """Kernel choices for the whole run; process-wide, so entered once by the thread that drives the
        loop, never per lane. bf16 attention on a CPU takes the math path (batched products and a
        softmax): the fused flash kernel's bf16 backward takes 6x its fp32 time here (mmsearch-tiny:
        197 vs 32 ms a step), while the math path's products run at bf16 speed."""
        if self.name != "bf16" or self.device_type != "cpu":
            return contextlib.nullcontext()
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3: its CPU attention has no fused bf16 kernel to avoid
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.MATH])

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, opt: torch.optim.Optimizer, params, max_norm: float = 1.0) -> None:
        """Unscale (fp16), clip the global gradient norm, step; an fp16 overflow skips the step."""
        if self.scaler:
            self.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def state_dict(self) -> dict:
        return {"name": self.name, "scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if self.scaler and state and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
