"""What every index run asks about OCR, without loading it: whether rapidocr is installed, the per-image
bounds an index records, and which engine reads the words. Kept apart from the reader (ocr.py, numpy and
rapidocr) so that an unchanged re-run, which only resolves the index's OCR setting, imports neither.
"""
from __future__ import annotations

import importlib.util

DEFAULT_MAX_SIDE = 1600  # the OCR input's longest side, in pixels (the pixel cap)
DEFAULT_MAX_BOXES = 200  # text boxes recognised per image at most
INSTALL = "pip install 'mmsearch[ocr]'"


def ocr_available() -> bool:
    return importlib.util.find_spec("rapidocr") is not None


def describe_engine() -> dict:
    """What reads the words (recorded in the index meta, like the model)."""
    return {"reader": "rapidocr", "version": installed_version("rapidocr"), "models": "PP-OCRv6 small det + rec"}


def installed_version(name: str) -> str:
    """A package's version from the `NAME-VERSION.dist-info` folder beside it (PEP 627): every index run
    asks, and importing importlib.metadata alone costs ~35 ms of an unchanged re-run's 0.3 s."""
    from pathlib import Path

    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin:
        found = sorted(Path(spec.origin).parent.parent.glob(f"{name}-*.dist-info"))
        if len(found) == 1:
            return found[0].name[len(name) + 1: -len(".dist-info")]
    from importlib.metadata import version  # an egg, an editable or a vendored copy: the slow, general way

    return version(name)
