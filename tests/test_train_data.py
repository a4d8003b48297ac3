"""Streaming training data: the DataLoader workers give exactly the batches of a naive in-memory
reference; tar shards are read by offset without extracting anything, bad samples are skipped and
counted, and memory stays flat over 20,000 images."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from mmsearch.config import ModelSpec
from mmsearch.datasets.readers import load_dataset
from mmsearch.towers.encoder import load_encoder
from mmsearch.errors import DatasetError, TrainingError
from mmsearch.media import load_image
from mmsearch.train.data import BatchPlan, StepBatches, batch_loader, item_seed, open_source
from mmsearch.train.shards import index_shards
from conftest import one_torch_thread


@pytest.fixture(scope="module")
def tiny_encoder():
    return load_encoder(ModelSpec(model="mmsearch-tiny", pretrained=None))


def _reference_batch(images, captions, transform, plan, step):
    """The naive in-memory path: every image decoded up front, the batch built in the main process."""
    idx = plan.indices(step)
    pixels, texts = [], []
    for p in range(plan.batch_size):
        i = int(idx[p])
        texts.append(captions[i][np.random.default_rng([plan.seed, step, p, 1]).integers(len(captions[i]))])
        torch.manual_seed(item_seed(plan.seed, step, p))  # the slow, plain way
        pixels.append(transform(images[i]))
    return torch.stack(pixels), texts


def test_worker_batches_equal_the_in_memory_path(synth_dir, tiny_encoder):
    source = open_source(synth_dir / "captions.csv", "train")
    ds = load_dataset(synth_dir / "captions.csv", split="train")
    images = [load_image(p, min_size=64) for p in ds.images]  # what training did before streaming
    plan = BatchPlan(len(source), 32, seed=3)
    steps = [0, 1, plan.per_epoch + 2]  # two epochs: a new permutation
    batches = StepBatches(source, tiny_encoder.preprocess_train, plan, min_size=64)
    with one_torch_thread():
        got = list(batch_loader(batches, steps, workers=2))
    assert [b["step"] for b in got] == steps
    for b, step in zip(got, steps):
        pixels, texts = _reference_batch(images, source.captions, tiny_encoder.preprocess_train, plan, step)
        assert b["texts"] == texts and b["bad"] == []
        assert torch.equal(b["pixels"], pixels)
    assert not torch.equal(got[0]["pixels"], got[1]["pixels"])
    # the augmentation is random, not the identity: the eval transform gives other pixels
    i0 = int(plan.indices(0)[0])
    assert not torch.equal(got[0]["pixels"][0], tiny_encoder.preprocess(images[i0]))


def test_a_small_set_is_decoded_once_and_gives_the_same_batches(synth_dir, tiny_encoder, monkeypatch):
    """Issue 32 (training on AVX2): FileImages keeps a small set's decoded images, so the second epoch
    reads no file, and its batches still equal the naive path's."""
    from mmsearch.train import data as data_mod

    source = open_source(synth_dir / "captions.csv", "train")
    ds = load_dataset(synth_dir / "captions.csv", split="train")
    images = [load_image(p, min_size=64) for p in ds.images]
    reads = []
    monkeypatch.setattr(data_mod, "load_image", lambda path, min_size=None: reads.append(path) or
                        load_image(path, min_size=min_size))
    plan = BatchPlan(len(source), 64, seed=5)
    batches = StepBatches(source, tiny_encoder.preprocess_train, plan, min_size=64)
    steps = list(range(plan.per_epoch)) + [plan.per_epoch, plan.per_epoch + 1]  # one epoch, then two more steps
    with one_torch_thread():
        got = [batches[s] for s in steps]
    assert len(reads) == len(set(reads)) <= len(source) < len(steps) * plan.batch_size  # nothing read twice
    for b, step in zip(got[-2:], steps[-2:]):
        pixels, texts = _reference_batch(images, source.captions, tiny_encoder.preprocess_train, plan, step)
        assert b["texts"] == texts and torch.equal(b["pixels"], pixels)
    monkeypatch.setattr(data_mod, "DECODED_CACHE_BYTES", 0)  # a large set: nothing kept, the same pixels
    fresh = open_source(synth_dir / "captions.csv", "train")
    again = StepBatches(fresh, tiny_encoder.preprocess_train, plan, min_size=64)[steps[-1]]
    assert torch.equal(again["pixels"], got[-1]["pixels"]) and fresh._decoded == {}


