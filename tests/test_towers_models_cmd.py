"""`mmsearch models`: what open_clip knows, published recall from the shipped table, the extra each family
needs, and whether weights are in open_clip's / the hub's cache."""
import json
import sys

import pytest
from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.towers.models import list_models, published_recall


def _rows(*args):
    res = CliRunner().invoke(cli, ["models", "--json", *args])
    assert res.exit_code == 0, res.output
    return {(r["model"], r["pretrained"]): r for r in map(json.loads, res.output.splitlines())}


def test_published_recall_the_issue_quotes():
    rows = _rows("--published")
    for key, r1 in ((("ViT-B-32", "laion2b_s34b_b79k"), 66.8), (("ViT-B-16-SigLIP", "webli"), 74.7),
                    (("ViT-SO400M-14-SigLIP-384", "webli"), 83.0)):
        assert rows[key]["flickr_t2i_r1"] == r1
    assert all(r["flickr_t2i_r1"] is not None for r in rows.values())
    # every row of the shipped table names a (model, tag) this open_clip knows, so none is silently dropped
    assert set(published_recall()) <= set(_rows())


def test_families_extras_dims_and_text_paths():
    rows = _rows()
    expect = {("ViT-B-32", "laion2b_s34b_b79k"): ("CLIP ViT", 512, None, "numpy"),
              ("RN50", "openai"): ("CLIP ResNet", 1024, None, "numpy"),
              ("MobileCLIP-S1", "datacompdr"): ("MobileCLIP", 512, None, "numpy"),
              ("MobileCLIP2-S0", "dfndr2b"): ("MobileCLIP 2", 512, None, "numpy"),
              ("ViT-B-16-SigLIP", "webli"): ("SigLIP", 768, "siglip", "numpy"),
              ("ViT-B-16-SigLIP2", "webli"): ("SigLIP 2", 768, "siglip", "numpy"),
              ("xlm-roberta-base-ViT-B-32", "laion5b_s13b_b90k"): ("multilingual (XLM-R)", 512, "multilingual", "torch"),
              ("nllb-clip-base", "v1"): ("multilingual (NLLB)", 512, "multilingual", "torch"),
              ("mmsearch-tiny", None): ("mmsearch", 128, None, "numpy")}
    for key, (fam, dim, extra, path) in expect.items():
        r = rows[key]
        assert (r["family"], r["embed_dim"], r["extra"], r["text_query_path"]) == (fam, dim, extra, path), key


def test_missing_extra_and_cached_weights_are_reported(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    snap = cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "open_clip_model.safetensors").write_bytes(b"x")
    (cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "refs").mkdir()
    (cache / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setitem(sys.modules, "transformers", None)
    rows = {(r["model"], r["pretrained"]): r for r in list_models("ViT-B-")}
    assert rows[("ViT-B-32", "laion2b_s34b_b79k")]["weights_cached"] is True
    assert rows[("ViT-B-32", "laion2b_s34b_b79k")]["runnable"] is True
    assert rows[("ViT-B-32", "laion2b_e16")]["weights_cached"] is False
    siglip = rows[("ViT-B-16-SigLIP", "webli")]
    assert siglip["extra_installed"] is False and siglip["runnable"] is False


def test_table_output():
    res = CliRunner().invoke(cli, ["models", "--filter", "MobileCLIP-S1"])
    assert res.exit_code == 0
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["model", "pretrained", "family", "dim"]
    assert lines[1].split()[:5] == ["MobileCLIP-S1", "datacompdr", "MobileCLIP", "512", "-"]
