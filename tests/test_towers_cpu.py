"""Issue 32: defaults chosen per CPU, from one probe (mmsearch.towers.cpu) that MMSEARCH_CPU_FLAGS
simulates, and an amp-bf16 index that stays usable (searches and updates) on a CPU without bf16."""
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.indexing.pipeline import index_folders
from mmsearch.search.query import Searcher
from mmsearch.storage.store import IndexStore
from mmsearch.towers import cpu
from mmsearch.towers.devices import default_decode_workers, default_precision, torch_precision
from mmsearch.towers.imagetower import OnnxImageTower
from mmsearch.train.precision import Precision

AVX2 = "avx,avx2,fma,f16c"  # an Intel Core 12th-14th gen without AVX-VNNI, AMD Zen 2/3
SAPPHIRE = "avx,avx2,fma,avx512f,avx512bw,avx512_vnni,avx512_bf16,amx_tile,amx_bf16"


def test_flags_come_from_the_env_var_and_decide_bf16(monkeypatch):
    monkeypatch.setenv(cpu.ENV_FLAGS, AVX2)
    assert cpu.flags() == {"avx", "avx2", "fma", "f16c"} and not cpu.native_bf16()
    monkeypatch.setenv(cpu.ENV_FLAGS, "AVX2 AVX512F avx512_bf16")  # spaces or commas, any case
    assert cpu.has("avx512f") and cpu.native_bf16()
    monkeypatch.setenv(cpu.ENV_FLAGS, "avx2,amx_bf16")
    assert cpu.native_bf16()


def test_a_onednn_isa_cap_caps_the_flags_like_the_kernels(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes torch's and OpenVINO's oneDNN run AVX2 kernels: the probe agrees."""
    real = set(SAPPHIRE.split(",")) | {"sse4_2", "avx_vnni", "avx512ifma"}
    monkeypatch.delenv(cpu.ENV_FLAGS, raising=False)
    monkeypatch.setattr(cpu, "cpuinfo_flags", lambda: set(real))
    cpu._flags.cache_clear()
    try:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        assert cpu.flags() == {"avx", "avx2", "fma", "sse4_2"} and not cpu.native_bf16()
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
        assert cpu.native_bf16() and not cpu.has("amx_bf16") and not cpu.has("avx_vnni")
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2_VNNI")
        assert cpu.has("avx_vnni") and not cpu.has("avx512f")
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        assert cpu.flags() == real
    finally:
        cpu._flags.cache_clear()


def test_every_default_follows_the_simulated_cpu(monkeypatch):
    """Issue 32: the precision chosen for a new index (and for training) follows the CPU's capabilities."""
    monkeypatch.delenv("MMSEARCH_TOWER_RUNTIME", raising=False)
    monkeypatch.setenv(cpu.ENV_FLAGS, AVX2)
    assert default_precision("cpu") == "int8"  # fp32 is at this CPU's limit; int8 held quality (tower_precision.py)
    assert default_precision("cpu", reranker=True) == "fp32"  # re-ranker tokens come from torch
    assert default_precision("cuda") == "fp32"
    assert Precision.create("auto", torch.device("cpu")).name == "fp32"
    assert torch_precision("amp-bf16", "cpu") == "fp32"
    monkeypatch.setenv(cpu.ENV_FLAGS, SAPPHIRE)
    assert default_precision("cpu") == ("amp-bf16" if cpu.openvino_installed() else "fp32")
    assert default_precision("cpu", reranker=True) == "fp32"  # re-ranker tokens come from torch
    assert Precision.create("auto", torch.device("cpu")).name == "bf16"
    assert torch_precision("amp-bf16", "cpu") == "amp-bf16"
    monkeypatch.setenv("MMSEARCH_TOWER_RUNTIME", "onnxruntime")  # no bf16 kernels in ONNX Runtime
    assert default_precision("cpu") == "fp32"  # a bf16 CPU without OpenVINO: int8 was not measured there
    monkeypatch.setenv(cpu.ENV_FLAGS, "sse4_2")  # no AVX2 (or not x86): int8 was not measured there
    assert default_precision("cpu") == "fp32"


def test_cores_follow_the_override_affinity_and_quota(monkeypatch):
    monkeypatch.setenv("MMSEARCH_CPUS", "3")
    assert cpu.cores() == 3 and default_decode_workers("cpu") == 3
    monkeypatch.delenv("MMSEARCH_CPUS")
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: 1)
    assert cpu.cores() == 1 and default_decode_workers("cpu") == 1
    monkeypatch.setattr(cpu, "_cgroup_quota", lambda: None)
    assert cpu.cores() >= 1
    info = cpu.describe()
    assert info["cores"] == cpu.cores() and set(info["flags"]) <= set(cpu.RELEVANT) and info["model"]


