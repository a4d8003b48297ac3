"""What a Ray actor runs: load the index's model once, then decode + encode batches of paths.

A plain callable class (Ray Data's `map_batches` makes it an actor pool), so it can be tested without
Ray. Nothing raises out of a batch: a bad file is a 'bad' row, a path this node cannot see is an
'unreachable' row (the driver decides whether that means "not shared" or "deleted"), and a model that
cannot load here makes every row 'fatal' with the reason, which the driver turns into one clear error.
"""
from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

OK, BAD, UNREACHABLE, FATAL = "ok", "bad", "unreachable", "fatal"


class EmbedActor:
    def __init__(self, spec: dict, fingerprint: str, dim: int, device: str = "auto", precision: str = "fp32",
                 token_grid: Optional[int] = None, token_width: int = 0, decode_workers: int = 2,
                 version: Optional[str] = None, tower=None, threads: int = 1, ocr: Optional[dict] = None):
        from mmsearch.config import VERSION
        from mmsearch.config import ModelSpec
        from mmsearch.errors import MmsearchError

        self.node = socket.gethostname()
        self.dim, self.token_grid, self.error, self.encoder = dim, token_grid, None, None
        self.extractor = None
        # every batch has the same columns, whatever fails in it
        self.token_shape = (1 + token_grid * token_grid, token_width) if token_grid else None
        try:
            if version and version != VERSION:
                raise MmsearchError(f"mmsearch {VERSION} is installed here but the driver runs {version}; "
                                    f"install the same version on every node")
            if tower is not None:  # the index's exported ONNX tower (CPU workers): no torch to import
                self.encoder = _onnx_tower(tower, fingerprint, precision, threads)
            else:
                from mmsearch.towers.devices import check_precision, resolve_device, torch_precision
                from mmsearch.towers.encoder import load_encoder
                from mmsearch.errors import ModelMismatchError

                dev = resolve_device(device)
                enc = load_encoder(ModelSpec.from_dict(spec), device=dev)
                if enc.fingerprint != fingerprint:
                    raise ModelMismatchError(f"the model weights here differ from the index's (fingerprint "
                                             f"{enc.fingerprint} != {fingerprint})")
                enc.precision = torch_precision(check_precision(precision, dev), dev)
                self.encoder = enc
            from mmsearch.indexing.extract import Extractor  # the words of each image, as the local path reads them

            settings = ocr or {}
            os.environ.setdefault("MMSEARCH_OCR_THREADS", str(max(1, threads)))  # the actor's CPUs, not the node's
            self.extractor = Extractor(ocr=bool(settings.get("enabled")), max_side=settings.get("max_side"),
                                       max_boxes=settings.get("max_boxes"))
        except MmsearchError as exc:
            hint = " (the checkpoint must be readable at the same path on every node)" \
                if spec.get("checkpoint") and "not found" in str(exc) else ""
            self.error = f"node {self.node}: {exc}{hint}"
        from mmsearch.indexing.stage import background_thread

        self.pool = ThreadPoolExecutor(max_workers=max(1, decode_workers), initializer=background_thread)

    def __call__(self, batch: dict) -> dict:
        paths = [str(p) for p in batch["path"]]
        n = len(paths)
        kind = np.full(n, OK, dtype=object)
        error = np.full(n, "", dtype=object)
        out = {"path": np.array(paths, dtype=object), "kind": kind, "error": error,
               "node": np.full(n, self.node, dtype=object), "embedding": np.zeros((n, self.dim), np.float32),
               "width": np.zeros(n, np.int64), "height": np.zeros(n, np.int64),
               "taken_at": np.full(n, np.nan), "quick_hash": np.full(n, "", dtype=object),
               "words": np.full(n, "", dtype=object)}  # JSON of the extractor's result (indexing/extract.py)
        if self.token_shape:
            out["tokens"] = np.zeros((n,) + self.token_shape, np.float16)
        if self.error is not None:
            kind[:] = FATAL
            error[:] = self.error
            return out
        from mmsearch.indexing import scan
        from mmsearch.errors import MediaError
        from mmsearch.indexing.stage import batch_pixels, decode_file, worker_transform

        enc = self.encoder
        prep = worker_transform(enc)
        infos = [scan.FileInfo(p, int(s), int(m)) for p, s, m in zip(paths, batch["size"], batch["mtime_ns"])]
        # all decodes are queued at once and encoded in slices as they finish: the encoder (a GPU above
        # all) works on one slice while the threads decode the next
        results = self.pool.map(lambda f: decode_file(f, enc.image_size, prep, self.extractor), infos)
        step = max(8, -(-n // 4))
        for start in range(0, n, step):
            good, pixels = [], []
            for i in range(start, min(n, start + step)):
                r = next(results)
                if isinstance(r, MediaError):
                    kind[i] = BAD if os.path.exists(paths[i]) else UNREACHABLE
                    error[i] = r.reason
                    continue
                good.append(i)
                pixels.append(r[0])
                _, orig, taken_at, qhash, words = r
                if words is not None:
                    import json

                    out["words"][i] = json.dumps(words.to_dict(), ensure_ascii=False)
                out["width"][i], out["height"][i] = int(orig[0]), int(orig[1])
                out["taken_at"][i] = np.nan if taken_at is None else float(taken_at)
                out["quick_hash"][i] = qhash or ""
            if good:
                res = enc.encode_image_tensor(batch_pixels(enc, pixels), token_grid=self.token_grid)
                emb, toks = res if self.token_grid else (res, None)
                out["embedding"][good] = emb
                if toks is not None:
                    out["tokens"][good] = toks.astype(np.float16)  # the catalog keeps tokens as float16
        return out


def _onnx_tower(tower, fingerprint: str, precision: str, threads: int):
    """Write the tower's files (sent once through Ray's object store) to a private folder and load them."""
    import atexit
    import shutil
    import tempfile
    from pathlib import Path

    from mmsearch.errors import ModelMismatchError
    from mmsearch.towers.imagetower import DIR_NAME, OnnxImageTower

    if not isinstance(tower, dict):  # an ObjectRef from the driver
        import ray

        tower = ray.get(tower)
    root = Path(tempfile.mkdtemp(prefix="mmsearch-tower-"))
    atexit.register(shutil.rmtree, root, True)
    (root / DIR_NAME).mkdir()
    for name, data in tower.items():
        (root / DIR_NAME / name).write_bytes(data)
    os.environ.setdefault("MMSEARCH_ORT_THREADS", str(max(1, threads)))  # the actor's CPUs, not the node's
    t = OnnxImageTower.load(root)
    if (t.fingerprint, t.precision) != (fingerprint, precision):
        raise ModelMismatchError(f"the image tower sent is {t.fingerprint}/{t.precision}, the index "
                                 f"{fingerprint}/{precision}")
    t.session  # a damaged file fails here, once
    return t
