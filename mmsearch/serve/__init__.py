"""`mmsearch serve`: the web page and the REST API, another renderer of the query layer.

FastAPI, uvicorn and python-multipart are the `serve` extra; nothing here imports them until an app is
built, so `mmsearch --help` and the library stay free of the web stack.
"""
from __future__ import annotations

from mmsearch.errors import MmsearchError


class ServeUnavailableError(MmsearchError):
    """The web stack (the `serve` extra) is not installed."""


def require_web_stack() -> None:
    for name in ("fastapi", "uvicorn", "python_multipart"):
        try:
            __import__(name)
        except ImportError:
            raise ServeUnavailableError(
                f"`mmsearch serve` needs the serve extra ({name} is missing): pip install 'mmsearch[serve]'") from None


def create_app(index_dir=None, **options):
    """The FastAPI app for one index (or `state=`: a sharded one); options as mmsearch.serve.app.build_app."""
    require_web_stack()
    from mmsearch.serve.app import build_app

    return build_app(index_dir, **options)
