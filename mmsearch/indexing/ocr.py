"""Read the words in an image: rapidocr's PP-OCR detection and recognition models (shipped in its
wheel, so nothing is downloaded), run on OpenVINO when it is installed (a core dependency on x86 and
ARM: the detector measured ~10x faster there than on ONNX Runtime on 2 cores), else on ONNX Runtime.

The work per image is bounded: the input is scaled down to `max_side` pixels on its longest side,
at most `max_boxes` text boxes are recognised (the most confident), and a first detector pass at about
half the input's size (256 to 640 pixels on its longest side) decides whether there is text at all: an
image without text costs that one small pass and nothing else. When OCR reads an indexed image (after
the embed phase on a CPU), a big JPEG is decoded at 1/4 scale for that pass (its entropy decoding, not
the scale, is most of the cost), and only an image with text is decoded again at OCR size.
Everything rapidocr-specific is in this module (imported only when OCR runs).
"""
from __future__ import annotations

import importlib.util
import os
import queue
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from mmsearch.errors import MissingExtraError
from mmsearch.indexing.ocrsettings import DEFAULT_MAX_BOXES, DEFAULT_MAX_SIDE, INSTALL, ocr_available

GATE_SIDE = 640  # the first, cheap detector pass: at most this long side,
GATE_SCALE = 0.5  # about half the OCR input's (text 20 px high is 10 px there, which the detector still finds),
GATE_MIN_SIDE = 256  # and at least this: a 500 x 375 photo is gated at 256 x 192, not read whole at 512 x 384
GATE_THRESHOLD = 0.3  # a text pixel of the gate's probability map (the detector's own binarisation threshold)
GATE_DECODE_SIDE = 480  # the short side OCR first decodes a file to (a 4:3 gate input of 640)
GATE_MIN_PIXELS = 6  # this many text pixels at gate size send the image to the full pass
MIN_LINE_SCORE = 0.5  # recognised lines below this confidence are dropped (rapidocr's default text_score)


@dataclass
class OcrResult:
    lines: list = field(default_factory=list)  # (text, score, box [[x, y] x4] in fractions of the image)
    boxes_found: int = 0
    kept_boxes: int = 0
    gated: bool = False  # True: the first pass found no text, nothing else ran

    @property
    def note(self) -> Optional[str]:
        if self.boxes_found > self.kept_boxes:
            return f"kept the {self.kept_boxes} most confident of {self.boxes_found} text boxes"
        return None


@dataclass
class _Models:
    """One detector + recogniser pair (a replica): used by one thread at a time."""
    detector: object
    recognizer: object


