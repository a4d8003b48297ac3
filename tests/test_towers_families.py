"""Every open_clip family a user would pick, end to end with random weights and offline: index, text
query, image query, eval. Families whose tokenizer or text-tower config comes from the Hugging Face hub
run against a locally built stand-in in the hub's cache layout (tests/helpers.py) with HF_HUB_OFFLINE.
A missing extra, or hub files missing offline, is one line naming what to do."""
import os
import shutil
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import mmsearch.towers.encoder as encoder_mod
from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.datasets.readers import load_dataset
from mmsearch.errors import MissingExtraError, UnknownModelError, WeightsUnavailableError
from mmsearch.evaluation.evaluate import evaluate
from mmsearch.indexing.pipeline import index_folders
from mmsearch.search.query import Searcher
from mmsearch.storage.store import IndexStore
from conftest import one_torch_thread
from helpers import build_hf_cache

# the smallest member of each family (random weights; building is most of the cost)
FAMILIES = ["RN50", "MobileCLIP-S1", "MobileCLIP2-S0", "ViT-B-16-SigLIP", "ViT-B-32-SigLIP2-256",
            "xlm-roberta-base-ViT-B-32", "nllb-clip-base"]
TORCH_TEXT = {"xlm-roberta-base-ViT-B-32", "nllb-clip-base"}  # Hugging Face text towers: no numpy port
N_IMAGES = 4
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def hf_offline(tmp_path_factory):
    """HF_HUB_CACHE -> the stand-in cache, and no network, for this module (and its subprocesses)."""
    import huggingface_hub.constants as hc

    cache = build_hf_cache(tmp_path_factory.mktemp("hf-hub"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hc, "HF_HUB_CACHE", str(cache))
        mp.setattr(hc, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_HUB_CACHE", str(cache))
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield cache


@pytest.fixture(scope="module")
def small_set(synth_dir, tmp_path_factory):
    """N_IMAGES synthetic images in a folder, and the caption dataset restricted to them."""
    ds = load_dataset(synth_dir / "captions.csv", split="test")
    folder = tmp_path_factory.mktemp("family-images")
    for p in ds.images[:N_IMAGES]:
        shutil.copy(p, folder)
    keep = ds.caption_image < N_IMAGES
    ds.images = [str(folder / p.split("/")[-1]) for p in ds.images[:N_IMAGES]]
    ds.captions = [c for c, k in zip(ds.captions, keep) if k]
    ds.caption_image = ds.caption_image[keep]
    ds.negatives = [n for n, k in zip(ds.negatives, keep) if k]
    return folder, ds


@pytest.fixture
def one_build(monkeypatch):
    """Build each model once per test: the index, the searcher and eval all ask for the same encoder."""
    built = {}
    real = encoder_mod.load_encoder
    monkeypatch.setenv("MMSEARCH_CACHE_DIR", "off")  # a first index of each model: no shared tower cache

    def cached(spec, device="cpu"):
        if spec not in built:
            built[spec] = real(spec, device=device)
        return built[spec]

    monkeypatch.setattr(encoder_mod, "load_encoder", cached)
    return built


TRICKY = ["A RED Circle, left of a blue square!", "café déjà vu naïve", "fish &amp; chips", "red_circle",
          "   lots   of\tspaces\n", "x", "word " * 100]


@pytest.mark.parametrize("model", FAMILIES)
def test_family_end_to_end(model, hf_offline, small_set, one_build, tmp_path):
    folder, ds = small_set
    spec = ModelSpec(model=model, pretrained=None)
    with one_torch_thread():
        _end_to_end(model, spec, folder, ds, one_build, tmp_path)


def _end_to_end(model, spec, folder, ds, one_build, tmp_path):
    summary = index_folders(tmp_path / "idx", [folder], spec=spec, batch_size=N_IMAGES)
    assert summary.added == N_IMAGES and summary.failed == 0
    enc = one_build[spec]
    store = IndexStore.open(tmp_path / "idx")
    assert store.dim == enc.dim and store.meta["text_width"] == enc.text_width
    searcher = Searcher(store)
    path = "torch" if model in TORCH_TEXT else "numpy"
    assert store.meta["text_path"]["path"] == path
    assert type(store.text_encoder()).__name__ == ("Encoder" if path == "torch" else "FastText")
    assert bool(store.notices) == (path == "torch")  # the one-line notice the CLI prints
    if path == "numpy":  # the torch-free tokenizer gives open_clip's ids, padding aside
        tok = store.text_encoder().tower.tokenizer
        for text, row in zip(TRICKY, enc.tokenize(TRICKY).tolist()):
            ids = tok.encode(text)
            assert ids == row[:len(ids)] and set(row[len(ids):]) <= {enc._pad_id}, text

    # text query (numpy or torch) == the naive reference: the torch encoder's text embedding against every stored image
    query = ds.captions[0]
    hits = searcher.search(query, k=N_IMAGES)
    ids, emb = store.catalog.embeddings(store.dim)
    ref = emb @ enc.encode_texts([query])[0]
    rows = store.catalog.rows(ids)
    by_path = {rows[int(i)]["path"]: float(s) for i, s in zip(ids, ref)}
    assert sorted(h.path for h in hits) == sorted(by_path)
    for h in hits:
        assert h.score == pytest.approx(by_path[h.path], abs=2e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    # image query == its stored embedding against every image: itself at cosine 1, on top (random
    # towers map images close together, so another image may tie with it)
    hits = searcher.search(images=[ds.images[1]], k=N_IMAGES)
    own = {rows[int(i)]["path"]: e for i, e in zip(ids, emb)}[ds.images[1]]
    for h in hits:
        assert h.score == pytest.approx(float(own @ {rows[int(i)]["path"]: e for i, e in zip(ids, emb)}[h.path]),
                                        abs=2e-4)
    mine = next(h for h in hits if h.path == ds.images[1])
    assert mine.score == pytest.approx(1.0, abs=1e-4) and mine.score >= hits[0].score - 1e-5

    # the re-ranker's image tokens need open_clip's own ViT tower: other towers say so in one line
    if not hasattr(enc.model.visual, "_embeds"):
        from mmsearch.media import load_image

        with pytest.raises(UnknownModelError, match="re-ranker's image tokens"):
            enc.encode_images([load_image(ds.images[0])], token_grid=4)

    # eval: both directions, ranks over the 4 images
    report = evaluate(enc, ds, ks=(1, 5))
    assert report["n_images"] == N_IMAGES and 0 <= report["text_to_image"]["R@1"] <= 1
    assert report["text_to_image"]["R@5"] == 1.0  # 4 candidates: every caption's image is within 5


def _hide(monkeypatch, module):
    """Make `module` (and its submodules) unimportable, as on a machine without it."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("model, extra", [("ViT-B-16-SigLIP", "siglip"), ("ViT-B-16-SigLIP2", "siglip"),
                                          ("xlm-roberta-base-ViT-B-32", "multilingual"),
                                          ("nllb-clip-base-siglip", "multilingual")])
def test_missing_extra_is_one_line(model, extra, monkeypatch, tmp_path):
    _hide(monkeypatch, "transformers")
    monkeypatch.setenv("MMSEARCH_CACHE_DIR", "off")  # a first-time user: no tower cache of an earlier index
    with pytest.raises(MissingExtraError, match=rf"pip install 'mmsearch\[{extra}\]'"):
        encoder_mod.load_encoder(ModelSpec(model=model, pretrained=None))
    res = CliRunner().invoke(cli, ["index", str(tmp_path), "--index", str(tmp_path / "i"), "--model", model,
                                   "--pretrained", "none"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.splitlines()[-1].startswith(f"Error: model {model} needs its Hugging Face")
    assert f"mmsearch[{extra}]" in res.output.splitlines()[-1]


def test_hub_files_missing_offline_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    for model, what in (("ViT-B-16-SigLIP", "tokenizer 'timm/ViT-B-16-SigLIP'"),
                        ("xlm-roberta-base-ViT-B-32", "tokenizer 'xlm-roberta-base'")):
        with pytest.raises(WeightsUnavailableError) as exc_info:
            encoder_mod.load_encoder(ModelSpec(model=model, pretrained=None))
        msg = str(exc_info.value)
        assert what in msg and "HF_HUB_OFFLINE=1" in msg and "\n" not in msg


def test_fresh_process_without_transformers_prints_one_line(tmp_path):
    """The user's situation: transformers absent when open_clip is first imported (not just hidden later)."""
    import subprocess

    code = ("import sys; sys.modules['transformers'] = None\n"
            "from mmsearch.cli import main\n"
            f"sys.argv = ['mmsearch', 'index', {str(tmp_path)!r}, '--index', {str(tmp_path / 'i')!r}, "
            "'--model', 'ViT-B-16-SigLIP', '--pretrained', 'none']\n"
            "main()\n")
    env = dict(os.environ, MMSEARCH_CACHE_DIR="off")  # a first-time user: no tower cache of an earlier index
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "Error: model ViT-B-16-SigLIP needs its Hugging Face tokenizer (timm/ViT-B-16-SigLIP), and 'transformers' "
        "is not installed: pip install 'mmsearch[siglip]'")
