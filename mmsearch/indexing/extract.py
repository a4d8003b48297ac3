"""The extractor stage: the words of one image, read in the decode worker beside its pixels.

For every new or changed file: the metadata people type (EXIF and XMP: title, description, keywords,
camera make and model, lens, comment, artist; PNG text chunks) and, when OCR is on, the text lines OCR
reads (indexing/ocr.py). The result goes to the catalog in the same transaction as the image
(stage.commit_batch). Nothing here raises: an OCR failure is an error row beside an indexed image,
and metadata that cannot be read is no metadata.
"""
from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from typing import Optional

from mmsearch.storage.lexical import OCR_ERROR, OCR_NONE, OCR_OFF, OCR_OK

MAX_FIELD = 2000  # characters kept of one metadata field
MAX_XMP = 512 * 1024  # bytes of an XMP packet read at most


@dataclass
class Extract:
    """What the extractor found in one image; `lines` are (text, score, box in fractions)."""
    meta: dict = field(default_factory=dict)
    lines: list = field(default_factory=list)
    status: str = OCR_OFF
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return {"meta": self.meta, "lines": self.lines, "status": self.status, "error": self.error}

    @classmethod
    def from_dict(cls, d: dict) -> "Extract":
        return cls(meta=d.get("meta") or {}, lines=[tuple(x) for x in d.get("lines") or []],
                   status=d.get("status") or OCR_OFF, error=d.get("error"))


class Extractor:
    """Callable in decode workers: (path, decoded image or None) -> Extract. `readers`: how many images OCR
    reads at once (the indexer's worker threads); one for a single image, which then gets every thread."""

    def __init__(self, ocr: bool = True, max_side: Optional[int] = None, max_boxes: Optional[int] = None,
                 engine=None, readers: Optional[int] = None):
        from mmsearch.indexing import ocrsettings

        self.ocr = bool(ocr)
        self.max_side = int(max_side or ocrsettings.DEFAULT_MAX_SIDE)
        self.max_boxes = int(max_boxes or ocrsettings.DEFAULT_MAX_BOXES)
        self._engine = engine
        self.readers = int(readers or default_readers())
        if self.ocr and engine is None and not ocrsettings.ocr_available():  # before the run, not per image
            from mmsearch.errors import MissingExtraError

            raise MissingExtraError(f"this index reads the words in its images, which needs rapidocr: "
                                    f"{ocrsettings.INSTALL}, or index with --no-ocr")

    @property
    def engine(self):
        """The OCR reader, loaded on first use (about a second): an unchanged re-run never loads it."""
        if self._engine is None:
            from mmsearch.indexing.ocr import shared_engine

            self._engine = shared_engine(self.max_side, self.max_boxes, self.readers)
        return self._engine

    def metadata_only(self) -> "Extractor":
        """This extractor without OCR: what the embed phase reads on a CPU (OCR follows it)."""
        return Extractor(ocr=False, max_side=self.max_side, max_boxes=self.max_boxes) if self.ocr else self

    def __call__(self, path: str, img=None) -> Extract:
        out = Extract(meta=read_metadata(path))
        if not self.ocr:
            return out
        try:
            if img is None:  # a back-fill: decoded small first (the gate reads it), again only for text
                from mmsearch import media
                from mmsearch.indexing.ocr import GATE_DECODE_SIDE

                img = media.load_image(path, min_size=GATE_DECODE_SIDE)
            res = self.engine.read(*ocr_input(path, img, self.max_side))
            out.lines = [(t, s, b) for t, s, b in res.lines]
            out.status = OCR_OK if out.lines else OCR_NONE
            out.error = res.note
        except Exception as exc:  # one image that breaks the reader never stops a run
            out.status, out.error = OCR_ERROR, f"{exc.__class__.__name__}: {str(exc)[:300]}"
        return out