class OcrEngine:
    """Detector and recogniser replicas; `read` is thread-safe. With `replicas` > 1, that many images are read
    at once, each replica on threads // replicas threads: the gate's small inputs (256 x 192) scale poorly over
    threads (one image: 23 ms on one thread, 18 ms on two; 2-core AMD EPYC, AVX2), so two images side by side
    are read faster than one after the other. Replicas past the first load when a second reader waits."""

    def __init__(self, max_side: int = DEFAULT_MAX_SIDE, max_boxes: int = DEFAULT_MAX_BOXES,
                 gate_side: int = GATE_SIDE, threads: Optional[int] = None, replicas: int = 1):
        if not ocr_available():
            raise MissingExtraError(f"OCR needs rapidocr: {INSTALL} (or index with --no-ocr)")
        self.max_side, self.max_boxes, self.gate_side = int(max_side), int(max_boxes), int(gate_side)
        self.threads = int(threads or os.environ.get("MMSEARCH_OCR_THREADS") or os.cpu_count() or 1)
        self.replicas = max(1, min(int(replicas), self.threads))
        self.threads_each = max(1, self.threads // self.replicas)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._made, self._made_lock = 1, threading.Lock()
        self._local = threading.local()
        self._gate_preps: dict = {}
        self._free.put(self._load())

    @property
    def detector(self):
        return self._local.models.detector

    @property
    def recognizer(self):
        return self._local.models.recognizer

    @contextmanager
    def _checkout(self):
        """A free replica for this thread (a new one while fewer than `replicas` exist), returned after."""
        try:
            models = self._free.get_nowait()
        except queue.Empty:
            with self._made_lock:
                grow = self._made < self.replicas
                self._made += grow
            models = self._load() if grow else self._free.get()
        self._local.models = models
        try:
            yield models
        finally:
            self._local.models = None
            self._free.put(models)

    def _load(self) -> _Models:
        from rapidocr import EngineType, RapidOCR
        from rapidocr.ch_ppocr_det import TextDetector
        from rapidocr.ch_ppocr_rec import TextRecognizer

        # OpenVINO where installed: on AVX2 too, where its detector alone is slower than ONNX Runtime's
        # (512 x 384: 81 against 54 ms) but detection + recognition of images with text is faster (444
        # against 535 ms an image; 2-core AMD EPYC, AVX2 only)
        engine = EngineType.OPENVINO if importlib.util.find_spec("openvino") else EngineType.ONNXRUNTIME
        params = {"Global.log_level": "error", "Global.use_cls": False,
                  "Det.engine_type": engine, "Rec.engine_type": engine,
                  "Det.limit_type": "max", "Det.limit_side_len": self.max_side,
                  "Det.max_candidates": max(1000, self.max_boxes),
                  "EngineConfig.openvino.inference_num_threads": self.threads_each,
                  # unpinned: two one-thread replicas pinned alike shared one core (25.8 ms an image, not 12.5)
                  "EngineConfig.openvino.enable_cpu_pinning": False if self.replicas > 1 else None,
                  "EngineConfig.onnxruntime.intra_op_num_threads": self.threads_each}
        cfg = RapidOCR(params=params).cfg  # the config only: RapidOCR loads its models lazily
        for part in (cfg.Det, cfg.Rec):
            part.engine_cfg = cfg.EngineConfig[part.engine_type.value]
            part.model_root_dir = cfg.Global.model_root_dir
        cfg.Rec.font_path = None
        self.engine_name = engine.value
        self._norm = (cfg.Det.mean, cfg.Det.std)
        return _Models(TextDetector(cfg.Det), TextRecognizer(cfg.Rec))

    def gate_size(self, h: int, w: int) -> int:
        """The gate pass's long side for an OCR input of h x w (a multiple of 32, as the detector takes)."""
        side = max(GATE_MIN_SIDE, int(np.ceil(GATE_SCALE * max(h, w) / 32)) * 32)
        return min(self.gate_side, side)

    # ---- the steps (each replaceable in tests) ----------------------------------------------------
    def has_text(self, bgr: np.ndarray, side: Optional[int] = None) -> bool:
        """The gate: the detector at `side` pixels (gate_size by default) finds at least one text region."""
        from rapidocr.ch_ppocr_det.utils import DetPreProcess

        side = side or self.gate_size(*bgr.shape[:2])
        if side not in self._gate_preps:
            self._gate_preps[side] = DetPreProcess(side, "max", *self._norm)
        pred = np.array(self.detector.session(self._gate_preps[side](bgr)))  # a copy: the session reuses its buffer
        if int((pred > GATE_THRESHOLD).sum()) < GATE_MIN_PIXELS:
            return False
        boxes, _ = self.detector.postprocess_op(pred, bgr.shape[:2])
        return len(text_boxes(np.asarray(boxes, np.float32), bgr.shape[:2])) > 0

    def detect(self, bgr: np.ndarray) -> tuple[np.ndarray, list]:
        """(boxes [n, 4, 2] in pixels of `bgr`, scores) of the text regions."""
        out = self.detector(bgr)
        if out.boxes is None or len(out.boxes) == 0:
            return np.zeros((0, 4, 2), np.float32), []
        boxes = np.asarray(out.boxes, np.float32)
        scores = list(out.scores if out.scores is not None else [1.0] * len(boxes))
        keep = text_boxes(boxes, bgr.shape[:2], index=True)
        return boxes[keep], [scores[i] for i in keep]

    def recognize(self, crops: list) -> list[tuple[str, float]]:
        from rapidocr.ch_ppocr_rec import TextRecInput

        if not crops:
            return []
        out = self.recognizer(TextRecInput(img=crops))
        return [(str(t), float(s)) for t, s in zip(out.txts or (), out.scores or ())]

    # ---- one image --------------------------------------------------------------------------------
    def read(self, img, full=None) -> OcrResult:
        """The text lines of a PIL image (RGB), each with its confidence and box. `full`: a callable that
        decodes the image at OCR size when `img` is a smaller decode of it (the indexer's draft-scaled
        JPEG): the gate runs on `img`, and only an image with text is decoded again."""
        if full is not None:
            w0, h0 = img.info.get("original_size", img.size)
            s = min(1.0, self.max_side / float(max(w0, h0)))
            side = self.gate_size(round(h0 * s), round(w0 * s))
            small = np.asarray(img.convert("RGB"))
            with self._checkout():
                if not self.has_text(pad_strip(np.ascontiguousarray(small[:, :, ::-1]))[0], side):
                    return OcrResult(gated=True)
            return self.read(full())
        img = cap(img, self.max_side)
        rgb = np.asarray(img.convert("RGB"))
        bgr, top = pad_strip(np.ascontiguousarray(rgb[:, :, ::-1]))
        h, w = rgb.shape[:2]
        with self._checkout():
            if self.gate_size(h, w) <= 0.75 * max(h, w) and not self.has_text(bgr):
                return OcrResult(gated=True)
            boxes, scores = self.detect(bgr)
            res = OcrResult(boxes_found=len(boxes))
            if len(boxes) > self.max_boxes:  # keep the most confident, then back in reading order
                keep = sorted(np.argsort(-np.asarray(scores, np.float64), kind="stable")[:self.max_boxes])
                boxes, scores = boxes[keep], [scores[i] for i in keep]
            res.kept_boxes = len(boxes)
            crops = [crop(bgr, b) for b in boxes]
            texts = self.recognize(crops)
        for (text, score), b in zip(texts, boxes):
            text = " ".join(text.split())
            if score >= MIN_LINE_SCORE and any(ch.isalnum() for ch in text):
                pts = [[float(np.clip(x / w, 0, 1)), float(np.clip((y - top) / h, 0, 1))] for x, y in b]
                res.lines.append((text, score, pts))
        return res


def text_boxes(boxes: np.ndarray, shape, index: bool = False):
    """Boxes that can be text lines: the detector marks a plain, uniform image (a blank screen, a sky) as
    one region spanning it, which is no line of text."""
    h, w = shape[:2]
    keep = [i for i, b in enumerate(boxes) if len(b) and not (np.ptp(b[:, 0]) > 0.9 * w and np.ptp(b[:, 1]) > 0.6 * h)]
    return keep if index else boxes[keep] if len(keep) else boxes[:0]


def cap(img, max_side: int):
    """The OCR input: scaled down (never up) to `max_side` on its longest side."""
    from PIL import Image

    w, h = img.size
    if max(w, h) <= max_side:
        return img
    s = max_side / float(max(w, h))
    return img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)


