"""One index directory: the catalog, the vector caches, and the models recorded in its meta, wired in one place.

Heavy collaborators load lazily: a text query needs the catalog, FAISS and the exported numpy text
tower only; torch and open_clip load when something must be embedded by the real encoder.
"""
from __future__ import annotations

import os
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # annotations only: numpy loads where it is used, not on import
    import numpy as np

from mmsearch.config import VERSION
from mmsearch.storage.catalog import Catalog
from mmsearch.config import DEFAULT_FACTORY, GOOD_MATCH, ModelSpec, same_model
from mmsearch.errors import EmptyIndexError, ModelMismatchError, UnknownModelError, VectorIndexError
from mmsearch.storage.lock import may_write_caches, writer_lock
from mmsearch.towers.choice import TowerChoice
from mmsearch.towers.devices import PRECISIONS

IMAGE_VECTORS = "vectors.faiss"
TEXT_VECTORS = "texts.faiss"


class PendingVectors:
    """The image vector index during an indexing run; falls back to a rebuild when it cannot update in place."""

    def __init__(self, index):
        self.index = index
        self.needs_rebuild = index is None

    def add(self, ids, vectors):
        if self.index is not None:
            self.index.add(ids, vectors)

    def remove(self, ids):
        if self.index is not None and not self.index.remove(list(ids)):
            self.needs_rebuild = True