def _photos(folder, n, seed):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        base = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((80, 64), Image.BICUBIC)
        arr = np.asarray(base, np.float32) + rng.normal(0, 20, (64, 80, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"p{seed}_{i}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


def _vectors(store):
    ids, emb = store.catalog.embeddings(store.dim)
    path_of = {row[0]: p for p, row in store.catalog.image_states().items()}
    return {path_of[int(i)]: e for i, e in zip(ids, emb)}


def test_an_amp_bf16_index_searches_and_updates_where_the_cpu_lacks_bf16(tiny_checkpoint, tmp_path, monkeypatch):
    """Issue 32: an index made in amp-bf16 opened where the CPU lacks bf16 (simulated) still searches and
    updates, keeps its precision, and says in one line that it runs fp32 products here."""
    pytest.importorskip("onnxruntime")
    photos = tmp_path / "photos"
    first = _photos(photos, 4, seed=1)
    idx = tmp_path / "idx"
    monkeypatch.setenv(cpu.ENV_FLAGS, SAPPHIRE)
    made = index_folders(idx, [photos], spec=ModelSpec(checkpoint=str(tiny_checkpoint)), precision="amp-bf16")
    assert made.precision == "amp-bf16" and made.notes == []
    before = _vectors(IndexStore.open(idx))

    monkeypatch.setenv(cpu.ENV_FLAGS, AVX2)  # the same index, opened on an AVX2-only CPU
    store = IndexStore.open(idx)
    tower = store.image_encoder()
    assert isinstance(tower, OnnxImageTower) and tower.precision == "amp-bf16"  # no torch, no dead end
    from mmsearch.towers.runtime import products

    assert products("amp-bf16") == "fp32"
    # the same files embedded here agree with the stored bf16 vectors as closely as bf16 agrees with fp32
    from mmsearch.media import load_image

    again = tower.encode_images([load_image(p, min_size=tower.image_size) for p in first])
    cos = [float(v @ before[str(p)]) for v, p in zip(again, first)]
    assert min(cos) > 0.999

    _photos(photos, 2, seed=2)
    res = CliRunner().invoke(cli, ["index", str(photos), "--index", str(idx), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["added"] == 2 and summary["precision"] == "amp-bf16"
    assert "no bfloat16 arithmetic" in res.stderr and len(summary["notes"]) == 1
    store = IndexStore.open(idx)
    assert store.precision == "amp-bf16" and len(_vectors(store)) == 6
    for p, v in before.items():  # nothing already stored was re-embedded
        assert np.array_equal(_vectors(store)[p], v)
    hits = Searcher(store).search("red circle", k=3)
    assert len(hits) == 3
    outside = _photos(tmp_path / "outside", 1, seed=3)[0]
    top = Searcher(IndexStore.open(idx)).search(images=[str(first[0])], k=1)
    assert top[0].path == str(first[0])
    assert len(Searcher(IndexStore.open(idx)).search(images=[str(outside)], k=2)) == 2


def test_runs_use_the_idle_cores_and_give_the_thread_count_back(monkeypatch):
    """Issue 32 (training on AVX2): torch gets the cores other work leaves idle (a thread on a busy core
    stalls the others at every operator), never more than it had, and a user's OMP_NUM_THREADS wins."""
    from mmsearch.train import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    monkeypatch.setattr(cpu, "idle_cores", lambda: 1)
    with threads.cpu_threads("cpu") as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with threads.cpu_threads("cuda") as n:  # a GPU run keeps torch's own count
        assert n == before == torch.get_num_threads()
    monkeypatch.setattr(cpu, "idle_cores", lambda: 64)
    assert threads.run_threads() == before  # never more than torch had
    monkeypatch.setattr(cpu, "idle_cores", lambda: 1)
    monkeypatch.setenv("OMP_NUM_THREADS", str(before))
    assert threads.run_threads() == before  # the user's choice


def test_idle_cores_subtract_what_other_processes_use_now(monkeypatch):
    monkeypatch.setattr(cpu, "cores", lambda: 2)
    for busy, idle in ((0.1, 2), (0.7, 1), (1.4, 1), (7.0, 1)):
        monkeypatch.setattr(cpu, "busy_elsewhere", lambda busy=busy: busy)
        cpu.idle_cores.cache_clear()
        assert cpu.idle_cores() == idle, busy
    # without /proc/stat the 1-minute load average stands in
    monkeypatch.setattr(cpu, "busy_elsewhere", lambda: None)
    for load, idle in ((0.2, 2), (0.6, 1), (1.4, 1), (7.0, 1)):
        monkeypatch.setattr(cpu.os, "getloadavg", lambda load=load: (load, load, load))
        cpu.idle_cores.cache_clear()
        assert cpu.idle_cores() == idle, load
    cpu.idle_cores.cache_clear()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc/stat")
@pytest.mark.solo  # it reads the whole machine's CPU time: an xdist worker beside it counts as "other"
def test_busy_elsewhere_sees_another_process_and_not_this_one():
    """A process spinning on a core counts as busy; this process's own spinning thread does not (the load
    average counted both, and for a minute after they stopped)."""
    import subprocess
    import sys
    import threading
    import time

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()+5\nwhile time.time()<t: pass"])
    try:
        time.sleep(0.3)
        other = cpu.busy_elsewhere(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    stop = time.monotonic() + 1.0

    def spin():
        while time.monotonic() < stop:
            pass

    th = threading.Thread(target=spin)
    th.start()
    time.sleep(0.1)
    own = cpu.busy_elsewhere(0.5)
    th.join()
    assert other >= 0.6, other
    assert own < other - 0.4, (own, other)


def test_a_new_fp32_index_says_what_int8_would_gain_on_this_kind_of_cpu(monkeypatch):
    """Issue 32: fp32 stays the default without bf16 (int8's quality is reported, not assumed); the index
    command says in one line how much faster --precision int8 measured on a CPU of this kind."""
    from mmsearch.cli.index_cmds import int8_hint

    for flags, want in (("avx,avx2,fma,f16c", "~1.6x"), ("avx2,avx512f,avx512_vnni", "~2.9x"),
                        ("avx2,avx512f,avx512_vnni,avx512_bf16", None), ("sse4_2", None)):
        monkeypatch.setenv(cpu.ENV_FLAGS, flags)
        hint = int8_hint()
        assert (want in hint and "--precision int8" in hint) if want else hint == "", (flags, hint)


def test_fp32_towers_run_where_they_measured_faster(monkeypatch):
    """Issue 32: fp32 on an AVX2-only CPU runs on ONNX Runtime (faster there, measured), on OpenVINO with
    AVX-512; bf16 products stay OpenVINO's; MMSEARCH_TOWER_RUNTIME chooses."""
    pytest.importorskip("openvino")
    from mmsearch.towers.runtime import runtime_for

    monkeypatch.delenv("MMSEARCH_TOWER_RUNTIME", raising=False)
    monkeypatch.setenv(cpu.ENV_FLAGS, "avx,avx2,fma,f16c")
    assert runtime_for("fp32") == runtime_for("amp-bf16") == "onnxruntime" and runtime_for("int8") == "onnxruntime"
    monkeypatch.setenv(cpu.ENV_FLAGS, "avx2,avx512f,avx512_vnni")
    assert runtime_for("fp32") == "openvino"
    monkeypatch.setenv(cpu.ENV_FLAGS, "avx2,avx512f,avx512_bf16")
    assert runtime_for("amp-bf16") == "openvino"
    monkeypatch.setenv(cpu.ENV_FLAGS, "avx,avx2,fma,f16c")
    monkeypatch.setenv("MMSEARCH_TOWER_RUNTIME", "openvino")
    assert runtime_for("fp32") == "openvino"


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc/stat")
@pytest.mark.solo  # it reads the whole machine's CPU time: an xdist worker beside it counts as "other"
def test_a_watch_started_earlier_measures_without_waiting(monkeypatch):
    """An index run starts the watch before it plans: idle_cores' window has passed by the time the tower
    opens, so it waits for nothing and still sees another process's load; a stale watch is not used."""
    import subprocess
    import sys
    import time

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()+5\nwhile time.time()<t: pass"])
    try:
        time.sleep(0.3)
        cpu.start_watch()
        time.sleep(0.4)
        t = time.monotonic()
        busy = cpu.busy_elsewhere()
        waited = time.monotonic() - t
        monkeypatch.setattr(cpu, "WATCH_MAX_AGE_S", 0.0)  # stale: a fresh window, waited for in full
        t = time.monotonic()
        cpu.busy_elsewhere()
        fresh_wait = time.monotonic() - t
    finally:
        spinner.kill()
        spinner.wait()
    assert busy >= 0.6, busy
    assert waited < 0.05 <= cpu.BUSY_WINDOW_S * 0.9 <= fresh_wait, (waited, fresh_wait)
