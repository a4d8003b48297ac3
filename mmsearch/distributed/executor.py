"""RayExecutor: runs the indexer's decode -> encode stage on a Ray Data actor pool; the driver commits.

    plan (driver, SQLite) -> pending table -> from_items -> map_batches(EmbedActor) -> commit (driver)

Fault tolerance comes from three places: Ray Data restarts dead actors and retries their tasks
(max_restarts=-1, max_task_retries=-1 are its defaults for actor pools); a result is committed only
while its path is still pending, so a task that ran twice adds nothing twice; a killed driver leaves
the pending table and the catalog consistent, and re-running the command plans and sends only what is
still to do. This module imports no Ray at import time.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Optional

import numpy as np

from mmsearch.checks import count, number
from mmsearch.errors import DistributedError, MediaError
from mmsearch.distributed import pending
from mmsearch.distributed.worker import FATAL, OK, UNREACHABLE, EmbedActor

# Ray's own is 30 min; a stuck pool should say so sooner (a first download of large pretrained weights
# on every node may need more: RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S overrides it)
DEFAULT_NO_PROGRESS_TIMEOUT_S = 600.0


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise DistributedError("--ray needs Ray Data on this machine and on every node: "
                               "pip install 'mmsearch[ray]'") from exc
    return ray


def _words(batch: dict, i: int):
    """The extractor's result a worker sent for row i (None from a worker that read no words)."""
    import json

    from mmsearch.indexing.extract import Extract

    raw = str(batch["words"][i]) if "words" in batch else ""
    return Extract.from_dict(json.loads(raw)) if raw else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:300]


