"""mmsearch: multimodal retrieval with a trainable dual encoder and a fusion re-ranker.

Importing the package is cheap (no torch); heavy modules load on first use.
"""
from mmsearch.config import VERSION as __version__  # noqa: F401  (config imports nothing heavy)


def __getattr__(name):
    if name == "Index":
        from mmsearch.api import Index
        return Index
    raise AttributeError(name)
