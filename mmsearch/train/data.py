"""Streaming training data: which images make step s's batch, and DataLoader workers that decode and
augment them. Memory holds the captions, the batches in flight and, for a small set, its decoded images
(FileImages: at most DECODED_CACHE_BYTES per process); never a large set's images.

Every choice is a pure function of (seed, step, position in the global batch): the epoch permutation,
the caption drawn for an image, the augmentation's random numbers, the replacement for an unreadable
image. So a resumed run, a run with more DataLoader workers, a run split over several processes or
into accumulation micro-batches all see exactly the same global batch of the same step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from mmsearch.datasets.readers import CaptionDataset, load_dataset
from mmsearch.errors import DatasetError, MediaError, TrainingError
from mmsearch.media import load_image
from mmsearch.train import shards as shard_io

MAX_REPLACEMENTS = 20  # unreadable images in a row before a step gives up


DECODED_CACHE_BYTES = 128 << 20  # decoded images kept per process while the whole set fits (small sets)


class FileImages:
    """Images named by a caption dataset (CSV, JSONL, COCO, Karpathy, folder): read from disk by path.
    Decoded images are kept while they fit in DECODED_CACHE_BYTES (a small set, such as the demo's, is
    decoded once, not once per epoch: 0.3 of the 0.9 ms each image of a batch cost); the pixels are the
    same either way, and the augmentation runs on every draw."""

    def __init__(self, ds: CaptionDataset):
        self.paths = ds.images
        self.captions: list[list[str]] = [[] for _ in ds.images]
        for c, i in zip(ds.captions, ds.caption_image):
            self.captions[int(i)].append(c)
        self.skipped = list(ds.skipped)
        self._decoded: dict = {}
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return self.paths[i]

    def open(self, i: int, min_size: Optional[int]):
        key = (i, min_size)
        if key in self._decoded:
            return self._decoded[key]
        img = load_image(self.paths[i], min_size=min_size)
        size = img.width * img.height * len(img.getbands())
        if self._decoded_bytes + size <= DECODED_CACHE_BYTES:
            img.load()
            self._decoded[key] = img
            self._decoded_bytes += size
        return img


class ShardImages:
    """Images inside webdataset tar shards, read by byte offset (see shards.py)."""

    def __init__(self, index: shard_io.ShardIndex):
        self.index = index
        self.captions = index.captions
        self.skipped = list(index.skipped)

    def __len__(self) -> int:
        return len(self.index)

    def name(self, i: int) -> str:
        shard, _, _, key = self.index.entries[i]
        return f"{self.index.shards[shard]}:{key}"

    def open(self, i: int, min_size: Optional[int]):
        try:
            data = shard_io.read_sample(self.index, i)
        except OSError as exc:
            raise MediaError(self.name(i), f"cannot read shard ({exc.__class__.__name__})") from exc
        return shard_io.decode_image(data, self.name(i), min_size)


def open_source(data, split: Optional[str], images_root=None):
    """The training images of `data`: tar shards (a .tar or a folder of them) or any caption dataset."""
    shards = shard_io.find_shards(data)
    if shards:
        if split not in (None, "train"):
            raise DatasetError(f"{data}: tar shards have no '{split}' split (give a held-out set separately)")
        return ShardImages(shard_io.index_shards(shards))
    return FileImages(load_dataset(data, split=split, images_root=images_root))


@dataclass(frozen=True)
class BatchPlan:
    """Global batches: seeded epoch permutations of the images; a batch never repeats an image."""
    n_images: int
    batch_size: int  # the global batch: what one optimiser step's loss sees
    seed: int
    world_size: int = 1
    accum_steps: int = 1

    def __post_init__(self):
        if self.batch_size % (self.world_size * self.accum_steps):
            raise TrainingError(f"batch size {self.batch_size} must be a multiple of processes × accumulation "
                                f"steps ({self.world_size} × {self.accum_steps})")

    @property
    def per_epoch(self) -> int:
        return max(1, self.n_images // self.batch_size)

    @property
    def local_size(self) -> int:
        return self.batch_size // self.world_size

    @property
    def micro_size(self) -> int:
        return self.local_size // self.accum_steps

    def indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_images)
        return perm[k * self.batch_size:(k + 1) * self.batch_size]

    def positions(self, rank: int) -> range:
        """This rank's share of the global batch (its micro-batches are consecutive slices of it)."""
        return range(rank * self.local_size, (rank + 1) * self.local_size)


def item_seed(seed: int, step: int, position: int, attempt: int = 0) -> int:
    return int(np.random.SeedSequence([seed, step, position, attempt]).generate_state(1)[0])


def seeded(transform, image, seed: int):
    """transform(image) with torch's CPU generator seeded, then restored (with workers=0 this is the
    training process's generator). Not torch.manual_seed: in torch 2.x it records a stack trace per
    call, 8 ms, more than the decode and augmentation together."""
    gen = torch.random.default_generator
    saved = gen.get_state()
    gen.manual_seed(seed)
    try:
        return transform(image)
    finally:
        gen.set_state(saved)


