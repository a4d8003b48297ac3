"""Which tower embeds for an index: the exported torch-free towers when they are fresh for the index's
weights and precision, else the torch encoder (exporting the towers for the next run).

A mixin of IndexStore (mmsearch.storage.store): it reads the index's record (`self.meta`, `self.dir`,
`self.spec`, `self.precision`, `self.device`) and keeps the loaded towers on the store, so a
long-lived store (the server) loads each one once.
"""
from __future__ import annotations

import os
import sqlite3
from typing import Optional

from mmsearch.errors import IndexReadOnlyError, ModelMismatchError, UnknownModelError


class TowerChoice:
    def encoder(self):
        """The torch encoder this index was built with, on `self.device`; refuses weights that changed since.
        It embeds at fp32; indexing sets the index's precision on it (queries tolerate the difference)."""
        if self._encoder is None:
            from mmsearch.towers.encoder import load_encoder

            enc = load_encoder(self.spec, device=self.device)
            if enc.fingerprint != self.meta["fingerprint"]:
                raise ModelMismatchError(
                    f"the weights of {self.spec.describe()} differ from those index {self.dir} was built with "
                    f"(fingerprint {enc.fingerprint} != {self.meta['fingerprint']}); re-index into a new folder")
            self._encoder = enc
        return self._encoder

    def image_encoder(self, token_grid: Optional[int] = None, prefer_torch: bool = False):
        """What embeds images for this index: the exported tower (no torch start-up) when exported for these
        weights and this precision, else the torch encoder, exporting the tower for the next run.
        Torch serves GPUs (`prefer_torch`), re-ranker tokens, models ONNX cannot take and amp-* on a CPU
        without bfloat16 arithmetic; int8 is ONNX only."""
        from mmsearch.towers.runtime import runs_here

        int8 = self.precision == "int8"
        if (token_grid is not None or prefer_torch or os.environ.get("MMSEARCH_TORCH_IMAGE")
                or not runs_here(self.precision)) and not int8:
            return self.encoder()
        if token_grid is not None:
            raise UnknownModelError(f"index {self.dir} is int8: its ONNX image tower cannot give re-ranker tokens")
        if getattr(self, "_image_tower", None) is not None:
            return self._image_tower
        from mmsearch.errors import MmsearchError
        from mmsearch.towers.imagetower import OnnxImageTower, export_image_tower, fresh_meta

        for attempt in range(2):
            try:
                if attempt or fresh_meta(self.dir, self.meta["fingerprint"], self.precision) is None:
                    export_image_tower(self.encoder(), self.dir, self.precision)
                tower = OnnxImageTower.load(self.dir)
                tower.session  # a damaged model file fails here (then it is exported again), not mid-run
                self._image_tower = tower  # one compiled model per store: a server embeds many uploads
                return tower
            except (MmsearchError, ImportError, OSError):
                if attempt == 0 and fresh_meta(self.dir, self.meta["fingerprint"], self.precision) is not None:
                    continue
                if int8:
                    raise
                return self.encoder()  # an architecture the exporter cannot take, or a read-only index

    def image_embedder(self):
        """What embeds an image that is not in the index (a query image, an upload): something with
        .image_size and .encode_images(pil_images, token_grid=None); torch only on a GPU device."""
        from mmsearch.towers.devices import device_type, select_device

        return self.image_encoder(prefer_torch=device_type(select_device(self.device)) != "cpu")

    def text_encoder(self):
        """Something with .encode_texts(texts, return_states=...): the numpy tower when exported, else torch."""
        if self._encoder is None:
            fast = self.fast_text()
            if fast is not None:
                return fast
            known = self.meta.get("text_path") or {}
            if known.get("fingerprint") == self.meta["fingerprint"] and known.get("path") == "torch":
                note = f"note: text queries of {self.meta.get('arch')} run on torch, slower to start " \
                       f"({known.get('reason')})"
                if note not in self.notices:  # a long-lived store (the server) says it once
                    self.notices.append(note)
                return self.encoder()
            # missing or written by an older mmsearch: pay for torch once, and heal it for the next query
            self.export_fast_text(self.encoder())
        return self.encoder()

    def fast_text(self):
        if os.environ.get("MMSEARCH_TORCH_TEXT") or not (self.dir / "text_tower" / "meta.json").is_file():
            return None  # MMSEARCH_TORCH_TEXT=1 forces the torch text tower (debugging, benchmarks)
        if self._fast is not None:
            return self._fast  # loaded once per store: a server answers many queries
        from mmsearch.errors import MmsearchError

        try:
            from mmsearch.towers.textnp import NumpyTextTower

            tower = NumpyTextTower.load(self.dir)
        except (MmsearchError, ImportError):
            return None
        if tower.fingerprint != self.meta["fingerprint"]:
            return None
        self._fast = FastText(tower)
        return self._fast

    def export_fast_text(self, encoder=None) -> None:
        """Write the numpy text tower next to the index so text queries skip torch (best effort).
        Loads the torch encoder only when the tower is missing or stale."""
        from mmsearch.errors import MmsearchError

        if self.fast_text() is None and not os.environ.get("MMSEARCH_TORCH_TEXT"):
            try:
                from mmsearch.towers.textnp import export_text_tower

                export_text_tower(encoder or self.encoder(), self.dir)
                self.record_text_path("numpy", None)
            except (MmsearchError, ImportError) as exc:
                # architectures the numpy path cannot run use torch at query time; say why once, in the meta
                self.record_text_path("torch", str(exc).split(": ", 1)[-1])
            except OSError:
                pass  # a read-only index: torch at query time

    def record_text_path(self, path: str, reason) -> None:
        record = {"path": path, "reason": reason, "fingerprint": self.meta["fingerprint"]}
        if self.meta.get("text_path") == record:
            return
        try:
            with self.catalog.transaction():
                self.catalog.set_meta(text_path=record)
            self.meta["text_path"] = record
        except (OSError, sqlite3.Error, IndexReadOnlyError):  # a read-only catalog keeps answering; the record
            # is an optimisation
            pass


class FastText:
    """Adapts NumpyTextTower to the Encoder.encode_texts signature the query layer uses."""

    def __init__(self, tower):
        self.tower = tower

    def encode_texts(self, texts, return_states: bool = False, **_):
        emb, states = self.tower.encode(list(texts))
        return (emb, states) if return_states else emb
