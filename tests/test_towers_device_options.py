"""--device on every torch command, GPU-sized defaults, and mixed precision recorded in the index.

This machine has no GPU: CUDA runs are not tested here; what is tested is the selection, the one-line
refusal of an absent device, and amp-bf16 (which torch also runs on the CPU) against fp32.
"""
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.datasets.readers import load_dataset
from mmsearch.towers.devices import check_precision, default_batch_size, default_decode_workers
from mmsearch.errors import DeviceError, ModelMismatchError
from mmsearch.indexing.pipeline import index_folders
from mmsearch.storage.store import IndexStore

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _one_line_error(res, *expected):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)  # a ClickException, not a crash
    lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    for text in expected:
        assert text in lines[0]


@no_cuda
def test_cuda_asked_for_but_absent_is_one_line_on_every_command(tiny_checkpoint, synth_dir, tmp_path):
    data = synth_dir / "captions.csv"
    img = sorted((synth_dir / "images").glob("*.png"))[0]
    commands = {
        "index": ["index", str(img), "--index", str(tmp_path / "idx"), "--checkpoint", str(tiny_checkpoint)],
        "eval": ["eval", str(data), "--checkpoint", str(tiny_checkpoint)],
        "train-reranker": ["train-reranker", str(data), "--checkpoint", str(tiny_checkpoint), "--steps", "1",
                           "--out", str(tmp_path / "rr.pt")],
    }
    for name, args in commands.items():
        _one_line_error(CliRunner().invoke(cli, args + ["--device", "cuda:1"]), "--device cuda:1", "auto or cpu")
    assert not (tmp_path / "idx").exists()  # refused before anything was created
    assert not (tmp_path / "rr.pt").exists()


@no_cuda
def test_search_resolves_the_device_only_for_images_it_must_embed(tiny_checkpoint, synth_dir, tmp_path):
    imgs = sorted((synth_dir / "images").glob("*.png"))
    idx = tmp_path / "idx"
    index_folders(idx, imgs[:6], spec=ModelSpec(checkpoint=str(tiny_checkpoint)))
    ok = CliRunner().invoke(cli, ["search", "red circle", "--index", str(idx), "--device", "cuda", "--paths"])
    assert ok.exit_code == 0 and len(ok.output.split()) == 6  # a text query needs no torch device
    inside = CliRunner().invoke(cli, ["search", "--image", str(imgs[0]), "--index", str(idx), "--device", "cuda",
                                      "--paths", "-k", "1"])
    assert inside.output.split() == [str(imgs[0])]  # an indexed image reuses its stored vector
    _one_line_error(CliRunner().invoke(cli, ["search", "--image", str(imgs[10]), "--index", str(idx), "--device",
                                             "cuda"]), "--device cuda")
    cpu = CliRunner().invoke(cli, ["search", "--image", str(imgs[10]), "--index", str(idx), "--device", "cpu",
                                   "--paths", "-k", "6"])
    assert cpu.exit_code == 0 and len(cpu.output.split()) == 6
    assert "device" not in IndexStore.open(idx).meta  # the device is never part of the model record


def test_gpu_defaults_are_larger_and_cpu_defaults_unchanged():
    assert default_batch_size(torch.device("cpu")) == 32
    assert default_batch_size(torch.device("cuda")) == 256 > default_batch_size(torch.device("mps"))
    assert default_decode_workers(torch.device("cpu"), cpus=32) == 4
    assert default_decode_workers(torch.device("cuda"), cpus=32) == 16
    assert default_decode_workers(torch.device("cuda"), cpus=1) == 2
    assert check_precision("amp-bf16", torch.device("cpu")) == "amp-bf16"
    with pytest.raises(DeviceError, match="amp-fp16 is not supported on cpu"):
        check_precision("amp-fp16", torch.device("cpu"))
    with pytest.raises(DeviceError, match="unknown precision"):
        check_precision("fp8", torch.device("cpu"))


@pytest.fixture(scope="module")
def test_split(synth_dir):
    return load_dataset(synth_dir / "captions.csv", split="test")