class TensorTail:
    """open_clip's transform split in two: the PIL steps run per image; ToTensor and Normalize run once on
    the stacked batch. They are element-wise (x / 255, then (x - mean) / std in float32), so the batch
    holds the very pixels the per-image path gives, for 0.3 ms an image less (19 of a 200 ms demo step)."""

    def __init__(self, per_image, mean, std, tail):
        self.per_image, self.tail = per_image, tail
        self.mean = torch.as_tensor(mean, dtype=torch.get_default_dtype()).view(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.get_default_dtype()).view(1, -1, 1, 1)

    def batch(self, images: list) -> torch.Tensor:
        from PIL import Image

        shapes = {(im.mode, im.size) if isinstance(im, Image.Image) else None for im in images}
        if len(shapes) != 1 or None in shapes or next(iter(shapes))[0] != "RGB":  # other inputs: per image
            return torch.stack([self.tail(im) for im in images])
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).contiguous()
        return x.to(dtype=torch.get_default_dtype()).div(255).sub_(self.mean).div_(self.std)


def split_tensor_tail(transform) -> Optional[TensorTail]:
    """A TensorTail when `transform` is a Compose ending in ToTensor and Normalize; None otherwise."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", None) or [])
    if len(steps) < 2 or type(steps[-2]) not in _to_tensor_types() or type(steps[-1]) is not T.Normalize \
            or steps[-1].inplace:
        return None
    norm = steps[-1]
    return TensorTail(T.Compose(steps[:-2]), norm.mean, norm.std, T.Compose(steps[-2:]))


def _to_tensor_types() -> tuple:
    """torchvision's ToTensor and open_clip's MaybeToTensor (the same conversion for a PIL image); not any
    other subclass, whose conversion may differ."""
    from torchvision import transforms as T

    try:
        from open_clip.transform import MaybeToTensor
    except ImportError:
        return (T.ToTensor,)
    return (T.ToTensor, MaybeToTensor)


class StepBatches(torch.utils.data.Dataset):
    """Item `step` = this rank's share of the global batch of that step: pixels, captions, and the
    unreadable images it skipped (each replaced by a seeded draw, so every batch keeps its size and
    ranks stay in lock-step for the feature all-gather)."""

    def __init__(self, source, transform, plan: BatchPlan, rank: int = 0, min_size: Optional[int] = None):
        self.source, self.transform, self.plan, self.rank, self.min_size = source, transform, plan, rank, min_size
        self.split = split_tensor_tail(transform)

    def __len__(self) -> int:  # steps are indexed from 0; the sampler picks which ones
        return 1 << 62

    def __getitem__(self, step: int) -> dict:
        idx = self.plan.indices(step)
        per_image = self.split.per_image if self.split else self.transform
        pixels, texts, bad = [], [], []
        for p in self.plan.positions(self.rank):
            image, i = self._image(step, p, int(idx[p]), bad)
            caps = self.source.captions[i]
            texts.append(caps[np.random.default_rng([self.plan.seed, step, p, 1]).integers(len(caps))])
            # the augmentation's random numbers depend only on (seed, step, position)
            pixels.append(seeded(per_image, image, item_seed(self.plan.seed, step, p)))
        batch = self.split.batch(pixels) if self.split else torch.stack(pixels)
        return {"step": step, "pixels": batch, "texts": texts, "bad": bad}

    def _image(self, step: int, p: int, i: int, bad: list):
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                return self.source.open(i, self.min_size), i
            except MediaError as exc:
                bad.append(f"{self.source.name(i)}: {exc.reason}")
                i = int(np.random.default_rng([self.plan.seed, step, p, 2, attempt]).integers(self.plan.n_images))
        raise TrainingError(f"step {step}: {MAX_REPLACEMENTS + 1} unreadable images in a row (last: {bad[-1]}); "
                            f"is the dataset readable?")


class CaptionTokens:
    """Token rows of captions, each caption tokenized once: every epoch draws the same captions again,
    and the tokenizer cost 14 ms of a 200 ms demo step. Rows are independent of the batch (padded to the
    context length), so a batch of cached rows is the batch tokenized at once. At most `max_rows` kept
    (~60 MB at context 77); past that, new captions are tokenized batch by batch."""

    def __init__(self, tokenize, max_rows: int = 100_000):
        self.tokenize, self.max_rows, self.rows = tokenize, max_rows, {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self.rows]
        got = dict(zip(new, self.tokenize(new))) if new else {}
        if got and len(self.rows) + len(got) <= self.max_rows:
            self.rows.update(got)
        return torch.stack([self.rows[t] if t in self.rows else got[t] for t in texts])


def _identity(batch):
    return batch


def batch_loader(batches: StepBatches, steps: Sequence[int], workers: int, prefetch: int = 2, pin: bool = False):
    """Batches of `steps` in order, decoded by `workers` processes (0: in this process); `pin` puts
    them in page-locked memory for an asynchronous copy to the GPU."""
    kw = dict(prefetch_factor=prefetch, persistent_workers=False) if workers > 0 else {}
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=list(steps), num_workers=workers,
                                       collate_fn=_identity, pin_memory=pin, **kw)


def default_workers(device_type: str) -> int:
    """Decode workers: one per spare core, at most 8. A CPU run keeps one core for each of the model's
    two busiest threads, so a 2-core CPU decodes in the training process (batches of small images
    decode in a few ms; benchmarks/train_throughput.py compares 0 and 1 worker)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = cores - (1 if device_type != "cpu" else 2)
    return max(0, min(8, spare))
