"""Index information and a health check."""
from __future__ import annotations

import sys

from fastapi import APIRouter, Request

from mmsearch.config import VERSION
from mmsearch.serve.api_search import state
from mmsearch.storage.fsnames import json_safe

router = APIRouter(prefix="/api", tags=["info"])


@router.get("/info")
def info(request: Request):
    """What the index holds, which models it uses, and the folders the page can filter on."""
    st = state(request)
    data = st.store.info()
    data.update(version=VERSION, roots=st.roots(), folders=st.folders(),
                rerank_available=st.store.reranker_info() is not None,
                max_upload_bytes=st.max_upload_bytes)
    return json_safe(data)


@router.get("/health")
def health(request: Request):
    """Liveness: answers as soon as the server is up, without loading any model."""
    st = state(request)
    return {"status": "ok", "images": st.store.catalog.count_images(), "generation": st.store.catalog.generation(),
            "torch_loaded": "torch" in sys.modules}  # torch loads only to embed an upload
