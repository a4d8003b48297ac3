"""Near-duplicate groups from the image index equal a brute-force reference."""
import numpy as np
import pytest

from mmsearch.search.dupes import brute_force_groups, find_duplicates
from helpers import SYNTH_DIM, mixture_vectors, synthetic_store

# ---- near-duplicates --------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8", "IVF16,Flat"])
def test_dupes_equal_brute_force(tmp_path, factory):
    rng = np.random.default_rng(3)
    mix, x = mixture_vectors(1500, seed=3)
    # plant groups: copies with small noise (cosine ~0.99), chains and singles
    src = rng.choice(len(x), 60, replace=False)
    copies = []
    for j, s in enumerate(src):
        for _ in range(1 + j % 3):
            c = x[s] + rng.standard_normal(SYNTH_DIM).astype(np.float32) * 0.01
            copies.append(c / np.linalg.norm(c))
    allv = np.concatenate([x, np.stack(copies)])
    store = synthetic_store(tmp_path, allv)
    store.reindex(factory)
    got = find_duplicates(store, threshold=0.97)
    ref = brute_force_groups(np.arange(1, len(allv) + 1), allv, 0.97)
    assert [g["ids"] for g in got] == ref
    assert len(ref) >= 60 and all(g["min_score"] >= 0.97 for g in got)