def test_ranks_and_micro_batches_split_the_same_global_batch(synth_dir, tiny_encoder):
    source = open_source(synth_dir / "captions.csv", "train")
    whole = StepBatches(source, tiny_encoder.preprocess_train, BatchPlan(len(source), 16, 0), min_size=64)[5]
    plan2 = BatchPlan(len(source), 16, 0, world_size=2, accum_steps=2)
    halves = [StepBatches(source, tiny_encoder.preprocess_train, plan2, rank=r, min_size=64)[5] for r in (0, 1)]
    assert plan2.local_size == 8 and plan2.micro_size == 4
    assert torch.equal(torch.cat([h["pixels"] for h in halves]), whole["pixels"])
    assert halves[0]["texts"] + halves[1]["texts"] == whole["texts"]
    with pytest.raises(TrainingError, match="multiple of processes"):
        BatchPlan(100, 10, 0, world_size=4)


def _png(colour, size=64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes, kind=tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_bad_samples_in_a_shard_are_skipped_and_counted(tmp_path, tiny_encoder):
    good = {f"{i:05d}": (40 * i % 255, 90, 200) for i in range(12)}
    shard = tmp_path / "shards" / "00000.tar"
    shard.parent.mkdir()
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(jpeg, format="JPEG")
    with tarfile.open(shard, "w") as tf:
        for key, colour in good.items():
            _add(tf, f"{key}.png", _png(colour))
            _add(tf, f"{key}.txt", f"a picture numbered {key}".encode())
        _add(tf, "bad01.jpg", b"\xff\xd8\xff not a jpeg at all")  # corrupt
        _add(tf, "bad01.txt", b"a corrupt picture")
        _add(tf, "bad02.jpg", jpeg.getvalue()[:200])  # truncated
        _add(tf, "bad02.json", b'{"caption": "a truncated picture"}')
        _add(tf, "nocap.png", _png((1, 2, 3)))  # no caption: not a sample
        _add(tf, "link.png", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")  # never followed
        _add(tf, "link.txt", b"a link")
        _add(tf, "../../escape.png", _png((9, 9, 9)))  # a key like any other: never a path
        _add(tf, "../../escape.txt", b"an escaping name")
    index = index_shards([shard])
    assert len(index) == 12 + 2 + 1  # 12 good, 2 bad images (found at decode), the odd name
    assert any("nocap: no caption" in s for s in index.skipped)
    assert any("link: no image" in s for s in index.skipped)
    source = open_source(shard.parent, "train")
    plan = BatchPlan(len(source), len(source), seed=0)
    batch = StepBatches(source, tiny_encoder.preprocess_train, plan, min_size=64)[0]
    assert batch["pixels"].shape[0] == len(source)  # each bad image replaced: the batch keeps its size
    assert len(batch["bad"]) >= 2 and all("bad0" in b for b in batch["bad"])
    assert not (tmp_path / "escape.png").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["shards"]
    with pytest.raises(DatasetError, match="no 'val' split"):
        open_source(shard.parent, "val")


def test_training_on_shards_counts_skipped_images(tmp_path, synth_dir):
    from mmsearch.train import train_encoder

    ds = load_dataset(synth_dir / "captions.csv", split="train")
    shard = tmp_path / "data" / "00000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tf:
        for i in range(40):
            _add(tf, f"{i:05d}.png", open(ds.images[i], "rb").read())
            _add(tf, f"{i:05d}.txt", ds.captions[int(np.flatnonzero(ds.caption_image == i)[0])].encode())
        for i in range(4):
            _add(tf, f"junk{i}.jpg", b"garbage")
            _add(tf, f"junk{i}.txt", b"junk")
    with one_torch_thread():
        res = train_encoder(shard.parent, ModelSpec(model="mmsearch-tiny", pretrained=None), tmp_path / "m.pt",
                            steps=3, batch_size=44, lr=1e-3, workers=0)
    assert res["steps"] == 3 and res["skipped_images"] >= 4 and np.isfinite(res["final_loss"])


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2 ** 20


def _to_tensor(image):  # a light transform: this test is about what the pipeline holds, not augmentation
    return torch.from_numpy(np.asarray(image).copy())


def test_memory_stays_flat_over_20000_images(tmp_path):
    n, side = 20_000, 48
    shard = tmp_path / "big.tar"
    pngs = [_png((c * 37 % 255, c * 91 % 255, 128), size=side) for c in range(16)]
    with tarfile.open(shard, "w") as tf:
        for i in range(n):
            _add(tf, f"{i:06d}.png", pngs[i % 16])
            _add(tf, f"{i:06d}.txt", f"colour {i % 16} number {i}".encode())
    source = open_source(shard, "train")
    assert len(source) == n
    plan = BatchPlan(n, 500, seed=0)
    seen = 0
    for b in batch_loader(StepBatches(source, _to_tensor, plan), range(plan.per_epoch), workers=0):
        seen += len(b["texts"])
        if b["step"] == 1:
            after_two = _rss_mb()
    growth = _rss_mb() - after_two
    held = n * side * side * 3 / 2 ** 20  # what decoding every image up front would hold (132 MB)
    assert seen == n and held > 4 * 30
    assert growth < 30, f"RSS grew {growth:.0f} MB over {n} images"


def test_the_batched_tensor_tail_gives_the_per_image_pixels(synth_dir, tiny_encoder):
    """ToTensor and Normalize run once per batch (data.TensorTail): the same pixels as open_clip's whole
    transform image by image, and images it cannot stack (mixed sizes, another mode) go the plain way."""
    from mmsearch.train.data import split_tensor_tail

    tail = split_tensor_tail(tiny_encoder.preprocess_train)
    assert tail is not None  # open_clip's train and eval transforms both end in ToTensor, Normalize
    assert split_tensor_tail(tiny_encoder.preprocess) is not None and split_tensor_tail(lambda im: im) is None
    ds = load_dataset(synth_dir / "captions.csv", split="train")
    crops = [tail.per_image(load_image(p, min_size=64)) for p in ds.images[:8]]
    full = torch.stack([tiny_encoder.preprocess_train.transforms[-2](c) for c in crops])
    full = torch.stack([tiny_encoder.preprocess_train.transforms[-1](x) for x in full])
    assert torch.equal(tail.batch(crops), full)
    odd = crops[:3] + [crops[3].convert("L").convert("RGB").resize((64, 64)), crops[4].convert("RGBA")]
    ref = torch.stack([tiny_encoder.preprocess_train.transforms[-1](tiny_encoder.preprocess_train.transforms[-2](c))
                       for c in odd[:4]])
    assert torch.equal(tail.batch(odd[:4]), ref)
    with pytest.raises(RuntimeError):  # RGBA reaches ToTensor as 4 channels: the plain path, its own error
        tail.batch(odd)


def test_caption_tokens_are_the_batch_tokenized_at_once(tiny_encoder):
    from mmsearch.train.data import CaptionTokens

    calls = []

    def tokenize(texts):
        calls.append(list(texts))
        return tiny_encoder.tokenize(texts)

    cache = CaptionTokens(tokenize, max_rows=3)
    first = ["a red circle", "a blue square", "a red circle"]
    assert torch.equal(cache(first), tiny_encoder.tokenize(first)) and calls == [["a red circle", "a blue square"]]
    assert torch.equal(cache(first[::-1]), tiny_encoder.tokenize(first[::-1])) and len(calls) == 1  # all kept
    more = ["a green triangle", "a yellow star", "a blue square"]  # past max_rows: tokenized, not kept
    assert torch.equal(cache(more), tiny_encoder.tokenize(more)) and calls[-1] == more[:2]
    assert len(cache.rows) == 2
