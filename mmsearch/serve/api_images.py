"""Per-image routes: metadata, thumbnail, original file. Always by catalog id, never by path.

A video's shot is an id like a photo: its thumbnail is the shot's frame, its file is the video, sent
in byte ranges (206) when the browser asks for them, under the same rules as a photo's file."""
from __future__ import annotations

import mimetypes
import os
from email.utils import formatdate

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, Response

from mmsearch.errors import MediaError
from mmsearch.serve.api_search import state
from mmsearch.serve.errors import ApiError
from mmsearch.serve.params import MAX_ID
from mmsearch.serve.ranges import RangeError, file_response

VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
               ".mkv": "video/x-matroska", ".avi": "video/x-msvideo"}

router = APIRouter(prefix="/api/images", tags=["images"])
ImageId = Path(..., ge=0, lt=MAX_ID, description="Catalog id (from a search hit).")


@router.get("/{image_id}")
def image_meta(request: Request, image_id: int = ImageId):
    """Path, size, dates, pixel size, and the URLs of the thumbnail and the file."""
    st = state(request)
    return st.describe(st.row(image_id))


@router.get("/{image_id}/thumb", response_class=Response, responses={200: {"content": {"image/webp": {}}}})
def image_thumb(request: Request, image_id: int = ImageId,
                size: int = Query(256, ge=16, le=1024, description="Longest side (snapped to 128, 256 or 512).")):
    """A WebP thumbnail, EXIF orientation applied (a video shot: its frame, turned as displayed); cached in
    the index folder, remade when the file changes."""
    st = state(request)
    row = st.row(image_id)
    path = st.servable_path(row)
    try:
        data = st.thumbs.get(image_id, path, size, frame_s=row.get("frame_s"))
    except MediaError as exc:
        raise ApiError(422, f"image {image_id}: {exc.reason}") from None
    except FileNotFoundError:
        raise ApiError(410, f"image {image_id} is gone from disk") from None
    # the URL the API hands out carries the file's mtime (v=...), so a cached copy is never stale
    cache = "private, max-age=31536000, immutable" if request.query_params.get("v") else "no-cache"
    return Response(data, media_type="image/webp", headers={"Cache-Control": cache})


@router.get("/{image_id}/file", response_class=FileResponse,
            responses={206: {"description": "The byte range asked for (`Range: bytes=START-END`, one range)."},
                       416: {"description": "A range that is not one range of bytes inside the file."}})
def image_file(request: Request, image_id: int = ImageId):
    """The original file (a video for a shot's id), while it is still inside an indexed folder."""
    st = state(request)
    row = st.row(image_id)
    path = st.servable_path(row)
    if row.get("video_id") is not None:
        kind = VIDEO_TYPES.get(row["ext"] or "", "application/octet-stream")
    else:
        kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if not kind.startswith("image/") or kind == "image/svg+xml":
            kind = "application/octet-stream"  # never let a browser run what it was handed as a photo
    # opened here, not by the response later: an indexer deleting or renaming the file between the check
    # and the send was a 500 (found by benchmarks/soak_serve.py); an open file is sent whole even then
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise ApiError(410, f"image {image_id} is gone from disk (moved or deleted); re-run `mmsearch index`") from None
    except OSError as exc:
        raise ApiError(403, f"image {image_id} cannot be read ({exc.strerror or type(exc).__name__})") from None
    info = os.fstat(fh.fileno())
    headers = {"Cache-Control": "no-cache", "Last-Modified": formatdate(info.st_mtime, usegmt=True)}
    try:
        return file_response(fh, info.st_size, request.headers.get("range"), kind, headers)
    except RangeError as exc:
        fh.close()
        raise ApiError(416, f"image {image_id}: {exc}", headers={"Content-Range": f"bytes */{info.st_size}"}) from None


@router.get("/{image_id}/words")
def image_words(request: Request, image_id: int = ImageId):
    """What OCR read in the image (lines with confidence and box as four corners in fractions of the image)
    and its typed metadata; status is ok, none (no text), error, off (read without OCR) or null (not yet)."""
    st = state(request)
    st.row(image_id)
    cat = st.store.catalog
    words = cat.words_state(image_id) if cat.has_lexical() else None
    if words is None:
        return {"id": image_id, "ocr_status": None, "ocr_error": None, "meta": {}, "lines": []}
    return dict(words, id=image_id, lines=cat.ocr_lines(image_id))
