"""Small tensor work on one thread.

A batch is built from hundreds of tiny tensor ops (64×64 softmax, gathers, per-image transforms).
With torch's intra-op pool at 2+ threads each op pays a fork/join that costs more than the op:
measured on 2 cores, the re-ranker's batch took 20 ms on 2 threads and 2 ms on one. The model's
own large ops keep every thread.
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
