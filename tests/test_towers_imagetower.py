"""The ONNX image tower equals open_clip's preprocess + encode_image, is re-exported when missing or
stale, keeps the index's precision, and lets `mmsearch index` run without importing torch."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mmsearch.config import ModelSpec
from mmsearch.towers.encoder import load_encoder
from mmsearch.errors import ModelMismatchError
from mmsearch.towers.imagetower import OnnxImageTower, export_image_tower
from mmsearch.indexing.pipeline import index_folders
from mmsearch.storage.store import IndexStore


def _by_path(store):
    ids, emb = store.catalog.embeddings(store.dim)
    path_of = {row[0]: p for p, row in store.catalog.image_states().items()}
    return {path_of[int(i)]: e for i, e in zip(ids, emb)}


def _photos(folder, n, seed, sizes=((500, 375), (375, 500), (64, 64), (301, 97), (40, 30))):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        # smooth colours + noise: resampling filters differ visibly on this, unlike on flat colour
        base = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
        arr = np.asarray(base, np.float32) + rng.normal(0, 20, (h, w, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"p{seed}_{i}.jpg", quality=90)
    return sorted(folder.glob("*.jpg"))


@pytest.fixture(scope="module", params=["tiny-trained", "ViT-B-32"])
def exported(request, tiny_checkpoint, tmp_path_factory):
    spec = ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint)) \
        if request.param == "tiny-trained" else ModelSpec(model="ViT-B-32", pretrained=None)
    enc = load_encoder(spec)
    d = tmp_path_factory.mktemp(request.param)
    export_image_tower(enc, d)
    return enc, OnnxImageTower.load(d)


def test_pixels_equal_open_clip_preprocess(exported, tmp_path, synth_dir):
    from mmsearch.media import load_image

    enc, tower = exported
    files = _photos(tmp_path, 10, seed=1) + sorted(synth_dir.rglob("*.png"))[:4]
    images = [load_image(f, min_size=enc.image_size) for f in files]
    ref = torch.stack([enc.preprocess(im) for im in images]).numpy()
    got = tower.pixels([tower.pil_transform(im) for im in images])
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-6  # same resampling, same crop, same float ops


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_embeddings_equal_torch(exported, runtime, monkeypatch):
    pytest.importorskip(runtime)
    monkeypatch.setenv("MMSEARCH_TOWER_RUNTIME", runtime)
    enc, tower = exported
    tower = OnnxImageTower.load(tower.dir.parent)  # opened afresh under this runtime
    x = np.random.default_rng(0).standard_normal((5, 3, enc.image_size, enc.image_size)).astype(np.float32)
    ref = enc.encode_image_tensor(torch.from_numpy(x))
    got = tower.encode_image_tensor(x)
    assert tower.runtime == runtime
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)


def _fp32_and(precision: str, tiny_checkpoint, tmp_path, seed: int):
    """Six photos indexed twice, into tmp_path/fp32 and tmp_path/<precision>: (photos, spec)."""
    photos = tmp_path / "photos"
    _photos(photos, 6, seed=seed)
    spec = ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint))
    index_folders(tmp_path / "fp32", [photos], spec=spec, precision="fp32")
    index_folders(tmp_path / precision, [photos], spec=spec, precision=precision)
    return photos, spec


def test_int8_keeps_direction_and_is_refused_across_precisions(tiny_checkpoint, tmp_path):
    photos, spec = _fp32_and("int8", tiny_checkpoint, tmp_path, seed=2)
    with pytest.raises(ModelMismatchError, match="fp32, not int8"):
        index_folders(tmp_path / "fp32", [photos], precision="int8")
    with pytest.raises(ModelMismatchError, match="int8, not fp32"):
        index_folders(tmp_path / "int8", [photos], spec=spec, precision="fp32")
    a, b = IndexStore.open(tmp_path / "fp32"), IndexStore.open(tmp_path / "int8")
    assert (a.precision, b.precision) == ("fp32", "int8")
    assert json.loads((tmp_path / "int8" / "image_tower" / "meta.json").read_text())["precision"] == "int8"
    ea, eb = _by_path(a), _by_path(b)
    assert ea.keys() == eb.keys() and len(ea) == 6
    cos = np.array([ea[p] @ eb[p] for p in ea])
    assert cos.min() > 0.99 and max(np.abs(ea[p] - eb[p]).max() for p in ea) > 1e-4  # close, and really int8


def test_bf16_runs_bfloat16_products_where_the_cpu_has_them(tiny_checkpoint, tmp_path):
    """amp-bf16 on a CPU: OpenVINO with bf16 products where the CPU multiplies bf16, else the exported graph in fp32;
    either way the vectors stay within cosine 0.999 of fp32, really differ, and the precision is kept."""
    from mmsearch.towers.runtime import cpu_has_bf16

    photos, spec = _fp32_and("amp-bf16", tiny_checkpoint, tmp_path, seed=4)
    with pytest.raises(ModelMismatchError, match="amp-bf16, not fp32"):
        index_folders(tmp_path / "amp-bf16", [photos], spec=spec, precision="fp32")
    b = IndexStore.open(tmp_path / "amp-bf16")
    enc = b.image_encoder()
    from mmsearch.towers.runtime import products

    if cpu_has_bf16():
        assert isinstance(enc, OnnxImageTower) and enc.runtime == "openvino" and enc.precision == "amp-bf16"
    else:  # the exported graph in fp32 products: no dead end, and the closest a CPU gets without bf16
        assert isinstance(enc, OnnxImageTower) and enc.precision == "amp-bf16" and products("amp-bf16") == "fp32"
    ea, eb = _by_path(IndexStore.open(tmp_path / "fp32")), _by_path(b)
    cos = np.array([ea[p] @ eb[p] for p in ea])
    assert cos.min() > 0.999
    if cpu_has_bf16():  # really bf16 products
        assert max(np.abs(ea[p] - eb[p]).max() for p in ea) > 1e-5


def test_missing_stale_or_damaged_export_is_rebuilt(tiny_checkpoint, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, 4, seed=3)
    idx = tmp_path / "idx"
    index_folders(idx, [photos], spec=ModelSpec(model="mmsearch-tiny", checkpoint=str(tiny_checkpoint)))
    meta_file = idx / "image_tower" / "meta.json"
    good = json.loads(meta_file.read_text())
    store = IndexStore.open(idx)
    assert good["fingerprint"] == store.meta["fingerprint"]
    ref = store.image_encoder().encode_image_tensor(np.zeros((1, 3, 64, 64), np.float32))
    breakages = [lambda: __import__("shutil").rmtree(idx / "image_tower"),
                 lambda: meta_file.write_text(json.dumps(dict(good, fingerprint="0" * 16))),
                 lambda: meta_file.write_text(json.dumps(dict(good, format="mmsearch-image-tower-0"))),
                 lambda: (idx / "image_tower" / "model.onnx").write_bytes(b"not onnx")]
    for i, breaking in enumerate(breakages):
        breaking()
        _photos(photos, 1, seed=10 + i)  # something new to embed
        s = index_folders(idx, [photos])
        assert s.added == 1 and json.loads(meta_file.read_text()) == good, i
        tower = IndexStore.open(idx).image_encoder()
        assert isinstance(tower, OnnxImageTower)
        assert np.abs(tower.encode_image_tensor(np.zeros((1, 3, 64, 64), np.float32)) - ref).max() < 1e-6


def test_incremental_index_imports_no_torch(tiny_checkpoint, tmp_path):
    photos = tmp_path / "photos"
    _photos(photos, 5, seed=4)
    idx = tmp_path / "idx"
    first = index_folders(idx, [photos], spec=ModelSpec(model="mmsearch-tiny", checkpoint=str(tiny_checkpoint)),
                          precision="fp32")  # compared with torch's fp32 vectors below
    _photos(photos, 3, seed=5)
    heavy = "('torch', 'open_clip', 'torchvision')"
    code = ("import sys; from mmsearch.cli import main; sys.argv=['mmsearch']+sys.argv[1:];\n"
            "try:\n    main()\nexcept SystemExit: pass\n"
            f"print('TORCH' if any(m in sys.modules for m in {heavy}) else 'NOTORCH', file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", code, "index", str(photos), "--index", str(idx), "--json"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["added"] == 3
    assert res.stderr.strip().endswith("NOTORCH")
    # and the vectors it added are the ones the torch encoder gives for those files
    store = IndexStore.open(idx)
    enc = load_encoder(store.spec)
    from mmsearch.media import load_image

    got = _by_path(store)
    paths = sorted(got)
    ref = enc.encode_images([load_image(p, min_size=enc.image_size) for p in paths])
    assert first.added == 5 and len(paths) == 8
    assert np.abs(np.stack([got[p] for p in paths]) - ref).max() < 1e-4


def test_new_index_of_a_known_model_reuses_cached_towers_without_torch(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("MMSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    photos = tmp_path / "photos"
    _photos(photos, 4, seed=6)
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(tiny_checkpoint.read_bytes())
    spec = ModelSpec(model="mmsearch-tiny", checkpoint=str(ckpt))
    index_folders(tmp_path / "first", [photos], spec=spec)
    code = ("import sys, json; from mmsearch.indexing.pipeline import index_folders; from mmsearch.config import ModelSpec\n"
            f"s = index_folders({str(tmp_path / 'second')!r}, [{str(photos)!r}], "
            f"spec=ModelSpec(model='ViT-B-32', checkpoint={str(ckpt)!r}))\n"
            "print(s.added, any(m in sys.modules for m in ('torch', 'open_clip')))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["4", "False"], out.stderr
    a, b = IndexStore.open(tmp_path / "first"), IndexStore.open(tmp_path / "second")
    def settled(meta):  # when it was made and how long the ANN build took are the two things that may differ
        out = {k: v for k, v in meta.items() if k != "created_at"}
        out["ann"] = {k: v for k, v in out.get("ann", {}).items() if k != "build_seconds"}
        return out

    assert settled(a.meta) == settled(b.meta)
    ea, eb = _by_path(a), _by_path(b)
    assert all(np.array_equal(ea[p], eb[p]) for p in ea)
    # other weights in the same file (same path, new mtime) are another model: torch loads again
    os.utime(ckpt, ns=(1, 1))
    assert IndexStore.open_or_create(tmp_path / "third", spec=spec)._encoder is not None


def test_a_new_index_gets_bf16_only_where_the_cpu_multiplies_it_and_an_old_one_keeps_its_own(tiny_checkpoint,
                                                                                              tmp_path):
    from mmsearch.towers import cpu
    from mmsearch.towers.devices import default_precision
    from mmsearch.towers.runtime import cpu_has_bf16

    photos = tmp_path / "photos"
    _photos(photos, 3, seed=6)
    spec = ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint))
    index_folders(tmp_path / "new", [photos], spec=spec)
    expected = "amp-bf16" if cpu_has_bf16() else "int8" if cpu.has("avx2") and not cpu.native_bf16() else "fp32"
    assert IndexStore.open(tmp_path / "new").precision == expected == default_precision("cpu")
    assert default_precision("cpu", reranker=True) == "fp32"  # re-ranker tokens come from torch
    index_folders(tmp_path / "old", [photos], spec=spec, precision="fp32")
    _photos(photos, 1, seed=7)
    s = index_folders(tmp_path / "old", [photos])  # no precision given: the index's own, not the default
    assert s.added == 1 and IndexStore.open(tmp_path / "old").precision == "fp32"


def test_a_defaulted_int8_index_falls_back_to_fp32_for_a_model_int8_cannot_run(tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    """int8 is only the AVX2 CPU's default: where its tower cannot be made, the new index is fp32 (with a
    note), never a failed run; an int8 index asked for by name still fails loudly."""
    from mmsearch.errors import UnknownModelError
    from mmsearch.towers import cpu
    from mmsearch.towers.choice import TowerChoice

    monkeypatch.setenv(cpu.ENV_FLAGS, "avx,avx2,fma,f16c")  # AVX2 only: int8 is the default
    real = TowerChoice.image_encoder

    def no_int8(self, *args, **kwargs):
        if self.precision == "int8":
            raise UnknownModelError("simulated: this architecture has no int8 tower")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TowerChoice, "image_encoder", no_int8)
    photos = tmp_path / "photos"
    _photos(photos, 3, seed=8)
    spec = ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint))
    s = index_folders(tmp_path / "auto", [photos], spec=spec)
    store = IndexStore.open(tmp_path / "auto")
    assert store.precision == s.precision == "fp32" and s.added == 3 and s.failed == 0
    assert store.image_vectors().ntotal == 3 and any("int8 cannot run this model" in n for n in s.notes)
    with pytest.raises(UnknownModelError, match="no int8 tower"):
        index_folders(tmp_path / "asked", [photos], spec=spec, precision="int8")


def test_onnx_runtime_keeps_its_optimised_graph_per_machine(tiny_checkpoint, tmp_path, monkeypatch):
    """ONNX Runtime's optimised graph of an int8 tower is kept in the cache and opened with optimisation
    off by the next process: the same vectors; a damaged kept graph is made again; no cache, no file."""
    import onnxruntime as ort

    from mmsearch.towers import runtime

    photos = tmp_path / "photos"
    _photos(photos, 2, seed=5)
    spec = ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint))
    index_folders(tmp_path / "int8", [photos], spec=spec, precision="int8")  # towers from the session's cache
    monkeypatch.setenv("MMSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "int8" / "image_tower" / "model.onnx"
    kept_dir = tmp_path / "cache" / "onnxruntime"
    x = np.random.default_rng(0).random((3, 3, 64, 64), dtype=np.float32)
    plain = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = plain.run(None, {plain.get_inputs()[0].name: x})[0]

    opened = []
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "InferenceSession",
                        lambda path, so, **kw: opened.append((path, so.graph_optimization_level)) or real(path, so, **kw))
    for f in kept_dir.glob("*"):
        f.unlink()
    _, first = runtime.open_model(model, "int8")
    kept = list(kept_dir.glob("*.onnx"))
    assert len(kept) == 1 and opened[-1][0] == str(model)
    _, second = runtime.open_model(model, "int8")
    assert opened[-1] == (str(kept[0]), ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_array_equal(first(x), want)
    np.testing.assert_array_equal(second(x), want)

    kept[0].write_bytes(b"not an onnx graph")
    _, third = runtime.open_model(model, "int8")
    np.testing.assert_array_equal(third(x), want)
    assert kept[0].stat().st_size > 1000  # made again

    monkeypatch.setenv("MMSEARCH_CACHE_DIR", "off")
    opened.clear()
    runtime.open_model(model, "int8")
    assert [p for p, _ in opened] == [str(model)]


def test_a_graph_that_cannot_be_kept_still_opens_the_tower(tiny_checkpoint, tmp_path, monkeypatch):
    """Saving the optimised graph fails (here: its folder is gone; a full disk or a graph past protobuf's
    2 GB alike): the tower opens plainly, with the same vectors, and nothing half-written is left."""
    import onnxruntime as ort

    from mmsearch.towers import runtime

    photos = tmp_path / "photos"
    _photos(photos, 2, seed=6)
    spec = ModelSpec(model="mmsearch-tiny", pretrained=None, checkpoint=str(tiny_checkpoint))
    index_folders(tmp_path / "int8", [photos], spec=spec, precision="int8")
    model = tmp_path / "int8" / "image_tower" / "model.onnx"
    gone = tmp_path / "gone" / "graph.onnx"
    monkeypatch.setattr(runtime, "_optimized_path", lambda ort_, path: gone)
    x = np.random.default_rng(1).random((2, 3, 64, 64), dtype=np.float32)
    plain = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    _, run = runtime.open_model(model, "int8")
    np.testing.assert_array_equal(run(x), plain.run(None, {plain.get_inputs()[0].name: x})[0])
    assert not (tmp_path / "gone").exists()
