"""Run an exported ONNX tower on the CPU in the fastest runtime that keeps its precision.

OpenVINO runs ViT-B-32 a little faster than ONNX Runtime on x86 CPUs (fp32: 16.1 against 14.6 img/s on
our 2 AVX-512 cores, same graph, outputs equal within 3e-7), and it is the only one of the two
that runs bfloat16 matrix products on CPUs that have them (AVX512_BF16, AMX): 34 img/s. ONNX
Runtime stays the fallback (no OpenVINO wheel for the platform, or `MMSEARCH_TOWER_RUNTIME=onnxruntime`)
and the runtime of int8 models, whose dynamic quantisation is ONNX Runtime's own operators.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from mmsearch.errors import CheckpointError, DeviceError
from mmsearch.towers import cpu

RUNTIMES = ("openvino", "onnxruntime")


def threads() -> int:
    env = os.environ.get("MMSEARCH_ORT_THREADS")
    return int(env) if env else cpu.idle_cores()  # a thread on a busy core holds up the others at every barrier


def _openvino():
    """The openvino module, or None when it is not installed or the user chose ONNX Runtime."""
    if os.environ.get("MMSEARCH_TOWER_RUNTIME", "").lower() == "onnxruntime":
        return None
    try:
        import openvino
    except ImportError:
        return None
    return openvino


def cpu_has_bf16() -> bool:
    """True when an exported tower runs bfloat16 products here: the CPU multiplies bf16 (AVX512_BF16, AMX;
    mmsearch.towers.cpu, which MMSEARCH_CPU_FLAGS can simulate) and OpenVINO is installed."""
    return cpu.tower_bf16()


def runtime_for(precision: str) -> str:
    """Which runtime runs an exported tower of this precision here. Never a dead end for the precisions
    an exported tower has: an amp-bf16 index on a CPU without bf16 arithmetic runs its (fp32) graph in
    fp32 (`products`), which is what OpenVINO itself does there and the closest a CPU gets to the bf16
    vectors without bf16 hardware (benchmarks/tower_precision.py measures it)."""
    if precision == "int8":
        return "onnxruntime"
    if precision in ("fp32", "amp-bf16"):
        if _openvino() is None:
            return "onnxruntime"
        # fp32 products on a CPU without AVX-512: ONNX Runtime is the faster one there (ViT-B-32-256, 200
        # small photos, 2-core AMD EPYC, AVX2 only: encode 18.6 s against 20.5-22.3 s on OpenVINO); OpenVINO
        # where it measured faster (AVX-512, 1.1x) or runs bf16 products
        if products(precision) == "fp32" and not cpu.has("avx512f") \
                and os.environ.get("MMSEARCH_TOWER_RUNTIME", "").lower() != "openvino":
            return "onnxruntime"
        return "openvino"
    raise DeviceError(f"precision {precision} has no exported-tower runtime on a CPU (torch's autocast runs it)")


def products(precision: str) -> str:
    """The arithmetic an exported tower of this precision runs here: 'bf16' only for amp-bf16 on a CPU
    with bf16 products and OpenVINO; 'int8' for int8; 'fp32' otherwise (amp-bf16 included, where the CPU
    lacks bf16: slower than on a bf16 CPU, vectors within the same tolerance of the bf16 ones)."""
    if precision == "int8":
        return "int8"
    return "bf16" if precision == "amp-bf16" and cpu_has_bf16() else "fp32"


def runs_here(precision: str) -> bool:
    """Whether an exported tower of this precision can run on this machine (else torch embeds)."""
    try:
        runtime_for(precision)
    except DeviceError:
        return False
    return True


def open_model(path, precision: str) -> tuple[str, Callable[[np.ndarray], np.ndarray]]:
    """(runtime name, run(pixels) -> first output) for the ONNX file at `path`."""
    runtime = runtime_for(precision)
    try:
        if runtime == "openvino":
            return runtime, _openvino_runner(path, precision)
        return runtime, _onnxruntime_runner(path)
    except DeviceError:
        raise
    except Exception as exc:  # both runtimes raise their own exception types for a bad file
        raise CheckpointError(f"tower {path} is damaged ({exc.__class__.__name__}: {exc})") from exc


def _openvino_runner(path, precision: str):
    ov = _openvino()
    core = ov.Core()
    # f32 unless the index asked for bf16: OpenVINO's own default on a bf16 CPU is bf16, which would
    # silently change an fp32 index's vectors
    config = {"INFERENCE_PRECISION_HINT": "bf16" if products(precision) == "bf16" else "f32",
              "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads()}
    cache = _compiled_cache()
    if cache is not None:
        # a compiled blob keyed by OpenVINO on the file's hash and the config: 0.47 s to open
        # ViT-B-32 instead of 1.2 s (parse the ONNX + compile), which is most of a small run's start
        core.set_property({"CACHE_DIR": str(cache)})
    compiled = core.compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})[0], copy=True)

    return run


def _compiled_cache():
    from mmsearch.towers.cache import cache_root

    root = cache_root()
    if root is None:
        return None
    try:
        (root.parent / "openvino").mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: compile every time
        return None
    return root.parent / "openvino"


def _onnxruntime_runner(path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # spinning intra-op threads would take the cores the (niced) decode threads need between batches
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    session = _optimized_session(ort, so, path)
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


OPTIMIZED_KEEP = 4  # optimised graphs kept in the cache (the most recently used)
KEEP_BELOW_BYTES = 1 << 30  # a bigger tower is optimised at each start: one graph file must stay under protobuf's 2 GB


def _optimized_session(ort, so, path):
    """A session of `path` from ONNX Runtime's own optimised graph of it, kept in the cache for this machine:
    optimising the int8 ViT-B-32 at every start took 0.22-0.40 s of a 10-new-photos run's 1.4 s, and
    opening the kept graph with optimisation off 0.09 s (2-core AMD EPYC, AVX2), the same graph, so the
    same vectors. That graph may hold layouts for this CPU's vector width, so the key is the file
    (device, inode, size, mtime), ONNX Runtime's version, and the CPU's model and flags as /proc/cpuinfo
    gives them. A kept graph that fails to open is removed and made again."""
    kept = _optimized_path(ort, path)
    if kept is not None and kept.is_file():
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(kept), so, providers=["CPUExecutionProvider"])
            os.utime(kept)
            return session
        except Exception:  # a truncated or foreign file: made again below
            kept.unlink(missing_ok=True)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    tmp = None if kept is None else kept.with_name(f"{kept.name}.{os.getpid()}.tmp")
    if tmp is not None:
        so.optimized_model_filepath = str(tmp)
    try:
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception:
        if tmp is None:
            raise
        # the graph could not be saved (a full disk, a graph past protobuf's 2 GB): open the tower plainly
        tmp.unlink(missing_ok=True)
        tmp, so.optimized_model_filepath = None, ""
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    if tmp is not None:
        try:
            os.replace(tmp, kept)
            _evict(kept.parent)
        except OSError:  # the cache is best effort
            tmp.unlink(missing_ok=True)
    return session


def _optimized_path(ort, path):
    import hashlib

    from mmsearch.towers.cache import cache_root

    root = cache_root()
    if root is None:
        return None
    try:
        st = os.stat(path)
        if st.st_size >= KEEP_BELOW_BYTES:
            return None
        folder = root.parent / "onnxruntime"
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home: optimise every time
        return None
    raw = cpu.cpuinfo_flags()
    parts = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, ort.__version__, cpu.model_name(), sorted(raw or ())]
    return folder / (hashlib.sha1(repr(parts).encode()).hexdigest()[:24] + ".onnx")


def _evict(folder) -> None:
    graphs = sorted(folder.glob("*.onnx"), key=lambda f: f.stat().st_mtime, reverse=True)
    for old in graphs[OPTIMIZED_KEEP:]:
        old.unlink(missing_ok=True)
