"""Which open_clip models exist, what each family needs, and whether this installation can run it.

A family's needs beyond the core dependencies come in as an extra (`pip install 'mmsearch[siglip]'`).
`check_requirements` turns a missing one into a one-line MissingExtraError before anything slow
runs. Weights and tokenizers live in the caches open_clip and the Hugging Face hub already use
(~/.cache/huggingface/hub, ~/.cache/clip): a filled cache works offline with HF_HUB_OFFLINE=1.
Published recall comes from open_clip's retrieval table, shipped as data/retrieval_recall.json.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

from mmsearch.config import MODEL_CONFIG_DIR
from mmsearch.errors import MissingExtraError

RECALL_FILE = Path(__file__).parent / "data" / "retrieval_recall.json"
HF_EXTRA = {"tokenizer": "siglip", "text tower": "multilingual"}


def family(name: str, cfg: dict) -> str:
    """A short family name a user recognises from published tables."""
    t, v = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    low = name.lower()
    if "siglip2" in low:
        return "SigLIP 2"
    hf = t.get("hf_model_name", "").lower()
    if hf:
        return "multilingual (NLLB)" if "nllb" in hf else "multilingual (XLM-R)" if "xlm" in hf else \
            "multilingual (mT5)" if "mt5" in hf else "CLIP (RoBERTa text)"
    if "siglip" in low:
        return "SigLIP i18n" if "i18n" in low else "SigLIP"
    for prefix, fam in (("mobileclip2", "MobileCLIP 2"), ("mobileclip", "MobileCLIP"), ("coca", "CoCa"),
                        ("eva", "EVA-CLIP"), ("convnext", "ConvNeXt CLIP"), ("pe-core", "Perception Encoder"),
                        ("vitamin", "ViTamin"), ("rn", "CLIP ResNet")):
        if low.startswith(prefix):
            return fam
    if "clipa" in low:
        return "CLIPA"
    if "worldwide" in low:
        return "multilingual (worldwide)"
    if name.startswith("mmsearch"):
        return "mmsearch"
    return "CLIP ViT" if not v.get("timm_model_name") else "CLIP (timm tower)"


def requirements(cfg: dict) -> list[tuple[str, str, str]]:
    """(module, extra, what needs it) beyond the core dependencies, from an open_clip model config."""
    t = cfg.get("text_cfg", {})
    if t.get("hf_model_name"):
        return [("transformers", HF_EXTRA["text tower"], f"its Hugging Face text tower ({t['hf_model_name']})")]
    if t.get("hf_tokenizer_name"):
        return [("transformers", HF_EXTRA["tokenizer"], f"its Hugging Face tokenizer ({t['hf_tokenizer_name']})")]
    return []


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules (hidden) raises ValueError
        return False


def missing_extra(name: str, cfg: dict) -> Optional[MissingExtraError]:
    for module, extra, why in requirements(cfg):
        if not _importable(module):
            return MissingExtraError(f"model {name} needs {why}, and '{module}' is not installed: "
                                     f"pip install 'mmsearch[{extra}]'")
    return None


def check_requirements(name: str, cfg: dict) -> None:
    err = missing_extra(name, cfg)
    if err is not None:
        raise err


# ---- caches -------------------------------------------------------------------------------------
def hf_repo_cached(repo: str, filenames) -> bool:
    """Whether any of `filenames` of hub repo `repo` is in the Hugging Face cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for f in filenames:
        try:
            hit = try_to_load_from_cache(repo, f)
        except Exception:  # an odd repo id is simply "not cached"
            hit = None
        if isinstance(hit, str):
            return True
    return False


def weights_cached(name: str, tag: str) -> bool:
    """Whether open_clip would find `tag`'s weights without a download (its HF hub or URL cache)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if cfg.get("file"):
        return os.path.isfile(cfg["file"])
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"].rstrip("/")) if not cfg["hf_hub"].endswith("/") \
            else (cfg["hf_hub"].rstrip("/"), "")
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            names.insert(0, filename[:-4] + ".safetensors")
        if hf_repo_cached(repo, names):
            return True
    if cfg.get("url"):
        return os.path.isfile(os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"])))
    return False


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")


def hf_files_cached(cfg: dict) -> bool:
    """Whether the tokenizer / text-tower config a family fetches from the hub is cached (True if none)."""
    return all(cached for _, _, cached in hub_files(cfg))


def hub_files(cfg: dict) -> list[tuple[str, str, bool]]:
    """(what, hub repo, cached) for each file set a family's tokenizer and text tower fetch from the hub."""
    t = cfg.get("text_cfg", {})
    tok, model = t.get("hf_tokenizer_name"), t.get("hf_model_name")
    out = [("tokenizer", tok, hf_repo_cached(tok, TOKENIZER_FILES))] if tok else []
    return out + ([("text tower config", model, hf_repo_cached(model, ["config.json"]))] if model else [])


def weights_on_hub(name: str, tag: Optional[str]) -> bool:
    """Whether open_clip fetches `tag`'s weights from the Hugging Face hub (not a URL, not a local file)."""
    import open_clip

    if not tag or os.path.isfile(tag):
        return False
    return bool((open_clip.get_pretrained_cfg(name, tag) or {}).get("hf_hub"))


# ---- the table ----------------------------------------------------------------------------------
@functools.lru_cache()
def published_recall() -> dict:
    """{(model, tag): row} from open_clip's retrieval table (source in the file)."""
    doc = json.loads(RECALL_FILE.read_text())
    return {(r["model"], r["pretrained"]): r for r in doc["rows"]}


def recall_source() -> str:
    return json.loads(RECALL_FILE.read_text())["source"]


def list_models(name_filter: Optional[str] = None, check_cache: bool = True) -> list[dict]:
    """One row per (architecture, pretrained tag) open_clip knows (tag None: random weights only)."""
    import open_clip

    from mmsearch.towers.textnp import text_path_for_config

    register_model_configs()
    recall = published_recall()
    rows = []
    for name in open_clip.list_models():
        if name_filter and name_filter.lower() not in name.lower():
            continue
        cfg = open_clip.get_model_config(name) or {}
        missing = missing_extra(name, cfg)
        reqs = requirements(cfg)
        hf_ok = hf_files_cached(cfg) if check_cache else None
        base = {"model": name, "family": family(name, cfg), "embed_dim": cfg.get("embed_dim"),
                "extra": reqs[0][1] if reqs else None, "extra_installed": missing is None,
                "text_query_path": text_path_for_config(cfg)[0],
                "hub_files_cached": hf_ok}
        for tag in open_clip.list_pretrained_tags_by_model(name) or [None]:
            r = recall.get((name, tag), {})
            cached = weights_cached(name, tag) if (tag and check_cache) else None
            runnable = missing is None and (hf_ok is not False) and (tag is None or cached is not False)
            rows.append(dict(base, pretrained=tag, weights_cached=cached, runnable=runnable,
                             flickr_t2i_r1=r.get("flickr_t2i_r1"), flickr_i2t_r1=r.get("flickr_i2t_r1"),
                             coco_t2i_r1=r.get("coco_t2i_r1"), coco_i2t_r1=r.get("coco_i2t_r1")))
    return rows


_registered = False


def register_model_configs() -> None:
    """Make our shipped architectures (model_configs/*.json) known to open_clip, the way it finds its own."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
