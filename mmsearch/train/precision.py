"""Numeric precision of a training run: bf16 autocast where the GPU supports it, else fp16 with loss
scaling (GradScaler), fp32 on the CPU. Weights and optimiser state stay fp32 in every mode, so a
checkpoint is the same kind of file whatever trained it."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import TrainingError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def choose_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> the precision to run, or TrainingError saying why not.

    auto: bf16 on CUDA when supported (no loss scaling needed: bf16 has fp32's range), fp16 with loss
    scaling on older GPUs, fp32 elsewhere (CPU autocast is slower than fp32 for these models on
    x86 without AMX, and MPS autocast is still incomplete)."""
    requested = (requested or "auto").lower()
    if requested not in PRECISIONS:
        raise TrainingError(f"unknown precision '{requested}' (choose {', '.join(PRECISIONS)})")
    if requested == "auto":
        if device_type == "cuda":
            return "bf16" if bf16_supported else "fp16"
        return "fp32"
    if requested == "fp16" and device_type != "cuda":
        raise TrainingError(f"--precision fp16 needs a CUDA device (this run is on {device_type}); use bf16 or fp32")
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        raise TrainingError("--precision bf16: this GPU does not support bfloat16; use fp16 (loss-scaled) or fp32")
    if requested == "bf16" and device_type not in ("cuda", "cpu"):
        raise TrainingError(f"--precision bf16 is supported on CUDA and CPU, not {device_type}; use fp32")
    return requested


@dataclass
class Precision:
    name: str
    device_type: str
    scaler: Optional[torch.amp.GradScaler] = None

    @classmethod
    def create(cls, requested: str, device: torch.device) -> "Precision":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = choose_precision(requested, device.type, bf16)
        scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        return cls(name, device.type, scaler)

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

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
