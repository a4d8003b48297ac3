"""Which torch device to run on: `auto` picks CUDA, then Apple's MPS, then the CPU.

The device never changes what is stored: an index built on a GPU is searched on a CPU. torch is
imported only when a device is resolved, so the CLI can parse `--device` without it.
"""
from __future__ import annotations

from .errors import DeviceError

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"


def _mps_available(torch) -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str | None = "auto"):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device, or DeviceError with one line saying why not."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available(torch) else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available(torch):
            raise DeviceError("--device mps: Apple's MPS backend is not available on this machine (use auto or cpu)")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise DeviceError(f"--device {name}: expected cuda or cuda:N with N a GPU number")
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise DeviceError(f"--device {name}: {why} (use --device auto or cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise DeviceError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) visible (cuda:0 .. "
                              f"cuda:{torch.cuda.device_count() - 1})")
        return torch.device(name)
    raise DeviceError(f"unknown device '{name}' (choose {DEVICE_CHOICES})")
