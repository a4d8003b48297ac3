"""What this CPU can do, answered in one place: its instruction-set flags, whether it multiplies bfloat16
natively, how many cores this process may use. Every CPU default reads it (a new index's tower
precision, training's autocast, batch size, decode and runtime threads), so one environment variable
simulates another CPU for all of them:

    MMSEARCH_CPU_FLAGS=avx,avx2,fma,f16c   # an AVX2-only CPU: no AVX-512, no bf16, no AMX, no VNNI

The flags come from /proc/cpuinfo (Linux), else from numpy's own CPU probe (macOS, Windows). A cap
that oneDNN obeys (`ONEDNN_MAX_CPU_ISA=AVX2`, read by torch's and OpenVINO's oneDNN) caps the flags
too, so the defaults agree with what the kernels will really run. Imports nothing heavy.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

ENV_FLAGS = "MMSEARCH_CPU_FLAGS"
# the flags that decide our defaults and that benchmark reports name
RELEVANT = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni", "asimd", "bf16")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # bfloat16 products in hardware (x86)

# what each ONEDNN_MAX_CPU_ISA level lets through, of the flags that name vector extensions (avx*, amx*)
_AVX2 = {"avx", "avx2", "fma", "f16c"}
_AVX512 = _AVX2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}
_ISA_CAPS = {
    "sse41": set(), "avx": {"avx"}, "avx2": _AVX2, "avx2_vnni": _AVX2 | {"avx_vnni"},
    "avx2_vnni_2": _AVX2 | {"avx_vnni", "avx_vnni_int8", "avx_ne_convert"},
    "avx512_core": _AVX512, "avx512_core_vnni": _AVX512 | {"avx512_vnni"},
    "avx512_core_bf16": _AVX512 | {"avx512_vnni", "avx512_bf16"},
}
_NUMPY_NAMES = {"AVX": "avx", "AVX2": "avx2", "FMA3": "fma", "F16C": "f16c", "AVX512F": "avx512f",
                "AVX512CD": "avx512cd", "AVX512BW": "avx512bw", "AVX512DQ": "avx512dq", "AVX512VL": "avx512vl",
                "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16", "AVX512FP16": "avx512_fp16",
                "AVXVNNI": "avx_vnni", "ASIMD": "asimd", "NEON": "neon"}


def flags() -> frozenset:
    """This CPU's flags, lower case as Linux spells them (`avx2`, `avx512_bf16`, `amx_bf16`, ...)."""
    return _flags(os.environ.get(ENV_FLAGS), os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA"))


@functools.lru_cache(maxsize=8)
def _flags(override, isa_cap) -> frozenset:
    if override is not None:  # a simulated CPU: exactly these flags
        return frozenset(f for f in override.replace(",", " ").lower().split())
    found = cpuinfo_flags()
    if found is None:
        found = _numpy_probe()
    cap = (isa_cap or "").strip().lower()
    if cap in _ISA_CAPS:
        allowed = _ISA_CAPS[cap]
        found = {f for f in found if not f.startswith(("avx", "amx")) or f in allowed}
    elif cap.startswith("avx512_core_fp16") or cap.startswith("avx10"):
        found = {f for f in found if not f.startswith("amx")}
    return frozenset(found)


def cpuinfo_flags():
    """The first processor's `flags` (x86) or `Features` (ARM) line of /proc/cpuinfo, else None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def _numpy_probe() -> set:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return set()
    return {_NUMPY_NAMES[k] for k, on in features.items() if on and k in _NUMPY_NAMES}


def has(flag: str) -> bool:
    return flag.lower() in flags()


def native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX). Without it bf16 is
    converted to fp32 around every product: slower than fp32, so no default picks it there."""
    return any(f in flags() for f in BF16_FLAGS)


def openvino_installed() -> bool:
    """OpenVINO can be imported and the user has not chosen ONNX Runtime (MMSEARCH_TOWER_RUNTIME)."""
    import importlib.util

    if os.environ.get("MMSEARCH_TOWER_RUNTIME", "").lower() == "onnxruntime":
        return False
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        return False


def tower_bf16() -> bool:
    """An exported tower runs bf16 products here: native bf16 and OpenVINO (ONNX Runtime has no bf16 CPU
    kernels). Decides whether a new CPU index defaults to amp-bf16."""
    return native_bf16() and openvino_installed()


def cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a container
    limited to 2 CPUs on a 64-core host sees 64 in os.cpu_count())."""
    env = os.environ.get("MMSEARCH_CPUS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


def _cgroup_quota():
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as fh:
            limit, period = fh.read().split()[:2]
        if limit != "max":
            return max(1, int(int(limit) // int(period)))
    except (OSError, ValueError):
        pass
    return None


def model_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model"):
                    return value.strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def describe() -> dict:
    """The CPU as benchmark tables and JSON name it: model, relevant flags, cores, load, and what is
    simulated (MMSEARCH_CPU_FLAGS, ONEDNN_MAX_CPU_ISA)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    held = {k: os.environ[k] for k in (ENV_FLAGS, "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    return {"model": model_name(), "flags": [f for f in RELEVANT if f in flags()], "cores": cores(),
            "load": [round(x, 2) for x in load] if load else None, "native_bf16": native_bf16(), "held": held}


BUSY_WINDOW_S = 0.1  # how long idle_cores watches the other processes' CPU use
WATCH_MAX_AGE_S = 5.0  # a watch started longer ago than this is stale: idle_cores then watches afresh
_watch = None  # (monotonic time, busy ticks, own user time) from start_watch()


def _busy_ticks() -> int:
    with open("/proc/stat", encoding="ascii") as fh:
        v = [int(x) for x in fh.readline().split()[1:8]]
    # user and nice only: the kernel's system time right after a big process exits (freeing its memory,
    # writing back its files) kept a core "busy" for a fraction of a second, and is no job of anyone's
    return v[0] + v[1]


def start_watch() -> None:
    """Open idle_cores' window now: an index run starts it before it plans, so by the time its tower opens
    the window has passed and idle_cores waits for nothing (it slept 0.1 s of a 1.4 s ten-photo run)."""
    global _watch
    import time

    try:
        _watch = (time.monotonic(), _busy_ticks(), os.times().user)
    except (OSError, ValueError, IndexError):
        _watch = None


def busy_elsewhere(window: Optional[float] = None):
    """Cores other processes keep busy now: the CPU time /proc/stat counts over `window` seconds (default
    BUSY_WINDOW_S, from a recent start_watch() when there is one) less this process's own, per second.
    None where /proc/stat is missing (macOS, Windows)."""
    import time

    try:
        watch = _watch if window is None else None
        if watch is None or not 0 <= time.monotonic() - watch[0] <= WATCH_MAX_AGE_S:
            watch = (time.monotonic(), _busy_ticks(), os.times().user)
        t0, b0, own0 = watch
        time.sleep(max(0.0, (window or BUSY_WINDOW_S) - (time.monotonic() - t0)))
        t1, b1, own1 = time.monotonic(), _busy_ticks(), os.times().user
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, ((b1 - b0) / os.sysconf("SC_CLK_TCK") - (own1 - own0)) / max(t1 - t0, 1e-6))


@functools.lru_cache(maxsize=1)
def idle_cores() -> int:
    """The cores other work leaves free, decided once per process: cores() less the cores other processes
    use right now (busy_elsewhere), a core counted busy from 0.6 of it, at least 1. Without /proc/stat,
    the 1-minute load average stands in; it lags by a minute, so a job that has just ended still counts
    (the demo's training got 1 thread after its own data preparation).
    Torch's threads meet at a barrier after every operator, so a thread on a core something else uses
    holds up all of them: training mmsearch-tiny on 2 cores with 1 busy took 21-24 s on 2 threads and
    10 s on 1 (emulated AVX2; 6.8 s on 2 threads with both cores free)."""
    n = cores()
    busy = busy_elsewhere()
    if busy is None:
        try:
            busy = os.getloadavg()[0] + 0.1
        except (OSError, AttributeError):
            return n
    return max(1, min(n, n - int(busy + 0.4)))
