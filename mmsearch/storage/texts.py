"""The catalog's text corpus (image->text search): caption rows, their embeddings and re-ranker states.

A mixin of Catalog: it uses the catalog's connection (`self.conn`) and its transactions.
"""
from __future__ import annotations

import json
import time
from typing import Iterable, Optional

import numpy as np

from mmsearch.storage.schema import check_finite, from_blobs, to_blob


class TextRows:
    def count_texts(self) -> int:
        return self.conn.execute("SELECT count(*) FROM texts").fetchone()[0]

    def known_texts(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT text FROM texts")}

    def insert_text(self, text: str, embedding: np.ndarray, states: Optional[np.ndarray] = None) -> int:
        check_finite(embedding, lambda _: f"text {text[:60]!r}", "embedding")
        cur = self.conn.execute(
            "INSERT INTO texts(text, embedding, states, state_len, added_at) VALUES (?,?,?,?,?) RETURNING id",
            (text, to_blob(embedding), None if states is None else to_blob(states, np.float16),
             None if states is None else int(states.shape[0]), time.time()))
        return cur.fetchone()[0]

    def text_rows(self, ids: Optional[Iterable[int]] = None, like: Optional[str] = None) -> list[dict]:
        if ids is not None:
            ids = [int(i) for i in ids]
            q = f"SELECT id, text FROM texts WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id"
            return [dict(id=r[0], text=r[1]) for r in self.conn.execute(q, ids)] if ids else []
        q, args = "SELECT id, text FROM texts", []
        if like:
            q, args = q + " WHERE text LIKE ?", [f"%{like}%"]
        return [dict(id=r[0], text=r[1]) for r in self.conn.execute(q + " ORDER BY id", args)]

    def text_generation(self) -> int:
        """Bumped by every change of the corpus; the text vector cache records it (one indexed read)."""
        row = self.conn.execute("SELECT value FROM meta WHERE key='text_generation'").fetchone()
        return int(json.loads(row[0])) if row else 0

    def text_snapshot(self, dim: int) -> tuple[int, np.ndarray, np.ndarray]:
        """(text generation, ids, embeddings) where the vectors are those of that generation: the generation is
        read before and after (each commit of the corpus bumps it), so a change in between is seen and retried.
        No explicit transaction: a server's threads share one connection."""
        for _ in range(3):
            gen = self.text_generation()
            ids, emb = self.text_embeddings(dim)
            if self.text_generation() == gen:
                break
        return gen, ids, emb  # still moving: labelled with the older generation, so it is rebuilt next time

    def text_embeddings(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        pairs = self.conn.execute("SELECT id, embedding FROM texts ORDER BY id").fetchall()
        return np.array([p[0] for p in pairs], dtype=np.int64), from_blobs((p[1] for p in pairs), dim)

    def text_states(self, ids: Iterable[int], width: int) -> dict[int, Optional[np.ndarray]]:
        ids = [int(i) for i in ids]
        if not ids:
            return {}
        q = f"SELECT id, states, state_len FROM texts WHERE id IN ({','.join('?' * len(ids))})"
        return {i: None if b is None else np.frombuffer(b, dtype=np.float16).reshape(n, width).astype(np.float32)
                for i, b, n in self.conn.execute(q, ids)}

    def texts_missing_states(self) -> list[tuple[int, str]]:
        return self.conn.execute("SELECT id, text FROM texts WHERE states IS NULL ORDER BY id").fetchall()

    def set_text_states(self, text_id: int, states: np.ndarray) -> None:
        self.conn.execute("UPDATE texts SET states=?, state_len=? WHERE id=?",
                          (to_blob(states, np.float16), int(states.shape[0]), text_id))

    def delete_texts(self, ids: Iterable[int]) -> int:
        cur = self.conn.executemany("DELETE FROM texts WHERE id=?", [(int(i),) for i in ids])
        return cur.rowcount
