"""Per-image routes: metadata, thumbnail, original file. Always by catalog id, never by path."""
from __future__ import annotations

import mimetypes
import os
from email.utils import formatdate

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse

from mmsearch.errors import MediaError
from mmsearch.serve.api_search import state
from mmsearch.serve.errors import ApiError
from mmsearch.serve.params import MAX_ID

router = APIRouter(prefix="/api/images", tags=["images"])
ImageId = Path(..., ge=0, lt=MAX_ID, description="Catalog id (from a search hit).")
CHUNK = 1 << 16


@router.get("/{image_id}")
def image_meta(request: Request, image_id: int = ImageId):
    """Path, size, dates, pixel size, and the URLs of the thumbnail and the file."""
    st = state(request)
    return st.describe(st.row(image_id))


@router.get("/{image_id}/thumb", response_class=Response, responses={200: {"content": {"image/webp": {}}}})
def image_thumb(request: Request, image_id: int = ImageId,
                size: int = Query(256, ge=16, le=1024, description="Longest side (snapped to 128, 256 or 512).")):
    """A WebP thumbnail, EXIF orientation applied; cached in the index folder, remade when the file changes."""
    st = state(request)
    path = st.servable_path(st.row(image_id))
    try:
        data = st.thumbs.get(image_id, path, size)
    except MediaError as exc:
        raise ApiError(422, f"image {image_id}: {exc.reason}") from None
    except FileNotFoundError:
        raise ApiError(410, f"image {image_id} is gone from disk") from None
    # the URL the API hands out carries the file's mtime (v=...), so a cached copy is never stale
    cache = "private, max-age=31536000, immutable" if request.query_params.get("v") else "no-cache"
    return Response(data, media_type="image/webp", headers={"Cache-Control": cache})


@router.get("/{image_id}/file", response_class=FileResponse)
def image_file(request: Request, image_id: int = ImageId):
    """The original file, while it is still inside an indexed folder."""
    st = state(request)
    path = st.servable_path(st.row(image_id))
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

    def body():
        with fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    return StreamingResponse(body(), media_type=kind, headers={
        "Cache-Control": "no-cache", "Content-Length": str(info.st_size),
        "Last-Modified": formatdate(info.st_mtime, usegmt=True)})
