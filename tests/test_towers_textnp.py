"""The numpy text tower equals open_clip's tokenizer and torch text tower, and never imports torch."""
import subprocess
import sys

import numpy as np
import pytest

from mmsearch.config import ModelSpec
from mmsearch.towers.encoder import load_encoder
from mmsearch.errors import CheckpointError
from mmsearch.towers.textnp import NumpyTextTower, export_text_tower

TEXTS = ["a dog on a beach", "A RED Circle, left of a blue square!", "2:dog + beach - people",
         "café déjà vu naïve", "fish &amp; chips", "emoji 🐶🏖️ time", "numbers 12345 and 3.14",
         "don't won't it's", "   lots   of\tspaces\n", "x", "word " * 100]


@pytest.fixture(scope="module", params=["mmsearch-tiny", "ViT-B-32"])
def exported(request, tmp_path_factory):
    enc = load_encoder(ModelSpec(model=request.param, pretrained=None))
    d = tmp_path_factory.mktemp(request.param)
    export_text_tower(enc, d)
    return enc, NumpyTextTower.load(d), d


def test_token_ids_equal_open_clip(exported):
    enc, tower, _ = exported
    ref = enc.tokenize(TEXTS).numpy()
    for text, row in zip(TEXTS, ref):
        ids = tower.tokenizer.encode(text)
        assert ids == [int(t) for t in row[: len(ids)]] and not row[len(ids):].any(), text


def test_embeddings_and_states_equal_torch(exported):
    enc, tower, _ = exported
    ref_emb, ref_states = enc.encode_texts(TEXTS, return_states=True)
    emb, states = tower.encode(TEXTS)
    assert np.abs(emb - ref_emb).max() < 1e-4
    for a, b in zip(states, ref_states):
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-4


def test_forward_stays_float32(exported):
    # states are returned as computed (no cast): a float64 scalar anywhere promotes them, and every
    # layer after it would cast its weight matrices to float64 (3x the time of a query)
    _, tower, _ = exported
    emb, states = tower.encode(TEXTS)
    assert emb.dtype == np.float32 and all(s.dtype == np.float32 for s in states)


def test_fresh_process_does_not_import_torch(exported):
    _, _, d = exported
    code = ("import sys; from mmsearch.towers.textnp import NumpyTextTower; "
            f"NumpyTextTower.load({str(d)!r}).encode(['a dog']); "
            "print('torch' in sys.modules, 'open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_missing_or_damaged_tower_is_a_typed_error(tmp_path, exported):
    with pytest.raises(CheckpointError):
        NumpyTextTower.load(tmp_path)
    _, _, d = exported
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "text_tower" / "weights.f32").write_bytes(b"junk")
    with pytest.raises(CheckpointError):
        NumpyTextTower.load(broken).encode(["a dog"])


def test_ascii_words_with_re_equal_open_clips_regex_pattern():
    """The stdlib `re` pattern used on printable ASCII (a query then never imports `regex`) splits every
    printable ASCII string into the same words as open_clip's `regex` pattern."""
    import random
    import re
    import string

    import regex

    from mmsearch.towers.texttokens import BPETokenizer

    ours = re.compile(BPETokenizer.ASCII_PATTERN, re.IGNORECASE | re.ASCII)
    theirs = regex.compile(BPETokenizer.PATTERN, regex.IGNORECASE)
    rng = random.Random(0)
    alphabet = string.printable[:95]  # the printable ASCII characters, space included
    samples = ["<start_of_text>it's <end_of_text>", "don't'll 've'RE 3.14e-5 a_b-c", "''s'''t"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(3000)]
    for s in samples:
        assert s.isascii() and s.isprintable()
        assert ours.findall(s) == theirs.findall(s), s
    tok = BPETokenizer(["h e", "l l", "he ll"], 16)
    assert tok.words("hello, world") == theirs.findall("hello, world") and tok._pat is None
    assert tok.words("café") == ["café"] and tok._pat is not None  # non-ASCII: open_clip's own pattern


def test_ids_by_merge_rank_equal_open_clips_encoder_dict():
    """A merged symbol's id taken from its merge's rank (no 49k-entry dict) is open_clip's id, over
    open_clip's own vocabulary: every merged symbol spelled as a word, plus mixed text."""
    from open_clip.tokenizer import SimpleTokenizer

    from mmsearch.towers.texttokens import BPETokenizer, ids_by_rank_hold, open_clip_merges

    merges = open_clip_merges()
    assert ids_by_rank_hold(merges)
    by_rank, by_dict, ref = BPETokenizer(merges, 77, True), BPETokenizer(merges, 77, False), SimpleTokenizer()
    words = [m.replace(" ", "").replace("</w>", "") for m in merges[::37]]
    texts = TEXTS + [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)]
    for t in texts:
        ours = by_rank.encode(t)
        assert ours == by_dict.encode(t) and ours[1:-1] == ref.encode(t)[:len(ours) - 2], t
    assert by_rank.encoder is None and by_dict.encoder is not None
    assert not ids_by_rank_hold(["a b", "ab c", "a bc"])  # "abc" twice: ids must come from the dict
