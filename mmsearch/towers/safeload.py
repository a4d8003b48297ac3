"""Open a .pt file a user hands us without running anything it carries.

Every torch file mmsearch reads (encoder checkpoints, re-rankers, resume files) goes through
`safe_torch_load`: torch's weights-only unpickler, which builds tensors and plain containers
(dict, list, tuple, str, int, float, bool, None) and refuses every other global, so a pickle
payload (`__reduce__` -> os.system, eval, ...) is never called. What we save is plain data for
that reason: configs, train args and metrics are dicts of Python scalars; optimiser state is
tensors and scalars. Importing this module does not import torch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from mmsearch.errors import CheckpointError

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)", re.IGNORECASE)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip(": ")


def safe_torch_load(path: str | os.PathLike, what: str = "checkpoint"):
    """torch.load(path, weights_only=True) on the CPU, with one-line CheckpointErrors:
    missing file, unreadable file, or a file that asks to run code (refused, nothing executed)."""
    import pickle
    import warnings

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with warnings.catch_warnings():  # "pickle protocol 4 detected" and friends: the errors below say enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's weights-only unpickler stops at the first global outside its allow-list, before calling it
        found = _GLOBAL.search(str(exc))
        if found:
            raise CheckpointError(
                f"refused {what} {path}: it asks to call or build '{found.group(1)}' when loaded, which mmsearch "
                f"files never do (possible code payload); nothing from it was run") from None
        operand = re.search(r"Unsupported operand \d+", str(exc))
        raise CheckpointError(f"cannot read {what} {path}: not a torch file of weights and plain data"
                              + (f" ({operand.group(0).lower()})" if operand else "")) from None
    except Exception as exc:  # torch raises many kinds for a truncated or foreign file
        raise CheckpointError(f"cannot read {what} {path}: {_first_line(exc)}") from None
