"""The Python API: the CLI's verbs on one object.

    from mmsearch import Index
    idx = Index.open("indexes/default")
    for hit in idx.search("a dog on a beach", k=5):
        print(hit.rank, hit.score, hit.path)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from mmsearch.config import ModelSpec, default_index_dir
from mmsearch.storage.store import IndexStore


class Index:
    def __init__(self, store: IndexStore):
        self.store = store
        self._searcher = None

    @classmethod
    def open(cls, directory=None, device="cpu") -> "Index":
        """Open an existing index (IndexNotFoundError if there is none); `device` embeds new query images."""
        return cls(IndexStore.open(Path(directory) if directory else default_index_dir(), device=device))

    @classmethod
    def build(cls, directory, paths: Sequence, spec: Optional[ModelSpec] = None, **kwargs) -> "Index":
        """Create or update the index at `directory` from image folders; kwargs as `add`."""
        from mmsearch.indexing.pipeline import index_folders

        index_folders(directory, paths, spec=spec, **kwargs)
        return cls.open(directory)

    def add(self, paths: Sequence, **kwargs):
        """Index folders incrementally (kwargs as index_folders: device, precision, executor=RayExecutor(...),
        batch_size, ...); returns an IndexSummary."""
        from mmsearch.indexing.pipeline import index_folders

        self._searcher = None
        summary = index_folders(self.store.dir, paths, **kwargs)
        self.store = IndexStore.open(self.store.dir)
        return summary

    @property
    def searcher(self):
        if self._searcher is None:
            from mmsearch.search.query import Searcher

            self._searcher = Searcher(self.store)
        return self._searcher

    def search(self, query: Optional[str] = None, image=None, k: int = 10, **filters):
        """Text, image or mixed query ("2:dog + beach - people", '"invoice 2023" beach'); filters: under, exts,
        after, before, min_score, rerank, rerank_k, alpha; mode: dense, text or hybrid. Returns a list of Hit."""
        images = [str(image)] if isinstance(image, (str, Path)) else list(image or [])
        return self.searcher.search(query, images, k=k, **filters)

    def search_texts(self, query: Optional[str] = None, image=None, k: int = 10, **kwargs):
        images = [str(image)] if isinstance(image, (str, Path)) else list(image or [])
        return self.searcher.search_texts(query, images, k=k, **kwargs)

    def add_texts(self, texts, **kwargs) -> dict:
        from mmsearch.indexing.corpus import add_texts

        return add_texts(self.store, texts, **kwargs)

    def info(self) -> dict:
        return self.store.info()

    def errors(self) -> list[dict]:
        return self.store.catalog.failures()

    def reindex(self, factory: str) -> int:
        return self.store.reindex(factory)