class IndexStore(TowerChoice):
    """An index folder: its catalog, vector caches and recorded models (the towers: TowerChoice)."""

    def __init__(self, directory: Path, catalog: Catalog, device="cpu"):
        self.dir = Path(directory)
        self.catalog = catalog
        self.meta = catalog.meta()
        self._encoder = None
        self._reranker = None
        self.notices: list[str] = []  # one-line notes for the CLI to show (e.g. a torch fallback)
        self._fast = None
        self.device = device  # torch device (a name for mmsearch.towers.devices); never part of what is stored

    # ---- opening ------------------------------------------------------------------------------
    @classmethod
    def open(cls, directory, readonly: bool = False, device="cpu") -> "IndexStore":
        return cls(Path(directory), Catalog.open(directory, readonly=readonly), device=device)

    @classmethod
    def open_or_create(cls, directory, spec: Optional[ModelSpec] = None, factory: str = DEFAULT_FACTORY,
                       factory_given: bool = False, device="cpu", precision: Optional[str] = None,
                       max_index_memory=None, encoder=None) -> "IndexStore":
        """Reuse an index's recorded model (refusing a conflicting one), or create the index with `spec`
        (or an `encoder` already loaded). `precision` (fp32, int8, amp-bf16, amp-fp16) is part of the model
        record: another one than the index's is refused. `device` runs the torch encoder; it is never recorded."""
        directory = Path(directory)
        if precision is not None and precision not in PRECISIONS:
            raise UnknownModelError(f"unknown precision '{precision}' (choose from {', '.join(PRECISIONS)})")
        if Catalog.exists(directory):
            store = cls.open(directory, device=device)
            stored = store.spec
            if spec is not None and not same_model(spec.normalised(), stored):
                raise ModelMismatchError(
                    f"index {directory} was built with {stored.describe()}, not {spec.normalised().describe()}; "
                    f"nothing was changed. Omit the model options to reuse the index's model, or use another --index.")
            if precision is not None and precision != store.precision:
                raise ModelMismatchError(
                    f"index {directory} was built in {store.precision}, not {precision}: mixing them would mix "
                    f"embeddings; nothing was changed. Omit --precision, or use another --index.")
            return store
        from mmsearch.towers import cache as towercache
        from mmsearch.storage.ann import parse_size

        spec = (spec or ModelSpec()).normalised()
        precision = precision or "fp32"
        # a model indexed before: no torch needed
        record = towercache.lookup(spec, precision) if encoder is None else None
        if record is None:
            if encoder is None:
                from mmsearch.towers.encoder import load_encoder

                encoder = load_encoder(spec, device=device)
            record = {"model": encoder.spec.normalised().to_dict(), "arch": encoder.arch,
                      "fingerprint": encoder.fingerprint, "dim": encoder.dim, "image_size": encoder.image_size,
                      "text_width": encoder.text_width, "vision_width": encoder.vision_width}
        catalog = Catalog.create(directory, dict(record, factory=factory, precision=precision,
                                                 max_index_memory=parse_size(max_index_memory),
                                                 mmsearch_version=VERSION, relevance=dict(GOOD_MATCH)))
        store = cls(directory, catalog, device=device)
        store._encoder = encoder
        if encoder is None:
            try:
                towercache.install(spec, precision, directory)
                store.record_text_path("numpy", None)  # the cache keeps only towers the numpy path runs
            except OSError:
                pass  # the towers are exported again from torch when first needed
        return store

    def share_exports(self) -> None:
        """After a run that loaded torch (so the weights were checked against the index's fingerprint),
        keep this index's exported towers for the next new index of the same model."""
        if self._encoder is not None and self._encoder.fingerprint == self.meta["fingerprint"]:
            from mmsearch.towers import cache as towercache

            towercache.save(self.spec, self.meta, self.dir)

    @contextmanager
    def writing(self):
        """Hold this index's writer lock (mmsearch.storage.lock) for a change; the outermost hold checks the
        catalog's integrity first, so a damaged catalog is refused before anything is written to it."""
        with writer_lock(self.dir, create=False) as outer:
            if outer:
                self.catalog.check_integrity()
            yield

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec.from_dict(self.meta["model"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def precision(self) -> str:
        """fp32, int8, amp-bf16 or amp-fp16: how image embeddings are computed (older indexes: fp32)."""
        return self.meta.get("precision", "fp32")

    @property
    def factory(self) -> str:
        return self.meta.get("factory", DEFAULT_FACTORY)

    # ---- re-ranker ----------------------------------------------------------------------------
    def reranker_info(self) -> Optional[dict]:
        return self.meta.get("reranker")

    def token_grid(self) -> Optional[int]:
        info = self.reranker_info()
        return int(info["token_grid"]) if info else None

    def token_shape(self) -> Optional[tuple]:
        g = self.token_grid()
        return (1 + g * g, int(self.meta["vision_width"])) if g else None

    def configure_reranker(self, path) -> None:
        from mmsearch.rerank.model import Reranker

        rr = Reranker.load(path)
        if rr.encoder_fingerprint != self.meta["fingerprint"]:
            raise ModelMismatchError(
                f"re-ranker {path} was trained for encoder weights {rr.encoder_fingerprint}, but index {self.dir} "
                f"uses {self.meta['fingerprint']} ({self.spec.describe()})")
        info = {"path": os.path.abspath(path), "token_grid": int(rr.token_grid)}
        with self.writing(), self.catalog.transaction():
            self.catalog.set_meta(reranker=info)
        self.meta["reranker"] = info
        self._reranker = rr

    def disable_reranker(self) -> None:
        with self.writing(), self.catalog.transaction():
            self.catalog.delete_meta("reranker")
        self.meta.pop("reranker", None)
        self._reranker = None

    def reranker(self):
        if self._reranker is None and self.reranker_info():
            from mmsearch.rerank.model import Reranker

            self._reranker = Reranker.load(self.reranker_info()["path"])
        return self._reranker

    # ---- vectors ------------------------------------------------------------------------------
    @property
    def max_index_memory(self) -> Optional[int]:
        return self.meta.get("max_index_memory")

    def ann_info(self) -> Optional[dict]:
        """What was built for the image vectors: structure, tuned params and recall (ann.build)."""
        return self.meta.get("ann")

    def _build_image_vectors(self, factory: Optional[str] = None, progress=None):
        from mmsearch.storage import ann

        texts = None
        if self.catalog.count_texts() >= 100:  # a text corpus: the best text-like queries to tune on
            texts = self.catalog.text_embeddings(self.dim)[1]
        index, info = ann.build(self.catalog, self.dim, factory or self.factory, self.max_index_memory,
                                text_vectors=texts, progress=progress)
        return index, info

    def _save_built(self, index, info: dict, gen: Optional[int] = None) -> None:
        """Save a built image index labelled `gen` (read before its rows were), by a writer, or by a reader
        while no writer holds the index (else the reader's rebuild is used from memory only)."""
        from mmsearch.errors import MmsearchError

        if not may_write_caches(self.dir):
            return
        gen = self.catalog.generation() if gen is None else gen
        index.save(self.dir / IMAGE_VECTORS, gen, extra={"ann": info})
        info["bytes_per_vector"] = round((self.dir / IMAGE_VECTORS).stat().st_size / max(1, index.ntotal), 1)
        self.meta["ann"] = info
        try:
            with self.catalog.transaction():
                self.catalog.set_meta(ann=info)
        except (MmsearchError, sqlite3.Error):  # a read-only catalog: the sidecar still has it
            pass

    def vectors_fresh(self) -> bool:
        """Whether the FAISS file exists and was built from the catalog as it is (its sidecar says so;
        read without loading FAISS, so an unchanged re-run never imports it)."""
        from mmsearch.storage.flat import is_fresh

        return is_fresh(self.dir / IMAGE_VECTORS, self.catalog.generation())

    def vectors_complete(self) -> bool:
        """The cheap half of `repair_vectors`: whether the FAISS file's sidecar counts as many vectors as the
        catalog has images (a count, no file read)."""
        from mmsearch.storage.flat import sidecar  # not FAISS: an unchanged re-run never imports it

        return sidecar(self.dir / IMAGE_VECTORS).get("ntotal") == self.catalog.count_images()

    def repair_vectors(self, pending: PendingVectors) -> int:
        """Make the vector index hold exactly the catalog's ids: add the vectors of rows it lacks (from the
        stored embeddings, no re-embedding) and drop ids the catalog no longer has. Counts first; the id
        sets are compared only when the counts differ. Returns how many ids were added or dropped."""
        import numpy as np

        index = pending.index
        if index is None or pending.needs_rebuild:
            return 0  # rebuilt from the catalog anyway
        if index.ntotal == self.catalog.count_images():
            return 0
        have, want = index.ids(), self.catalog.image_ids()
        if len(np.unique(have)) != len(have):  # an id twice: only a rebuild makes it whole
            pending.needs_rebuild = True
            return int(abs(len(have) - len(want))) or 1
        missing, extra = np.setdiff1d(want, have), np.setdiff1d(have, want)
        for s in range(0, len(missing), 50_000):
            pending.add(*self.catalog.embeddings(self.dim, missing[s:s + 50_000].tolist()))
        pending.remove(extra.tolist())
        return int(len(missing) + len(extra))

    def vectors_for_update(self) -> PendingVectors:
        from mmsearch.storage.vectors import VectorIndex

        return PendingVectors(VectorIndex.load(self.dir / IMAGE_VECTORS, self.catalog.generation(), mmap=False))

    def save_vectors(self, pending: PendingVectors, progress=None) -> None:
        """After an update: save in place, or rebuild from the stored embeddings when the structure
        cannot update in place or an auto index grew past its tier (ids, filters and re-ranker tokens
        live in the catalog, so they survive any rebuild)."""
        from mmsearch.storage import ann

        if pending.needs_rebuild or ann.needs_rebuild(self.ann_info(), pending.index.ntotal):
            self._save_built(*self._build_image_vectors(progress=progress))
            return
        pending.index.save(self.dir / IMAGE_VECTORS, self.catalog.generation(),
                           extra={"ann": self.ann_info()} if self.ann_info() else None)

    def image_vectors(self):
        """The FAISS index for search; rebuilt from the catalog (without re-embedding) when missing or stale."""
        from mmsearch.storage.vectors import VectorIndex

        gen = self.catalog.generation()
        cached = getattr(self, "_vectors", None)
        if cached is not None and cached[0] == gen:  # a long-lived Searcher (API, server) maps it once
            return cached[1]
        index = VectorIndex.load(self.dir / IMAGE_VECTORS, gen)
        if index is None:
            index, info = self._build_image_vectors()
            try:
                self._save_built(index, info, gen)
            except OSError:
                pass  # a read-only index still answers; the rebuild just is not kept
        self.attach_refine(index)
        self._vectors = (gen, index)
        return index

    def query_vectors(self):
        """What a query searches: the FAISS index, or, for a small index whose cache is Flat (exact), the
        same exact search in numpy over the catalog's vectors (mmsearch.storage.flat), which spares a
        fresh process loading FAISS. Identical results either way: both are exact inner products."""
        from mmsearch.storage import flat

        gen = self.catalog.generation()
        cached = getattr(self, "_exact", None)
        if cached is not None and cached[0] == gen:
            return cached[1]
        info = flat.sidecar(self.dir / IMAGE_VECTORS)
        if info.get("factory") == "Flat" and info.get("ntotal", flat.EXACT_START_MAX + 1) <= flat.EXACT_START_MAX:
            ids, vectors = self.catalog.embeddings(self.dim, limit=flat.EXACT_START_MAX + 1)
            if len(ids) <= flat.EXACT_START_MAX:  # a stale sidecar may undercount: the catalog decides
                self._exact = (gen, flat.ExactVectors(ids, vectors))
                return self._exact[1]
        return self.image_vectors()

    def attach_refine(self, index):
        """A structure of coarse codes (the 10M tier) re-scores its candidates with the catalog's own
        embeddings: the one copy of them, not a second refine file."""
        if index is not None and index.params.get("refine"):
            index.refine_source = self.stored_vectors
        return index

    def stored_vectors(self, ids) -> np.ndarray:
        """Exact stored embeddings of these ids, in the order given (the exact path of small filters)."""
        import numpy as np

        got_ids, emb = self.catalog.embeddings(self.dim, ids)
        if len(got_ids) != len(ids) or not np.array_equal(got_ids, np.asarray(ids)):
            pos = {int(i): j for j, i in enumerate(got_ids)}
            emb = np.stack([emb[pos[int(i)]] if int(i) in pos else np.zeros(self.dim, np.float32) for i in ids])
        return emb

    def reindex(self, factory: str, max_index_memory=None, progress=None) -> int:
        """Rebuild the vector index with another FAISS structure (or 'auto') from the stored embeddings."""
        from mmsearch.storage.ann import parse_size

        if self.catalog.count_images() == 0:
            raise EmptyIndexError(f"index {self.dir} has no images to build vectors from")
        with self.writing():
            if max_index_memory is not None:
                self.meta["max_index_memory"] = parse_size(max_index_memory)
            index, info = self._build_image_vectors(factory, progress=progress)
            with self.catalog.transaction():
                self.catalog.set_meta(factory=factory, max_index_memory=self.max_index_memory)
            self.meta["factory"] = factory
            self._save_built(index, info)
        return index.ntotal

    def text_vectors(self):
        """The corpus's vector index, following the catalog's text generation on every call (one read of the
        meta), as image_vectors follows the image generation: texts added while a server runs are searched."""
        from mmsearch.storage.vectors import VectorIndex

        gen = self.catalog.text_generation()
        cached = getattr(self, "_text_vectors", None)
        if cached is not None and cached[0] == gen:
            return cached[1]
        index = VectorIndex.load(self.dir / TEXT_VECTORS, gen)
        if index is None:
            gen, ids, emb = self.catalog.text_snapshot(self.dim)  # the label is the generation of these rows
            index = VectorIndex.build("Flat", self.dim, ids, emb)
            if may_write_caches(self.dir):
                try:
                    index.save(self.dir / TEXT_VECTORS, gen)
                except OSError:
                    pass  # a read-only index: used from memory
        self.meta["text_generation"] = gen
        self._text_vectors = (gen, index)
        return index

    def bump_text_generation(self) -> None:
        gen = self.catalog.text_generation() + 1
        self.catalog.set_meta(text_generation=gen)
        self.meta["text_generation"] = gen

    # ---- inspection ---------------------------------------------------------------------------
    def info(self) -> dict:
        import numpy as np

        try:
            vectors = self.image_vectors().ntotal
        except VectorIndexError:
            vectors = 0
        shape = self.token_shape()
        videos, shots = self.catalog.count_videos()
        return {
            "index": str(self.dir.resolve()),
            "images": self.catalog.count_images(),
            "videos": videos,
            "shots": shots,
            "failed": self.catalog.count_failures(),
            "vectors": vectors,
            "texts": self.catalog.count_texts(),
            "model": dict(self.spec.to_dict(), arch=self.meta.get("arch"), fingerprint=self.meta["fingerprint"]),
            "precision": self.precision,
            "dim": self.dim,
            "factory": self.factory,
            "ann": self.ann_info(),
            "reranker": self.reranker_info(),
            "rerank_bytes_per_image": int(np.prod(shape)) * 2 if shape else 0,
            "ocr": self.meta.get("ocr"),
            "words": self.catalog.words_stats(),
            "schema_version": self.meta.get("schema_version"),
            "bytes_on_disk": self.catalog.bytes_on_disk(),
        }
