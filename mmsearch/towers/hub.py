"""Building an open_clip model and its tokenizer, and the one-line errors when weights or hub files are missing.

open_clip and huggingface_hub report failures as tracebacks and log lines; users get one typed error
that says what failed, why in a few words, and what to use instead.

Offline is decided at once (`hub_access`): the Hugging Face cache is checked first; when all a model
needs is there, huggingface_hub's own offline switch is on for the build (no etag checks, so no network
and no retries); when something is missing, one short probe of the hub with no retries decides, instead
of huggingface_hub's ~46 s of backoff and its 44 warning lines. Its loggers are silenced around our calls.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Optional

import open_clip
import torch

from mmsearch.errors import MissingExtraError, UnknownModelError, WeightsUnavailableError
from mmsearch.towers.models import hub_files, weights_cached, weights_on_hub

HUB_PROBE_TIMEOUT_S = 3.0  # one HEAD request: a reachable hub answers in well under a second
# the loggers of the libraries we call: retries, deprecations and random-weight notices; we raise instead
HUB_LOGGERS = ("", "huggingface_hub", "transformers", "open_clip", "timm")


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """The root logger and the hub libraries' loggers at CRITICAL for the length of one call."""
    loggers = [logging.getLogger(name) for name in HUB_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub's offline switch (what HF_HUB_OFFLINE=1 sets; transformers reads the same one) on
    for the length of one call, then back as it was."""
    from huggingface_hub import constants

    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = was


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the hub's endpoint (HF_ENDPOINT), no retries: False offline, when the hub is down
    (5xx), or when HF_HUB_OFFLINE is set."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        with quiet_hub():
            return get_session().head(constants.ENDPOINT, timeout=timeout).status_code < 500
    except Exception:  # DNS, refused, timeout, TLS, proxy: all mean "not now"
        return False


@contextlib.contextmanager
def hub_access(arch: str, cfg: dict, pretrained: Optional[str]) -> Iterator[None]:
    """Around building `arch`'s tokenizer and model: offline and quiet when everything it fetches from the
    hub is cached; one probe when not, and a one-line WeightsUnavailableError at once if the hub cannot
    be reached (tokenizer, then text-tower config, then weights: the order they are built in)."""
    missing = [(what, repo) for what, repo, cached in hub_files(cfg) if not cached]
    weights_missing = bool(pretrained) and weights_on_hub(arch, pretrained) and not weights_cached(arch, pretrained)
    if not missing and not weights_missing:
        with quiet_hub(), hub_offline():
            yield
        return
    if not hub_reachable():
        if missing:
            raise hub_files_error(arch, *missing[0])
        raise weights_error(arch, pretrained, ConnectionError("the hub cannot be reached"))
    with quiet_hub():
        yield


def is_local_file(tag: Optional[str]) -> bool:
    return bool(tag) and Path(tag).is_file()


def create_model(arch: str, pretrained: Optional[str]):
    # Random weights are seeded, so `--pretrained none` means the same model in every process
    # (an index built with it can be searched and extended later).
    # open_clip and huggingface_hub log warnings and errors (random weights, download retries) to
    # the root logger; the library reports through typed errors instead, and the CLI prints once
    with quiet_hub(), torch.random.fork_rng():
        torch.manual_seed(0)
        # random means random: no Hugging Face text-tower weights download behind `--pretrained none`
        extra = {} if pretrained else {"pretrained_hf": False}
        return open_clip.create_model_and_transforms(arch, pretrained=pretrained, device="cpu", **extra)


def weights_error(arch: str, pretrained: str, exc: Exception) -> WeightsUnavailableError:
    """One line: what failed, why in a few words, and what to use instead."""
    alternatives = ("Alternatives: --pretrained /path/to/weights.bin (a local file open_clip accepts), "
                    "or --checkpoint FILE (a model trained by `mmsearch train`).")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not is_local_file(pretrained) and pretrained not in tags:
        known = ", ".join(tags) if tags else "none"
        return WeightsUnavailableError(f"unknown pretrained tag '{pretrained}' for model {arch} (known tags: "
                                       f"{known}). {alternatives}")
    text = " ".join(str(exc).split())
    offline = any(w in text.lower() for w in ("connection", "internet", "resolve", "network", "hub"))
    why = "no network connection, or the hub is unreachable" if offline else (text[:160] or type(exc).__name__)
    return WeightsUnavailableError(f"cannot download pretrained weights '{pretrained}' for model {arch} ({why}). "
                                   f"{alternatives}")


def hub_unreachable(exc: Exception) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return isinstance(exc, OSError) or any(w in text for w in ("huggingface", "hub", "connect", "offline", "internet"))


def hub_files_error(arch: str, what: str, repo: str) -> WeightsUnavailableError:
    """The one line for hub files (a tokenizer, a text-tower config) missing from the cache while offline."""
    from huggingface_hub import constants

    return WeightsUnavailableError(
        f"model {arch}: its {what} '{repo}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the hub "
        f"cannot be reached. Run once with a network to fill the cache; offline it then works (HF_HUB_OFFLINE=1).")


def build_tokenizer(arch: str, cfg: dict):
    """open_clip's tokenizer for `arch`; hub files missing offline become one line, not a traceback."""
    try:
        with quiet_hub():
            return open_clip.get_tokenizer(arch)
    except ImportError as exc:  # a tokenizer package the requirement table does not know about
        raise MissingExtraError(f"model {arch}: its tokenizer needs '{exc.name or exc}', which is not installed: "
                                f"pip install 'mmsearch[siglip]'") from exc
    except Exception as exc:
        repo = cfg.get("text_cfg", {}).get("hf_tokenizer_name")
        if repo and hub_unreachable(exc):
            raise hub_files_error(arch, "tokenizer", repo) from exc
        raise UnknownModelError(f"model {arch}: cannot build its tokenizer ({type(exc).__name__}: "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from exc


def build_error(arch: str, cfg: dict, exc: Exception):
    """Random-weight builds fail for two reasons worth a sentence: a text tower whose config lives on the
    hub (multilingual models), or an architecture this open_clip/timm cannot build."""
    repo = cfg.get("text_cfg", {}).get("hf_model_name")
    if repo and hub_unreachable(exc):
        return hub_files_error(arch, "text tower config", repo)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return UnknownModelError(f"model {arch} cannot be built here ({type(exc).__name__}: {first[:200]})")
