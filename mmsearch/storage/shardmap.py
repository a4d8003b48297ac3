"""A sharded index: N ordinary index folders and the map that ties them together (DIR/shards.json).

Each shard is an index folder like any other (catalog + vectors, the same format and checks), holding
the photos whose normalised absolute path hashes to it: `shard_of(path, n)` = blake2b(path) mod n.
The rule looks at the path only, so routing a file never reads it and an unchanged re-run routes every
photo to the shard that already holds it. A moved file has a new path: when that lands on another
shard, its old shard's plan sees a delete and the new one's an add (one re-embedding, as for a new
photo); a move that stays on its shard (1 in N) keeps its embedding, as moves do in one index.
Routing by content (the quick hash) would keep every move on its shard, but it reads every file on
every run to route it, and an edited photo would change shard.

The map records the model (the same record an index keeps in its meta), the rule, the shard list
and a version bumped by every swap. A shard whose model record differs from the map's, or a shard
the map lists that is missing, is refused like a model mismatch (ShardMapError).

Ids: each shard numbers its own rows. Whatever answers for the whole map (the sharded searcher, the
server) shows an image as `global_id(local, shard, n)` = local * n + shard, so the owner of an id is
known without asking anyone.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mmsearch.config import ModelSpec, same_model
from mmsearch.errors import IndexNotFoundError, IndexVersionError, ShardMapError

SHARD_MAP = "shards.json"
MAP_FORMAT = 1
RULE = "blake2b64-path-mod-n"
# what must agree between the map and each shard (what makes two embeddings comparable)
RECORD_KEYS = ("model", "arch", "fingerprint", "dim", "image_size", "text_width", "vision_width", "precision")


def shard_of(path: str, n: int) -> int:
    """The shard (0 .. n-1) of an absolute path: the first 8 bytes of its blake2b, big-endian, mod n."""
    norm = os.path.normpath(os.fspath(path)).encode("utf-8", "surrogateescape")
    return int.from_bytes(hashlib.blake2b(norm, digest_size=8).digest(), "big") % int(n)


def shard_name(i: int) -> str:
    return f"shard-{i}"


def global_id(local_id: int, shard: int, n: int) -> int:
    return int(local_id) * int(n) + int(shard)


def split_id(gid: int, n: int) -> tuple[int, int]:
    """(shard, local id) of a global id."""
    return int(gid) % int(n), int(gid) // int(n)


def model_record(meta: dict) -> dict:
    """The part of an index's meta that decides its embeddings (older indexes: precision fp32)."""
    rec = {k: meta.get(k) for k in RECORD_KEYS}
    rec["precision"] = rec["precision"] or "fp32"
    return rec


def describe_record(rec: dict) -> str:
    spec = ModelSpec.from_dict(rec.get("model") or {})
    return f"{spec.describe()}, weights {rec.get('fingerprint')}, dim {rec.get('dim')}, {rec.get('precision')}"


def same_record(a: dict, b: dict) -> bool:
    return (same_model(ModelSpec.from_dict(a.get("model") or {}), ModelSpec.from_dict(b.get("model") or {}))
            and (a.get("fingerprint"), a.get("dim"), a.get("precision") or "fp32")
            == (b.get("fingerprint"), b.get("dim"), b.get("precision") or "fp32"))


