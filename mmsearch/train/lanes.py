"""Data parallelism over threads, for models too small to keep a CPU's cores busy with intra-op
threads (the fusion re-ranker: 2 threads ran its step only 1.26x faster than 1).

Each lane is a thread running torch on one intra-op thread; it computes the gradient of its share of
the batch's loss with `torch.autograd.grad`, and the shares are summed in lane order. So the result is
the full batch's gradient and does not depend on which thread finished first. Ops release the GIL,
so the lanes run on separate cores.

Batches of padded sequences are cut by length first (`length_chunks`): a chunk is padded only to its
own longest row, which drops most of the padding the whole batch would carry.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch

MAX_LANES = 8


def default_lanes() -> int:
    return max(1, min(MAX_LANES, torch.get_num_threads()))


def length_chunks(lengths: torch.Tensor, lanes: int) -> list[list[torch.Tensor]]:
    """Row indices per lane: rows sorted by length into 2 x lanes chunks; lane j gets chunk j and the
    chunk mirrored from the other end, so every lane has about the same number of tokens."""
    order = torch.argsort(lengths, stable=True)
    n_chunks = min(2 * lanes, len(order))
    chunks = list(torch.tensor_split(order, n_chunks))
    per_lane: list[list[torch.Tensor]] = [[] for _ in range(lanes)]
    for j in range(n_chunks):
        lane = j if j < lanes else 2 * lanes - 1 - j
        per_lane[lane % lanes].append(chunks[j])
    return [rows for rows in per_lane if rows]


class ThreadLanes:
    def __init__(self, lanes: int | None = None):
        self.lanes = default_lanes() if lanes is None else max(1, int(lanes))
        per_lane = max(1, torch.get_num_threads() // self.lanes)  # beyond MAX_LANES cores, lanes get several
        self._pool = (ThreadPoolExecutor(self.lanes, thread_name_prefix="lane", initializer=torch.set_num_threads,
                                         initargs=(per_lane,)) if self.lanes > 1 else None)

    def gradients(self, params: Sequence[torch.Tensor], lane_loss: Callable[[list], torch.Tensor],
                  shares: list) -> torch.Tensor:
        """Set p.grad to the sum over `shares` of d lane_loss(share)/dp; returns the summed loss
        (detached). With one lane the share runs here, on all of this thread's intra-op threads."""
        def run(share):
            loss = lane_loss(share)
            return loss.detach(), torch.autograd.grad(loss, params, allow_unused=True)

        results = [run(s) for s in shares] if self._pool is None else list(self._pool.map(run, shares))
        for i, p in enumerate(params):
            total = None
            for _, g in results:  # in lane order, whatever order the threads finished in
                if g[i] is not None:
                    total = g[i] if total is None else total + g[i]
            p.grad = total
        return sum(loss for loss, _ in results)

    def run(self, fn: Callable, *args):
        """fn(*args) on a lane thread: small tensor work (a batch's gathers) costs more in a fork/join
        of the intra-op pool than it does on one thread (the re-ranker's batch: 20-35 ms -> 4-6 ms)."""
        return fn(*args) if self._pool is None else self._pool.submit(fn, *args).result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self) -> "ThreadLanes":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