def ocr_input(path: str, img, max_side: int) -> tuple:
    """(image, full) for OcrEngine.read: `img` when it is at full size (or at least `max_side`), with no
    `full`; else, when it is large enough for the gate (a JPEG draft-decoded at GATE_DECODE_SIDE), `img` for
    the gate and `full`, which decodes again with draft scaling to about `max_side`; else that full decode
    now (the encoder's 1/8 copy of a big JPEG is too small for the gate)."""
    from mmsearch import media
    from mmsearch.indexing.ocr import GATE_DECODE_SIDE

    orig = img.info.get("original_size", img.size)
    if max(img.size) >= min(max(orig), max_side):
        return img, None
    w, h = orig
    short = math.ceil(max_side * min(w, h) / max(w, h))

    def full():
        return media.load_image(path, min_size=short)

    return (img, full) if min(img.size) >= GATE_DECODE_SIDE else (full(), None)


def default_readers() -> int:
    """Images OCR reads at once: as many as the indexer's CPU decode workers (the OCR pass's threads)."""
    from mmsearch.towers.devices import default_decode_workers

    return default_decode_workers("cpu")


# ---- metadata ---------------------------------------------------------------------------------------
_EXIF = {0x010E: "description", 0x010F: "make", 0x0110: "model", 0x013B: "artist",
         0x9C9B: "title", 0x9C9C: "comment", 0x9C9E: "keywords", 0x9C9F: "subject"}
_EXIF_IFD = {0x9286: "comment", 0xA433: "lens_make", 0xA434: "lens"}
_PNG_TEXT = {"title": "title", "description": "description", "comment": "comment", "keywords": "keywords",
             "author": "artist", "subject": "subject"}


def _clean(value) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):  # XP* tags as a tuple of bytes
        value = bytes(value)
    if isinstance(value, bytes):
        if value[:8] in (b"ASCII\x00\x00\x00", b"UNICODE\x00", b"\x00" * 8):  # UserComment's charset prefix
            value = value[8:].decode("utf-16-le" if value[:8] == b"UNICODE\x00" else "latin-1", "replace")
        elif len(value) % 2 == 0 and value[1:2] == b"\x00":  # XP* tags: UTF-16LE
            value = value.decode("utf-16-le", "replace")
        else:
            value = value.decode("utf-8", "replace")
    text = " ".join(str(value).replace("\x00", " ").split())[:MAX_FIELD]
    return text or None


def _keywords(text: Optional[str]) -> list:
    return [k.strip() for k in re.split(r"[;,]", text or "") if k.strip()][:200]


def _xmp_fields(packet) -> dict:
    """title, description, keywords (dc:subject), lens from an XMP packet, by pattern: no XML parser
    sees the untrusted packet (no entity expansion, no external references)."""
    if isinstance(packet, bytes):
        packet = packet[:MAX_XMP].decode("utf-8", "replace")
    packet = str(packet)[:MAX_XMP]
    out = {}
    for tag, key in (("title", "title"), ("description", "description"), ("subject", "keywords")):
        m = re.search(rf"<dc:{tag}\b[^>]*>(.*?)</dc:{tag}>", packet, re.S)
        if m:
            items = [html.unescape(x).strip() for x in re.findall(r"<rdf:li\b[^>]*>(.*?)</rdf:li>", m.group(1), re.S)]
            items = [_clean(x) for x in items if x]
            if items:
                out[key] = items if key == "keywords" else " ".join(i for i in items if i)
    m = re.search(r'(?:aux:Lens|exifEX:LensModel)="([^"]*)"', packet)
    if m:
        out["lens"] = _clean(html.unescape(m.group(1)))
    return {k: v for k, v in out.items() if v}


