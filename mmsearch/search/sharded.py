"""Scatter/gather over the shards of a sharded index: the searcher a router (or a process) uses.

    query -> embed once (the index's torch-free text tower) -> every shard: its nearest `depth` with the
    filters, and the rows of its first hits -> merge by score -> re-rank the merged top K (tokens from
    the owning shards) -> hits with global ids (shardmap.global_id)

The shards are clients with `submit(method, *args)` returning something with `.result(timeout)`:
LocalClient runs a ShardWorker (search/shard.py) in this process; distributed/serving.py wraps Ray
Serve handles the same way, so the router logic is this one module for both.

Faults are visible, never silent: a shard that fails is retried until the deadline (a killed replica's
requests go to another one), then reported in `missing` and left out of the answer, which says
`partial`; while it is down it is skipped at once, and probed in the background until it answers again.
A failure that is the request's (a QueryError) is raised as it is. With `cold_s` (the Ray router: COLD_S),
a shard that has not answered yet gets that long instead of timeout_s: its first call may be the one that
opens the connections. In-process shards have none to open, and a broken one is reported at once.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np

from mmsearch.errors import QueryError, ShardUnavailableError
from mmsearch.search.filters import Filters
from mmsearch.search.hits import Hit, build_hits, order_hits
from mmsearch.search.query import DEFAULT_RERANK_K
from mmsearch.search.terms import embed_terms, parse_query
from mmsearch.storage.shardmap import ShardMap, global_id, split_id

COLD_S = 15.0  # the Ray router's deadline for a shard's calls until it first answers (in-process shards: none)
HYDRATE_MAX = 256  # rows a shard sends with its hits; deeper pages fetch the rows they show afterwards


class HitList(list):
    """Hits, plus the shards that did not answer (`missing`) and where the time went (`timing`)."""

    missing: list = []
    timing: dict = {}


class LocalClient:
    """A ShardWorker in this process, called on a thread pool so the shards search in parallel."""

    def __init__(self, worker, pool: ThreadPoolExecutor):
        self.worker, self.pool = worker, pool

    def submit(self, method: str, *args):
        return self.pool.submit(getattr(self.worker, method), *args)


class ShardedSearcher:
    """`clients[i]` answers for shard `names[i]`; `towers` is an IndexStore of one shard folder (the query
    towers and the re-ranker: every shard has the same model)."""

    def __init__(self, clients: Sequence, names: Sequence[str], towers, timeout_s: float = 5.0,
                 probe_s: float = 0.5, allow_paths: bool = False, cold_s: float = 0.0):
        self.clients, self.names, self.towers = list(clients), list(names), towers
        self.n = len(self.clients)
        self.timeout_s, self.probe_s, self.allow_paths, self.cold_s = timeout_s, probe_s, allow_paths, cold_s
        self.answered: set = set()  # shards that have answered once (warm)
        self.down: dict[int, str] = {}  # shard -> why it was marked down
        self.queries = 0
        self._cpu0 = time.process_time()
        self._lock = threading.Lock()
        self._prober: Optional[threading.Thread] = None

    @property
    def store(self):
        return self.towers

    # ---- calling shards ---------------------------------------------------------------------------
    def gather(self, calls: dict) -> tuple[dict, list]:
        """{shard: (method, args)} -> ({shard: reply}, names of the shards that did not answer)."""
        missing = [self.names[i] for i in calls if i in self.down]
        live = {i: c for i, c in calls.items() if i not in self.down}
        sent = {i: self.clients[i].submit(m, *a) for i, (m, a) in live.items()}
        now = time.monotonic()
        replies = {}
        for i, fut in sent.items():
            tries = 0
            # a shard's first call may also open its connections (Ray Serve's throughput mode opens gRPC
            # channels then): until it has answered once it gets cold_s, not timeout_s
            deadline = now + (self.timeout_s if i in self.answered else max(self.timeout_s, self.cold_s))
            while True:
                left = deadline - time.monotonic()
                try:
                    replies[i] = fut.result(max(0.001, left))
                    self.answered.add(i)
                    break
                except QueryError as exc:  # the request's own fault: every shard would say the same
                    raise getattr(exc, "cause", None) or exc from None  # (Ray wraps it: its cause is ours)
                except Exception as exc:  # a dead replica, a timeout, a broken shard: retry, then give up on it
                    tries += 1
                    if left <= 0 or _is_timeout(exc) or time.monotonic() + 0.05 * tries >= deadline:
                        _cancel(fut)
                        self._mark_down(i, exc)
                        missing.append(self.names[i])
                        break
                    time.sleep(min(0.5, 0.05 * tries))
                    method, args = live[i]
                    fut = self.clients[i].submit(method, *args)
        return replies, sorted(missing, key=self.names.index)

    def _mark_down(self, i: int, exc: BaseException) -> None:
        with self._lock:
            self.down[i] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"[:300]
            if self._prober is None or not self._prober.is_alive():
                self._prober = threading.Thread(target=self._probe, daemon=True, name="mmsearch-shard-probe")
                self._prober.start()

    def _probe(self) -> None:
        """While shards are down: ping each every probe_s; one that answers is back."""
        while True:
            time.sleep(self.probe_s)
            with self._lock:
                down = list(self.down)
                if not down:
                    self._prober = None
                    return
            for i in down:
                try:
                    self.clients[i].submit("ping").result(self.timeout_s)
                except Exception:
                    continue
                with self._lock:
                    self.down.pop(i, None)

    def owner_call(self, gid: int, method: str, local_args) -> object:
        """One call to the shard owning global id `gid`; ShardUnavailableError when it does not answer."""
        shard, _ = split_id(gid, self.n)
        replies, missing = self.gather({shard: (method, (local_args,))})
        if missing:
            raise ShardUnavailableError(f"{self.names[shard]}, which holds image {gid}, does not answer right now")
        return replies[shard]

    # ---- queries ----------------------------------------------------------------------------------
    def _image_vector(self, term) -> np.ndarray:
        if term.image_id is not None:
            shard, local = split_id(term.image_id, self.n)
            vec = self.owner_call(term.image_id, "embeddings", [local]).get(local)
            if vec is None:
                raise QueryError(f"no image with id {term.image_id} in the index")
            return vec
        from mmsearch.media import load_image

        enc = self.towers.image_embedder()  # an upload (decoded pixels) or a file: the index's own tower, here
        img = term.pixels if term.pixels is not None else load_image(term.image, min_size=enc.image_size)
        return enc.encode_images([img])[0]

    def embed(self, terms, want_states: bool = False):
        return embed_terms(terms, self.towers.text_encoder, want_states, self._image_vector)

    def search(self, query: Optional[str] = None, images: Sequence[str] = (), k: int = 10,
               filters: Optional[Filters] = None, rerank: Optional[bool] = None, rerank_k: int = DEFAULT_RERANK_K,
               ids: Sequence[int] = (), offset: int = 0, min_score: Optional[float] = None,
               alpha: Optional[float] = None, mode: Optional[str] = None, good_only: bool = False,
               sort: str = "relevance", group: bool = True) -> HitList:
        """As Searcher.search, over every shard; hit ids are global ids. A sharded index is searched by the
        dual encoder only: no words side (mode text/hybrid), good-match flag or date order yet; video shots
        come back one hit per shot (`group` has no effect)."""
        if mode in ("text", "hybrid") or good_only or sort != "relevance":
            raise QueryError("a sharded index is searched by the image encoder only: mode=dense, no good_only, "
                             "sort=relevance (words, good matches and date order work on one index)")
        t0 = time.perf_counter()
        self.queries += 1
        terms = parse_query(query, images, ids, paths=self.allow_paths)
        single_text = len(terms) == 1 and terms[0].text is not None and terms[0].weight > 0
        has_rr = self.towers.reranker_info() is not None
        if rerank and not has_rr:
            raise QueryError("no re-ranker configured for this index (`mmsearch rerank enable FILE`)")
        rerank = bool((has_rr if rerank is None else rerank) and single_text)
        vec, states = self.embed(terms, want_states=rerank)
        depth = max(offset + k, rerank_k) if rerank else offset + k
        hydrate = depth if depth <= HYDRATE_MAX else 0
        t1 = time.perf_counter()
        replies, missing = self.gather({i: ("search", (vec, depth, filters, hydrate)) for i in range(self.n)})
        t2 = time.perf_counter()
        cands, rows = [], {}
        for i, rep in replies.items():
            cands += [(float(s), global_id(lid, i, self.n)) for lid, s in zip(rep["ids"], rep["scores"])]
            rows.update({global_id(lid, i, self.n): dict(r, id=global_id(lid, i, self.n))
                         for lid, r in rep["rows"].items()})
        cands.sort(key=lambda c: (-c[0], c[1]))
        pairs = [(g, s) for s, g in cands[:depth]]
        itm = self._rerank(states, [g for g, _ in pairs[:max(k, rerank_k)]]) if rerank and pairs else {}
        alpha = self.towers.reranker().alpha["text_to_image"] if itm and alpha is None else (alpha or 0.0)
        hits = order_hits(pairs, itm, alpha)[offset:]
        need = [g for g, *_ in hits[:k] if g not in rows]
        if need:
            got, gone = self.rows(need)
            rows.update(got)
            missing = sorted(set(missing) | set(gone), key=self.names.index)
        out = HitList(build_hits(hits, rows, k, offset, min_score))
        out.missing = missing
        out.timing = {"embed_ms": (t1 - t0) * 1000, "scatter_ms": (t2 - t1) * 1000,
                      "slowest_shard_ms": max((r["took_ms"] for r in replies.values()), default=0.0),
                      "total_ms": (time.perf_counter() - t0) * 1000}
        return out

    def rows(self, gids) -> tuple[dict, list]:
        """({global id: row}, shards that did not answer) for rows held anywhere."""
        by = {}
        for g in gids:
            shard, local = split_id(g, self.n)
            by.setdefault(shard, []).append(local)
        replies, missing = self.gather({i: ("rows", (locs,)) for i, locs in by.items()})
        out = {global_id(lid, i, self.n): dict(r, id=global_id(lid, i, self.n))
               for i, rep in replies.items() for lid, r in rep.items()}
        return out, missing

    def row(self, gid: int) -> Optional[dict]:
        shard, local = split_id(gid, self.n)
        r = self.owner_call(gid, "rows", [local]).get(local)
        return None if r is None else dict(r, id=gid)

    def _rerank(self, states, gids) -> dict:
        by = {}
        for g in gids:
            shard, local = split_id(g, self.n)
            by.setdefault(shard, []).append(local)
        replies, _ = self.gather({i: ("tokens", (locs,)) for i, locs in by.items()})
        toks = {global_id(lid, i, self.n): t for i, rep in replies.items() for lid, t in rep.items() if t is not None}
        have = [g for g in gids if g in toks]  # a shard that did not answer: its candidates rank after
        if not have:
            return {}
        scores = self.towers.reranker().score_text_to_images(states, np.stack([toks[g] for g in have]))
        return dict(zip(have, map(float, scores)))

    def search_texts(self, query: Optional[str] = None, images: Sequence[str] = (), k: int = 10,
                     ids: Sequence[int] = (), **_) -> HitList:
        """The closest texts of the corpus (every shard keeps all of it: the first that answers says).
        Image -> text re-ranking needs one index; here the order is the embedding similarity."""
        vec, _ = self.embed(parse_query(query, images, ids, paths=self.allow_paths))
        tried = []
        for i in sorted(range(self.n), key=lambda i: i in self.down):
            replies, missing = self.gather({i: ("texts", (vec, k))})
            if i in replies:
                out = HitList(Hit(rank=r + 1, score=s, id=t, similarity=s, text=text)
                              for r, (t, s, text) in enumerate(replies[i]))
                out.missing = tried
                return out
            tried += missing
        raise ShardUnavailableError("no shard answers for the text corpus right now")

    def stats(self) -> dict:
        """This process's memory and CPU per query (the router's share, to size a cluster)."""
        import os

        from mmsearch.search.shard import rss_bytes

        cpu = time.process_time() - self._cpu0
        return {"pid": os.getpid(), "rss_bytes": rss_bytes(), "cpu_s": round(cpu, 3), "queries": self.queries,
                "cpu_ms_per_query": round(1000 * cpu / self.queries, 3) if self.queries else None}

    def infos(self) -> tuple[dict, list]:
        """({shard name: ShardWorker.info()}, missing names)."""
        replies, missing = self.gather({i: ("info", ()) for i in range(self.n)})
        return {self.names[i]: r for i, r in replies.items()}, missing


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or type(exc).__name__ in ("TimeoutError", "GetTimeoutError")


def _cancel(fut) -> None:
    try:
        fut.cancel()
    except Exception:
        pass


def open_local(root, timeout_s: float = 5.0, allow_paths: bool = True) -> ShardedSearcher:
    """A sharded searcher over the shard folders of `root`, every shard in this process (checked first)."""
    from mmsearch.search.shard import ShardWorker
    from mmsearch.storage.shared import ServingStore

    smap = ShardMap.load(root)
    smap.check()
    workers = [ShardWorker(root, nm) for nm in smap.names]
    pool = ThreadPoolExecutor(max_workers=max(2, 2 * smap.n), thread_name_prefix="mmsearch-shard")
    towers = ServingStore.open_shared(smap.folder(smap.names[0]))
    return ShardedSearcher([LocalClient(w, pool) for w in workers], smap.names, towers, timeout_s=timeout_s,
                           allow_paths=allow_paths)
