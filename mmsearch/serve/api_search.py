"""Search routes: images by text / weighted terms / indexed ids / an upload, and image -> text."""
from __future__ import annotations

import os
import time
from typing import Sequence

from fastapi import APIRouter, Depends, File, Path, Query, Request, UploadFile
from fastapi.responses import JSONResponse

from mmsearch.serve.errors import ApiError
from mmsearch.storage.fsnames import json_safe
from mmsearch.serve.params import MAX_ID, SearchParams, search_params
from mmsearch.serve.state import ServeState, thumb_url
from mmsearch.serve.uploads import upload_image

router = APIRouter(prefix="/api", tags=["search"])


def state(request: Request) -> ServeState:
    return request.app.state.mm


@router.get("/search")
def search(request: Request, p: SearchParams = Depends(search_params)):
    """Images for a text query, weighted terms, indexed image ids (`id=`), or a mix of them."""
    return run_search(state(request), p)


@router.post("/search")
def search_upload(request: Request, image: UploadFile = File(..., description="The query image."),
                  p: SearchParams = Depends(search_params)):
    """Images like an uploaded image (multipart field `image`), plus any q/id terms of the query string."""
    st = state(request)
    with upload_image(image, st.max_upload_bytes, st.upload_slots, st.image_size()) as img, st.embed_lock:
        return run_search(st, p, images=[img], upload=True)


def run_search(st: ServeState, p: SearchParams, images: Sequence = (), upload: bool = False) -> dict:
    if not (p.q or p.ids or images):
        raise ApiError(400, "empty query: give q (text or weighted terms), id (an indexed image) or upload an image")
    started = time.perf_counter()
    hits = st.searcher.search(p.q, images, k=p.k, filters=p.filters, rerank=p.rerank, rerank_k=p.rerank_k,
                              ids=p.ids, offset=p.offset, mode=p.mode, good_only=p.good_only,
                              sort=p.sort, group=p.group)
    return hits_reply(st, hits, p.k, p.good_only, started, query=dict(p.echo(), upload=upload))


def hits_reply(st: ServeState, hits, k: int, good_only: bool, started: float, **extra) -> JSONResponse:
    """The JSON of a page of hits; `no_good_match`: good matches were asked for and there is none (the
    hits are then the closest results)."""
    cache = getattr(st.searcher, "calibration", None)  # a sharded index has no good-match calibration yet
    calibration = cache.get() if cache is not None else None
    out = [hit_json(h) for h in hits]
    missing = list(getattr(hits, "missing", ()))  # a sharded index: the shards that did not answer
    body = dict(extra, hits=out, more=len(hits) == k, reranked=any(h.itm is not None for h in hits),
                calibrated=calibration is not None,
                good_threshold=None if calibration is None else calibration.threshold,
                no_good_match=bool(good_only and hits and hits[0].good is False and not any(h.good for h in hits)),
                partial=bool(missing), missing=missing, took_ms=round((time.perf_counter() - started) * 1000, 2))
    if getattr(hits, "timing", None):  # a sharded index: where the time went (embed, scatter, slowest shard)
        body["timing"] = {name: round(v, 3) for name, v in hits.timing.items()}
    # a plain JSONResponse: FastAPI's generic encoder walking every hit cost more than the search itself
    return JSONResponse(body)


def hit_json(h) -> dict:
    """A hit as the API shows it; a file name that is not UTF-8 is shown readably (fsnames.json_safe)."""
    out = {"rank": h.rank, "score": h.score, "path": h.path, "id": h.id, "similarity": h.similarity, "itm": h.itm,
           "width": h.width, "height": h.height, "taken_at": h.taken_at, "name": os.path.basename(h.path),
           "thumbnail": thumb_url(h.row), "text_score": h.text_score, "matches": h.matches,
           "calibrated": h.calibrated, "good": h.good,
           "date": h.taken_at if h.taken_at is not None else h.row["mtime_ns"] / 1e9,
           "indexed_at": h.row.get("indexed_at")}
    if h.video_id is not None:  # a moment: the video is served by its own id, each moment has its frame
        out.update(kind="video", video_id=h.video_id, start_s=h.start_s, end_s=h.end_s, frame_s=h.frame_s,
                   duration_s=h.duration_s, file=f"/api/images/{h.video_id}/file",
                   moments=[dict(m, thumbnail=thumb_url(h.row, 128, m["id"])) for m in (h.moments or [])])
    return json_safe(out)


@router.get("/images/{image_id}/texts")
def image_texts(request: Request, image_id: int = Path(..., ge=0, lt=MAX_ID),
                k: int = Query(5, ge=1, le=50, description="Number of texts.")):
    """The closest texts of the corpus (`mmsearch texts add`) for an indexed image."""
    st = state(request)
    st.row(image_id)
    return texts_reply(st, k, ids=[image_id])


@router.post("/texts")
def upload_texts(request: Request, image: UploadFile = File(..., description="The query image."),
                 k: int = Query(5, ge=1, le=50, description="Number of texts.")):
    """The closest texts of the corpus for an uploaded image."""
    st = state(request)
    with upload_image(image, st.max_upload_bytes, st.upload_slots, st.image_size()) as img, st.embed_lock:
        return texts_reply(st, k, images=[img])


def texts_reply(st: ServeState, k: int, ids: Sequence[int] = (), images: Sequence = ()) -> dict:
    corpus = st.count_texts()
    texts = [h.to_dict() for h in st.searcher.search_texts(None, images, k=k, ids=ids)] if corpus else []
    return {"texts": texts, "corpus": corpus}