@dataclass
class ShardMap:
    root: Path
    record: dict
    shards: list = field(default_factory=list)  # [{"name": "shard-0", "folder": "shard-0"}]; folders relative to root
    rule: str = RULE
    version: int = 1

    @property
    def n(self) -> int:
        return len(self.shards)

    @property
    def names(self) -> list[str]:
        return [s["name"] for s in self.shards]

    def folder(self, name: str) -> Path:
        for s in self.shards:
            if s["name"] == name:
                return (self.root / s["folder"]).resolve() if not os.path.isabs(s["folder"]) else Path(s["folder"])
        raise ShardMapError(f"the shard map in {self.root} has no shard '{name}' (it has {', '.join(self.names)})")

    def index_of(self, name: str) -> int:
        self.folder(name)
        return self.names.index(name)

    def route(self, path: str) -> int:
        return shard_of(path, self.n)

    @staticmethod
    def exists(root) -> bool:
        return (Path(root) / SHARD_MAP).is_file()

    @classmethod
    def load(cls, root) -> "ShardMap":
        root = Path(root)
        path = root / SHARD_MAP
        if not path.is_file():
            raise IndexNotFoundError(f"no shard map at {root} (make one with `mmsearch shard split IDX --shards N "
                                     f"--out {root}` or `mmsearch index FOLDER --shards {root} --shard-count N`)")
        try:
            data = json.loads(path.read_text())
            fmt, rule = data["format"], data["rule"]
            shards = [{"name": str(s["name"]), "folder": str(s["folder"])} for s in data["shards"]]
            record, version = dict(data["model"]), int(data["version"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ShardMapError(f"{path} is not an mmsearch shard map ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(fmt, int) or fmt > MAP_FORMAT:
            raise IndexVersionError(f"{path} was written by a newer mmsearch (shard map format {fmt}); upgrade")
        if rule != RULE:
            raise ShardMapError(f"{path} routes photos by '{rule}', which this mmsearch does not know ({RULE})")
        if not shards or len({s["name"] for s in shards}) != len(shards):
            raise ShardMapError(f"{path} lists no shards, or one name twice")
        return cls(root, record, shards, rule, version)

    def save(self) -> None:
        """Written atomically: a reader (a serving shard watching the map) sees the old map or the new one."""
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"format": MAP_FORMAT, "rule": self.rule, "version": self.version, "model": self.record,
                "shards": self.shards}
        tmp = self.root / f".{SHARD_MAP}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.root / SHARD_MAP)

    # ---- checks --------------------------------------------------------------------------------
    def check_shard(self, name: str, folder: Optional[Path] = None) -> dict:
        """The meta of shard `name` (or of `folder`, a candidate for it) after checking it is an index of
        the map's model; ShardMapError otherwise."""
        folder = Path(folder) if folder is not None else self.folder(name)
        meta = read_meta(folder, name)
        rec = model_record(meta)
        if not same_record(rec, self.record):
            raise ShardMapError(f"{name} ({folder}) was built with {describe_record(rec)}, but the shard map in "
                                f"{self.root} records {describe_record(self.record)}; nothing was served or changed")
        return meta

    def swap(self, name: str, folder) -> int:
        """Point shard `name` at `folder` (an index of the map's model, e.g. the shard re-indexed into a
        copy) and save the map under a new version; serving shards watch the map and switch to it."""
        folder = Path(folder).resolve()
        self.check_shard(name, folder)
        for s in self.shards:
            if s["name"] == name:
                s["folder"] = os.path.relpath(folder, self.root.resolve()) if folder.is_relative_to(
                    self.root.resolve()) else str(folder)
        self.version += 1
        self.save()
        return self.version

    def check(self) -> dict[str, dict]:
        """Every shard's meta, after checking each one is there and of the map's model."""
        return {name: self.check_shard(name) for name in self.names}


def read_meta(folder: Path, name: str = "shard") -> dict:
    """The meta table of the index at `folder`, read-only; a missing or unreadable one is a ShardMapError."""
    from mmsearch.storage.catalog import Catalog

    if not Catalog.exists(folder):
        raise ShardMapError(f"{name}: no index at {folder}; a shard the map lists is missing")
    try:
        cat = Catalog.open(folder, readonly=True)
    except (IndexNotFoundError, IndexVersionError) as exc:
        raise ShardMapError(f"{name}: {exc}") from None
    try:
        return cat.meta()
    except sqlite3.Error as exc:
        raise ShardMapError(f"{name}: cannot read {folder} ({exc})") from None
    finally:
        cat.close()