def pad_strip(bgr: np.ndarray) -> tuple[np.ndarray, int]:
    """A very short or very wide image (a one-line banner) padded above and below, as PP-OCR expects;
    returns the padded image and the rows added on top."""
    h, w = bgr.shape[:2]
    if h > 32 and w / max(h, 1) <= 8:
        return bgr, 0
    new_h = max(int(w / 8), 32) * 2
    top = max(0, (new_h - h) // 2)
    return np.pad(bgr, ((top, top), (0, 0), (0, 0)), mode="edge"), top


def crop(bgr: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The text region of a (possibly rotated) box, straightened; tall regions are turned upright."""
    from rapidocr.utils.process_img import get_rotate_crop_image

    return get_rotate_crop_image(bgr, np.array(box, np.float32))


_shared: dict = {}
_shared_lock = threading.Lock()


def shared_engine(max_side: int = DEFAULT_MAX_SIDE, max_boxes: int = DEFAULT_MAX_BOXES,
                  replicas: int = 1) -> OcrEngine:
    """One engine per process and settings: its models load once (about a second), whatever the runs."""
    key = (int(max_side), int(max_boxes), int(replicas))
    with _shared_lock:
        if key not in _shared:
            _shared[key] = OcrEngine(max_side=max_side, max_boxes=max_boxes, replicas=replicas)
        return _shared[key]
