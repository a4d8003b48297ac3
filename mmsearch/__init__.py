"""mmsearch: multimodal retrieval with a trainable dual encoder and a fusion re-ranker.

Importing the package is cheap (no torch); heavy modules load on first use.
"""
__version__ = "0.1.0"


def __getattr__(name):
    if name == "Index":
        from mmsearch.api import Index
        return Index
    raise AttributeError(name)