def _recall_at(store, ds, k):
    enc = store.text_encoder()
    q = enc.encode_texts(ds.captions)
    _, hits = store.image_vectors().search(q, k)
    rows = store.catalog.rows(np.unique(hits))
    paths = np.vectorize(lambda i: rows[int(i)]["path"] if int(i) in rows else "")(hits)
    want = np.array([ds.images[i] for i in ds.caption_image])
    return float(np.mean([w in row for w, row in zip(want, paths)]))


def test_amp_bf16_is_recorded_close_to_fp32_keeps_recall_and_refuses_mixing(tiny_checkpoint, test_split, tmp_path):
    spec = ModelSpec(checkpoint=str(tiny_checkpoint))
    files = test_split.images
    index_folders(tmp_path / "fp32", files, spec=spec, precision="fp32")
    index_folders(tmp_path / "amp", files, spec=spec, precision="amp-bf16")
    fp32, amp = IndexStore.open(tmp_path / "fp32"), IndexStore.open(tmp_path / "amp")
    assert fp32.precision == "fp32" and amp.meta["precision"] == "amp-bf16"
    ids_a, a = fp32.catalog.embeddings(fp32.dim)
    ids_b, b = amp.catalog.embeddings(amp.dim)
    pa = {r["path"]: i for i, r in fp32.catalog.rows(ids_a).items()}
    pb = {r["path"]: i for i, r in amp.catalog.rows(ids_b).items()}
    va = a[np.searchsorted(ids_a, [pa[p] for p in files])]
    vb = b[np.searchsorted(ids_b, [pb[p] for p in files])]
    cos = np.sum(va * vb, axis=1)
    from mmsearch.towers.runtime import cpu_has_bf16

    assert cos.min() > 0.99
    if cpu_has_bf16():  # close, but not the same vectors: bf16 products
        assert not np.allclose(va, vb, atol=1e-6)
    else:  # no bf16 arithmetic here: the graph runs in fp32 products, the vectors are fp32's
        assert np.allclose(va, vb, atol=1e-4)
    for k in (1, 5):
        r32, r16 = _recall_at(fp32, test_split, k), _recall_at(amp, test_split, k)
        assert r32 > 0.1 and abs(r32 - r16) <= 0.03, (k, r32, r16)
    with pytest.raises(ModelMismatchError, match="was built in amp-bf16, not fp32: mixing them would mix embeddings"):
        index_folders(tmp_path / "amp", files, precision="fp32")
    assert index_folders(tmp_path / "amp", files).unchanged == len(files)  # no --precision: the index's own
    with pytest.raises(DeviceError, match="amp-fp16"):
        index_folders(tmp_path / "fp16", files, spec=spec, precision="amp-fp16")
    assert not (tmp_path / "fp16").exists()


def test_ray_missing_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    res = CliRunner().invoke(cli, ["index", str(tmp_path), "--index", str(tmp_path / "idx"), "--ray", "auto"])
    _one_line_error(res, "pip install 'mmsearch[ray]'")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CPU/GPU agreement needs a CUDA GPU (none on CI)")
def test_an_index_built_on_the_gpu_matches_the_cpu(tiny_checkpoint, test_split, tmp_path):
    spec = ModelSpec(checkpoint=str(tiny_checkpoint))
    index_folders(tmp_path / "gpu", test_split.images, spec=spec, device="cuda")
    index_folders(tmp_path / "cpu", test_split.images, spec=spec, device="cpu")
    gpu, cpu = IndexStore.open(tmp_path / "gpu", device="cpu"), IndexStore.open(tmp_path / "cpu")
    def by_path(store):
        ids, emb = store.catalog.embeddings(store.dim)
        rows = store.catalog.rows(ids)
        return {rows[int(i)]["path"]: v for i, v in zip(ids, emb)}

    a, b = by_path(gpu), by_path(cpu)
    assert a.keys() == b.keys()
    assert min(float(np.dot(a[p], b[p])) for p in a) > 0.9999
    assert abs(_recall_at(gpu, test_split, 5) - _recall_at(cpu, test_split, 5)) <= 0.01
