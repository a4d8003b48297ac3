"""How many CPU threads a training run gives torch: the idle cores (mmsearch.towers.cpu.idle_cores),
never more than torch already has, and exactly what the user set with OMP_NUM_THREADS. The count is
restored when the run ends, so a library caller's own setting survives."""
from __future__ import annotations

import contextlib
import os

import torch


def run_threads() -> int:
    """The intra-op thread count a CPU run uses here."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    from mmsearch.towers.cpu import idle_cores

    return max(1, min(torch.get_num_threads(), idle_cores()))


@contextlib.contextmanager
def cpu_threads(device_type: str = "cpu"):
    """Inside: torch runs `run_threads()` intra-op threads (CPU runs only); yields the count."""
    before = torch.get_num_threads()
    if device_type != "cpu":
        yield before
        return
    n = run_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
