"""Index information and a health check."""
from __future__ import annotations

from fastapi import APIRouter, Request

from mmsearch.serve.api_search import state
from mmsearch.storage.fsnames import json_safe

router = APIRouter(prefix="/api", tags=["info"])


@router.get("/info")
def info(request: Request):
    """What the index holds, which models it uses, and the folders the page can filter on (a sharded
    index: each shard, and `partial`/`missing` when a shard does not answer)."""
    return json_safe(state(request).info())


@router.get("/health")
def health(request: Request):
    """Liveness: answers as soon as the server is up, without loading any model."""
    return state(request).health()