class RayExecutor:
    """`address`: 'auto' (RAY_ADDRESS or a running local cluster, else start one here) or the head's address.
    `actors`: pool size [one per GPU, else one per CPU less one per node]. `device` is resolved on each
    worker ('auto': the GPU Ray gives the actor, else its CPU)."""

    def __init__(self, address: str = "auto", actors: Optional[int] = None, device: str = "auto",
                 precision: Optional[str] = None, batch_size: Optional[int] = None,
                 decode_workers: Optional[int] = None, cpus_per_actor: float = 1.0,
                 no_progress_timeout_s: float = DEFAULT_NO_PROGRESS_TIMEOUT_S):
        import_ray()  # fail before the scan, not after it
        if actors is not None and actors < 1:
            raise DistributedError("--ray-actors must be at least 1")
        batch_size, decode_workers = count("batch_size", batch_size), count("decode_workers", decode_workers)
        cpus_per_actor = number("cpus_per_actor", cpus_per_actor, 0, None, optional=False, low_open=True)
        self.address, self.actors, self.device = address, actors, (device or "auto").lower()
        self.precision, self.batch_size, self.decode_workers = precision, batch_size, decode_workers
        self.cpus_per_actor, self.no_progress_timeout_s = cpus_per_actor, no_progress_timeout_s
        self.stats: dict = {}

    # ---- the executor hook (mmsearch.indexing.pipeline.index_folders) --------------------------------------
    def run(self, store, plan, vectors, summary, progress=None) -> None:
        ray = import_ray()
        todo = plan.embed
        self.stats["resumed"] = pending.record(store.catalog, todo)  # before anything is sent
        owns = self._connect(ray)
        try:
            ds = self._dataset(ray, store, todo)
            left = {f.path: f for f in todo}
            if progress:
                progress(0, len(todo), stage="embed")
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
                    self._commit(store, plan, vectors, summary, batch, left)
                    if progress:
                        progress(len(todo) - len(left), len(todo), stage="embed")
            except DistributedError:
                raise
            except Exception as exc:  # Ray's own failures (a timeout, a crashed pool): one line, work kept
                raise DistributedError(f"the Ray run stopped ({_first_line(exc)}); committed images are kept: "
                                       f"re-run the same command to resume") from exc
            if left:
                raise DistributedError(f"{len(left)} images came back from no worker; re-run the same command to "
                                       f"resume")
        finally:
            if owns:
                ray.shutdown()

    # ---- cluster --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self):
        """One connection to the cluster for several runs (the shards of a sharded index, one run each)."""
        ray = import_ray()
        owns = self._connect(ray)
        try:
            yield self
        finally:
            if owns:
                ray.shutdown()

    def _connect(self, ray) -> bool:
        """Connect unless the caller already did; True when this call made the connection."""
        if ray.is_initialized():
            return False
        # Ray's start-up warnings (token auth, progress bars) are not the user's business; failures come
        # back as typed errors, and the workers' own logs stay in Ray's session folder
        kw = dict(logging_level=logging.ERROR, log_to_driver=False)
        try:
            if self.address == "auto":
                try:
                    ray.init(address="auto", **kw)
                except ConnectionError:  # no cluster running: start one on this machine
                    ray.init(include_dashboard=False, **kw)
            else:
                ray.init(address=self.address, **kw)
        except Exception as exc:
            raise DistributedError(f"cannot connect to the Ray cluster at {self.address}: {_first_line(exc)}") from exc
        return True

    def _pool(self, ray) -> dict:
        """Actors, their resources and the device name they resolve, from what the cluster has."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
        gpus = int(sum(n["Resources"].get("GPU", 0) for n in nodes))
        cpu_nodes = sum(1 for n in nodes if n["Resources"].get("CPU", 0) > 0)
        dev = self.device
        if dev.startswith("cuda:"):
            raise DistributedError(f"--device {dev} with --ray: Ray assigns each actor its GPU; use cuda or auto")
        if dev == "cuda" and gpus == 0:
            raise DistributedError("--device cuda: the Ray cluster has no GPU (use --device auto or cpu)")
        use_gpu = gpus > 0 and dev in ("auto", "cuda")
        if use_gpu:
            actors, num_gpus, worker_dev = self.actors or gpus, 1, "cuda"
        else:
            # one CPU per node stays free: Ray's own tasks and a restarted actor need somewhere to run
            # (an actor pool holding every CPU hangs silently, Ray #44687)
            free = int(cpus // self.cpus_per_actor) - cpu_nodes
            actors, num_gpus, worker_dev = self.actors or max(1, free), 0, "cpu" if dev == "auto" else dev
        need = actors * (num_gpus or self.cpus_per_actor)
        if need > (gpus if use_gpu else cpus):
            unit = "GPU" if use_gpu else "CPU"
            raise DistributedError(f"{actors} actors need {need:g} {unit}s; the Ray cluster has "
                                   f"{gpus if use_gpu else cpus:g} (lower --ray-actors)")
        self.stats.update(nodes=len(nodes), cpus=cpus, gpus=gpus, actors=actors, device=worker_dev)
        return dict(actors=actors, num_gpus=num_gpus, device=worker_dev, gpu=use_gpu)

    def _dataset(self, ray, store, todo):
        from mmsearch.config import VERSION

        pool = self._pool(ray)
        bs = self.batch_size or (256 if pool["gpu"] else 32)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the CLI draws its own bar
        ctx.print_on_execution_start = False
        if "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S" not in os.environ:  # the user's own setting wins
            ctx.execution_no_progress_timeout_s = self.no_progress_timeout_s
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        items = [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns} for f in todo]
        ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / bs)))
        grid = store.token_grid()
        tower = self._tower(ray, store, pool, grid)
        self.stats["tower"] = f"{'onnx' if tower is not None else 'torch'} {store.precision}"
        ctor = dict(spec=store.spec.to_dict(), fingerprint=store.meta["fingerprint"], dim=store.dim,
                    device=pool["device"], precision=store.precision, token_grid=grid,
                    token_width=int(store.meta["vision_width"]) if grid else 0,
                    decode_workers=self.decode_workers or (8 if pool["gpu"] else 2), version=VERSION,
                    tower=tower, threads=max(1, int(self.cpus_per_actor)), ocr=store.meta.get("ocr"))
        return ds.map_batches(EmbedActor, batch_size=bs, batch_format="numpy", fn_constructor_kwargs=ctor,
                              compute=ray.data.ActorPoolStrategy(size=pool["actors"]),
                              num_cpus=self.cpus_per_actor, num_gpus=pool["num_gpus"] or None)

    def _tower(self, ray, store, pool, grid):
        """CPU workers run the index's exported ONNX tower, as the local path does (faster than torch, and
        int8 is ONNX only): its files go to the object store once. None: workers load the torch model."""
        if pool["gpu"] or grid is not None or store.precision.startswith("amp-"):
            if store.precision == "int8":
                raise DistributedError(f"index {store.dir} is int8, which runs on CPUs only (its ONNX tower "
                                       f"gives no re-ranker tokens): use --device cpu without a re-ranker")
            return None
        from mmsearch.towers.imagetower import OnnxImageTower

        enc = store.image_encoder()  # exports the tower when missing (torch on the driver, once)
        if not isinstance(enc, OnnxImageTower):
            return None  # an architecture the exporter cannot take: torch on the workers too
        files = {p.name: p.read_bytes() for p in enc.dir.iterdir() if p.is_file()}
        self._tower_ref = ray.put(files)  # held by the driver for the whole run
        return self._tower_ref

    # ---- committing on the driver ---------------------------------------------------------------
    def _commit(self, store, plan, vectors, summary, batch: dict, left: dict) -> int:
        """Commit one result batch with its pending rows; results for paths no longer pending are dropped."""
        from mmsearch.indexing.stage import commit_batch

        good, bad, rows, seen = [], [], [], set()
        for i, path in enumerate(batch["path"]):
            path = str(path)
            f = left.get(path)
            if f is None or path in seen:
                continue  # committed already: a retried task's second answer
            seen.add(path)
            kind, reason = str(batch["kind"][i]), str(batch["error"][i])
            if kind == FATAL:
                raise DistributedError(f"{reason}; nothing was lost: re-run the same command to resume")
            if kind == UNREACHABLE and os.path.exists(path):
                raise DistributedError(
                    f"node {batch['node'][i]} cannot read {path}, which exists on this machine: image paths must "
                    f"be readable at the same path on every node (a shared or mirrored filesystem). Committed "
                    f"images are kept; re-run the same command to resume")
            if kind == OK:
                taken = float(batch["taken_at"][i])
                qhash = str(batch["quick_hash"][i]) or None
                orig = (int(batch["width"][i]), int(batch["height"][i]))
                good.append((f, (None, orig, None if math.isnan(taken) else taken, qhash, _words(batch, i))))
                rows.append(i)
            else:
                bad.append((f, MediaError(path, reason or "cannot read")))
        if not good and not bad:
            return 0
        emb = np.ascontiguousarray(batch["embedding"][rows], dtype=np.float32) if rows else None
        toks = batch["tokens"][rows] if rows and "tokens" in batch else None
        done = [f.path for f, _ in good] + [f.path for f, _ in bad]
        commit_batch(store.catalog, plan, vectors, good, bad, emb, toks, summary,
                      also=lambda cat: pending.done(cat, done))
        for path in done:
            del left[path]
        return len(done)
