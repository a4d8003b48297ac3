"""Which torch device to run on: `auto` picks CUDA, then Apple's MPS, then the CPU.

The device never changes what is stored: an index built on a GPU is searched on a CPU. torch is
imported only when a device is resolved, so the CLI can parse `--device` without it.
"""
from __future__ import annotations

from mmsearch.errors import DeviceError

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


def _no_accelerator_here() -> bool:
    """True when no GPU torch could use can exist here (no NVIDIA/AMD/WSL device nodes, not Apple silicon)."""
    import os
    import platform
    import sys

    if sys.platform == "darwin" and platform.machine() == "arm64":
        return False
    return not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version",
                                                "/dev/kfd", "/dev/dxg"))


def select_device(name: str | None = "auto"):
    """resolve_device, except that a sure CPU ('cpu', or 'auto' on a machine without any GPU device) is
    the string 'cpu' and imports no torch: CPU indexing runs the ONNX tower and need not pay for torch."""
    key = (name or "auto").strip().lower()
    if key == "cpu" or (key == "auto" and _no_accelerator_here()):
        return "cpu"
    return resolve_device(key)


def device_type(device) -> str:
    """'cpu', 'cuda', 'mps' for a torch.device or a name."""
    return getattr(device, "type", None) or str(device).split(":")[0]


# ---- what a device changes: batch sizes, decode workers, mixed precision --------------------------
# Precisions of the image embeddings stored in an index (the meta key `precision`); a new index gets
# default_precision(). amp-* runs bfloat16/float16 products (torch.autocast; on a CPU with bf16
# arithmetic, OpenVINO), int8 the quantised ONNX tower: both change the stored vectors slightly, so an
# index records its precision and refuses to mix it with another.
PRECISIONS = ("fp32", "int8", "amp-bf16", "amp-fp16")  # int8: ONNX Runtime on a CPU (mmsearch.towers.imagetower)
_PRECISION_DEVICES = {"amp-bf16": ("cpu", "cuda"), "amp-fp16": ("cuda", "mps")}


def default_precision(device, reranker: bool = False) -> str:
    """A new index's precision when none is asked for. amp-bf16 on a CPU that multiplies bfloat16
    (AVX512_BF16, AMX; run by OpenVINO, whose own default it is there): 2.2x fp32's speed on ViT-B-32,
    vectors within cosine 0.9999 of fp32's, and the arithmetic the CLIP families were trained in
    (bf16/fp16 autocast). int8 (ONNX Runtime) on an x86 CPU with AVX2 and no bf16, the CPU most users
    have: 1.6x fp32's speed there, where fp32 is at the CPU's limit, with quality held on both models
    that can be trained here (benchmarks/tower_precision.py: min cosine 0.9994 to fp32, zero-shot
    accuracy and recall@k equal within 0.2 points); the pipeline falls back to fp32 for a model int8
    cannot export. fp32 everywhere else (GPUs; CPUs where int8 was not measured), and with a re-ranker:
    its token output comes from torch, which has neither."""
    if device_type(device) != "cpu" or reranker:
        return "fp32"
    from mmsearch.towers import cpu

    if cpu.tower_bf16():
        return "amp-bf16"
    return "int8" if cpu.has("avx2") and not cpu.native_bf16() else "fp32"


def default_batch_size(device) -> int:
    """Images per encoder batch: a GPU wants large batches to stay busy, a CPU gains nothing past ~32."""
    return {"cuda": 256, "mps": 64}.get(device_type(device), 32)


def default_decode_workers(device, cpus: int | None = None) -> int:
    """Decoding threads: on a CPU they share the cores with the encoder (4 at most); a GPU needs every
    core decoding to keep it fed. `cpus`: the cores this process may use (affinity and cgroup quota)."""
    from mmsearch.towers.cpu import cores

    cpus = cpus or cores()
    if device_type(device) == "cpu":
        return max(1, min(4, cpus))
    return max(2, min(16, cpus))


def check_precision(precision: str, device) -> str:
    """The precision name if `device` can run it, else DeviceError (one line)."""
    precision = (precision or "fp32").lower()
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision '{precision}' (choose {', '.join(PRECISIONS)})")
    if precision in ("fp32", "int8"):
        return precision  # int8 runs on ONNX Runtime on the CPU, whatever the torch device
    kind = device_type(device)
    if kind not in _PRECISION_DEVICES[precision]:
        raise DeviceError(f"--precision {precision} is not supported on {kind} "
                          f"(supported on: {', '.join(_PRECISION_DEVICES[precision])})")
    if precision == "amp-bf16" and kind == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported():
            raise DeviceError("--precision amp-bf16: this GPU has no bfloat16 support (use amp-fp16)")
    return precision


def torch_precision(precision: str, device) -> str:
    """The precision the torch encoder runs for an index of `precision` on `device`: its own, except
    amp-bf16 on a CPU without bf16 products (mmsearch.towers.cpu), which runs fp32, as the exported
    tower does there (runtime.products): torch's emulated bf16 took 10x fp32's time on an AVX2 CPU."""
    if precision == "amp-bf16" and device_type(device) == "cpu":
        from mmsearch.towers.cpu import native_bf16

        return precision if native_bf16() else "fp32"
    return precision


def bf16_fallback_note(precision: str, device) -> str | None:
    """One line for the user when an amp-bf16 index runs in fp32 here, else None."""
    if precision != "amp-bf16" or device_type(device) != "cpu" or torch_precision(precision, device) != "fp32":
        return None
    return ("note: this CPU has no bfloat16 arithmetic (AVX512_BF16, AMX): the amp-bf16 index embeds with fp32 "
            "products here, slower than on a bf16 CPU, vectors as close to bf16's as bf16's are to fp32's "
            "(the index keeps its precision)")


def autocast(device, precision: str):
    """A context that runs torch ops in `precision` on `device` (a no-op for fp32)."""
    import contextlib

    if not precision or not precision.startswith("amp-"):
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "amp-bf16" else torch.float16
    return torch.autocast(device_type=device_type(device), dtype=dtype)