def read_metadata(path: str) -> dict:
    """The typed metadata of an image file ({} when none or unreadable). Reads headers only."""
    from PIL import Image

    meta: dict = {}
    try:
        with Image.open(path) as img:
            exif = img.getexif()
            for tag, key in _EXIF.items():
                v = _clean(exif.get(tag))
                if v:
                    meta[key] = v
            try:
                sub = exif.get_ifd(0x8769)
            except Exception:
                sub = {}
            for tag, key in _EXIF_IFD.items():
                v = _clean(sub.get(tag))
                if v:
                    meta.setdefault(key, v)
            info = img.info or {}
            for k, v in info.items():
                key = _PNG_TEXT.get(str(k).lower())
                if key and isinstance(v, (str, bytes)):
                    meta.setdefault(key, _clean(v))
            packet = info.get("xmp") or info.get("XML:com.adobe.xmp")
            if packet is None and hasattr(exif, "get") and exif.get(700):
                packet = exif.get(700)
            if packet:
                for k, v in _xmp_fields(packet).items():
                    meta.setdefault(k, v)
    except Exception:
        return {}
    kw = meta.get("keywords")
    words = (_keywords(kw) if isinstance(kw, str) else list(kw or [])) + _keywords(meta.pop("subject", None))
    if words:
        meta["keywords"] = list(dict.fromkeys(words))
    lens = " ".join(x for x in (meta.pop("lens_make", None), meta.get("lens")) if x)
    if lens:
        meta["lens"] = lens
    return {k: v for k, v in meta.items() if v}


# ---- the index's setting ----------------------------------------------------------------------------
def check_ocr_request(ocr: Optional[bool]) -> None:
    """--ocr on a machine without rapidocr: refused before anything changes."""
    from mmsearch.errors import MissingExtraError
    from mmsearch.indexing.ocrsettings import INSTALL, ocr_available

    if ocr and not ocr_available():
        raise MissingExtraError(f"--ocr needs rapidocr: {INSTALL}")


def resolve_ocr(store, ocr: Optional[bool]) -> dict:
    """The index's OCR setting, recorded in its meta like the model: `ocr` None keeps the index's own (a new
    index, or one written before OCR existed: on when rapidocr is installed); True/False switch it."""
    from mmsearch.indexing.ocrsettings import DEFAULT_MAX_BOXES, DEFAULT_MAX_SIDE, describe_engine, ocr_available

    check_ocr_request(ocr)
    recorded = store.meta.get("ocr")
    enabled = bool(recorded.get("enabled")) if ocr is None and recorded else (ocr_available() if ocr is None else ocr)
    settings = dict(recorded or {}, enabled=enabled)
    settings.setdefault("max_side", DEFAULT_MAX_SIDE)
    settings.setdefault("max_boxes", DEFAULT_MAX_BOXES)
    if enabled:
        settings.update(describe_engine())
    if settings != recorded:
        with store.catalog.transaction():
            store.catalog.set_meta(ocr=settings)
        store.meta["ocr"] = settings
    return settings


def words_of(path: str, store=None, max_side: Optional[int] = None) -> dict:
    """What OCR read in one image and its typed metadata: from the index when the file is indexed there
    unchanged (`store`), else read now (OCR needs rapidocr). Raises MediaError for an unreadable file."""
    import os

    from mmsearch import media

    path = os.path.abspath(path)
    if store is not None:
        cat = store.catalog
        image_id = cat.id_for_path(path)
        row = cat.rows([image_id]).get(image_id) if image_id is not None else None
        state = cat.words_state(image_id) if row is not None and cat.has_lexical() else None
        try:
            st = os.stat(path)
            fresh = row is not None and (row["size"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns)
        except OSError:
            fresh = False
        if state is not None and fresh and state["ocr_status"] not in (None, OCR_OFF):
            return {"path": path, "id": image_id, "source": "index", "status": state["ocr_status"],
                    "error": state["ocr_error"], "meta": state["meta"], "lines": cat.ocr_lines(image_id)}
    img = media.load_image(path)
    res = Extractor(ocr=True, max_side=max_side, readers=1)(path, img)
    lines = [{"line": n, "text": t, "score": round(float(s), 4), "box": b} for n, (t, s, b) in enumerate(res.lines)]
    return {"path": path, "id": None, "source": "ocr", "status": res.status, "error": res.error, "meta": res.meta,
            "lines": lines}
