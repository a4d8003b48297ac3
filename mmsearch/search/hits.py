"""A search's results: the `Hit` type and the ordering of (id, similarity) pairs with the re-ranker's
ITM scores, shared by the one-index Searcher and the sharded one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mmsearch.rerank.blend import blend


@dataclass
class Hit:
    """One result, an image or a text of the corpus (then `text` is set and `path` is None). `row` is the
    catalog row it was hydrated from, so renderers need not read it again."""

    rank: int
    score: float
    id: int
    similarity: float
    itm: Optional[float] = None
    path: Optional[str] = None
    text: Optional[str] = None
    taken_at: Optional[float] = None
    width: Optional[int] = None
    height: Optional[int] = None
    row: Optional[dict] = field(default=None, repr=False, compare=False)
    matches: Optional[list] = None  # where the query's words are in the image (search/lexical.py), when they matched
    text_score: Optional[float] = None  # the words side's bm25 score, when they matched
    calibrated: Optional[float] = None  # the good-match score (relevance.py); None: the index cannot say
    good: Optional[bool] = None
    # a video's moment: its video (the id of the file's row), the shot's times and its other matching moments
    video_id: Optional[int] = None
    start_s: Optional[float] = None
    end_s: Optional[float] = None
    frame_s: Optional[float] = None
    duration_s: Optional[float] = None
    moments: Optional[list] = None

    def __getitem__(self, key: str):
        """hit["text"], as when search_texts returned dicts: scripts written then keep working."""
        return self.to_dict()[key]

    @property
    def kind(self) -> str:
        return "text" if self.text is not None else "video" if self.video_id is not None else "image"

    def to_dict(self) -> dict:
        if self.kind == "text":
            return {"rank": self.rank, "score": self.score, "text": self.text, "id": self.id,
                    "similarity": self.similarity, "itm": self.itm}
        d = {"rank": self.rank, "score": self.score, "path": self.path, "id": self.id,
             "similarity": self.similarity, "itm": self.itm}
        d.update((k, v) for k, v in (("taken_at", self.taken_at), ("width", self.width), ("height", self.height),
                                     ("text_score", self.text_score), ("matches", self.matches),
                                     ("calibrated", self.calibrated), ("good", self.good)) if v is not None)
        if self.video_id is not None:
            d.update(kind="video", video_id=self.video_id, start_s=self.start_s, end_s=self.end_s,
                     frame_s=self.frame_s, duration_s=self.duration_s, moments=self.moments or [])
        return d


def order_hits(pairs: list[tuple[int, float]], itm: dict[int, float], alpha: float):
    """[(id, final, similarity, itm)] best first. With a re-ranker the final score is the ITM
    probability blended with the embedding similarity (blend.py)."""
    if not itm:
        return [(i, s, s, None) for i, s in pairs]
    scored = []
    for i, s in pairs:
        if i in itm:
            scored.append((i, float(blend(itm[i], s, alpha)), s, itm[i]))
        else:  # no cached tokens: rank after every re-scored candidate
            scored.append((i, s - 10.0, s, None))
    return sorted(scored, key=lambda t: -t[1])


def build_hits(hits, rows: dict, k: int, offset: int, min_score: Optional[float]) -> list[Hit]:
    """Hits from ordered (id, final, similarity, itm) and their catalog rows: at most k, ranked from
    offset + 1, without those under min_score or whose row is gone."""
    out = []
    for i, final, sim, logit in hits:
        if len(out) == k:
            break
        if min_score is not None and final < min_score:
            continue
        r = rows.get(i)
        if r is None:
            continue  # removed by a concurrent indexing run
        out.append(Hit(rank=offset + len(out) + 1, score=final, id=i, similarity=sim, itm=logit, path=r["path"],
                       taken_at=r["taken_at"], width=r["width"], height=r["height"], row=r))
    return out
