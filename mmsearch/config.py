"""Frozen dataclasses that describe what was built, and their JSON form."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
DEFAULT_FACTORY = "auto"  # Flat while small, then a tuned IVF (ann.py)
INDEX_ENV_VAR = "MMSEARCH_INDEX"
DEFAULT_INDEX_DIR = Path("indexes") / "default"
SCHEMA_VERSION = 2  # 2: video shots as image rows (video_id, start_s, end_s, frame_s, duration_s)
VERSION = "0.1.0"  # the package version, recorded in every index it builds (mmsearch.__version__)
TINY_MODEL = "mmsearch-tiny"
# Here, not in media.py, so the query path can tell an image path from text without importing PIL.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                              ".heic", ".heif"})
HEIC_EXTENSIONS = frozenset({".heic", ".heif"})
# The good-match score (mmsearch/search/relevance.py): recorded in an index's meta when it is built, so a
# later default does not change what an existing index calls good. The threshold (on z against the query's
# similarity to a sample of the collection, less twice the hit's z below the query's best hit) was chosen on
# held-out data by benchmarks/relevance.py.
GOOD_MATCH = {"method": "zbest-sample-1", "sample": 2000, "threshold": 2.0}
# videos are indexed as shots (mmsearch.video, the `video` extra): what FFmpeg reads under these names
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi"})
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


MODEL_CONFIG_DIR = Path(__file__).parent / "towers" / "model_configs"


def shipped_architectures() -> set[str]:
    """mmsearch's own architectures (JSON configs registered with open_clip); they have no pretrained tags."""
    return {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}


def default_index_dir() -> Path:
    """`$MMSEARCH_INDEX` if set, else ./indexes/default."""
    return Path(os.environ.get(INDEX_ENV_VAR) or DEFAULT_INDEX_DIR)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which weights to load: an open_clip architecture plus a pretrained tag/file, or one of our checkpoints."""

    model: str = DEFAULT_MODEL
    pretrained: Optional[str] = DEFAULT_PRETRAINED
    checkpoint: Optional[str] = None

    def __post_init__(self):
        if self.pretrained in ("", "none", "None"):
            object.__setattr__(self, "pretrained", None)

    @property
    def is_random(self) -> bool:
        return self.checkpoint is None and self.pretrained is None

    def describe(self) -> str:
        if self.checkpoint:
            return f"{self.model} (checkpoint {self.checkpoint})"
        return f"{self.model} (pretrained {self.pretrained or 'none'})"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        return cls(**{k: d.get(k) for k in ("model", "pretrained", "checkpoint")})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def normalised(self) -> "ModelSpec":
        """The form an index records: a checkpoint by absolute path (and no pretrained tag beside it)."""
        if self.checkpoint:
            return ModelSpec(model=self.model, pretrained=None, checkpoint=os.path.abspath(self.checkpoint))
        return self


def same_model(a: ModelSpec, b: ModelSpec) -> bool:
    """Whether two specs name the same weights (a checkpoint by its path, else architecture + tag)."""
    if a.checkpoint or b.checkpoint:
        return a.checkpoint == b.checkpoint
    return (a.model, a.pretrained) == (b.model, b.pretrained)
