"""The FAISS cache against a naive numpy reference: exact search, id filters, removal, persistence."""
import numpy as np
import pytest

from mmsearch.errors import VectorIndexError
from mmsearch.storage.vectors import VectorIndex


def _data(n=400, d=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.arange(10, 10 + n, dtype=np.int64) * 3, x  # ids that are not positions


def _brute(x, ids, q, k, allowed=None):
    s = x @ q
    order = [j for j in np.argsort(-s, kind="stable") if allowed is None or ids[j] in allowed]
    return ids[order[:k]], s[order[:k]]


def test_flat_equals_brute_force():
    ids, x = _data()
    v = VectorIndex.build("Flat", x.shape[1], ids, x)
    for q in x[:5]:
        s, i = v.search(q, 10)
        ref_i, ref_s = _brute(x, ids, q, 10)
        assert list(i[0]) == list(ref_i)
        np.testing.assert_allclose(s[0], ref_s, rtol=1e-5, atol=1e-5)


# PQ4x4: 16 centroids a sub-space. PQ4's 256 trained on these 400 points took 5-10 s on 2 cores
# (FAISS splitting empty clusters); the code path searched is the same.
@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat", "PQ4x4"])
def test_filtered_search_returns_k_allowed_hits(factory):
    ids, x = _data()
    v = VectorIndex.build(factory, x.shape[1], ids, x)
    allowed = ids[::9]
    s, i = v.search(x[3], 10, allowed_ids=allowed)
    got = [j for j in i[0] if j >= 0]
    assert set(got) <= set(allowed.tolist())
    assert len(got) == 10
    if factory == "Flat":
        assert got == list(_brute(x, ids, x[3], 10, set(allowed.tolist()))[0])


def test_remove_then_search_never_returns_removed():
    ids, x = _data()
    v = VectorIndex.build("Flat", x.shape[1], ids, x)
    assert v.remove(ids[:50])
    assert v.ntotal == len(ids) - 50
    _, i = v.search(x[:50], 5)
    assert not set(i.ravel()) & set(ids[:50].tolist())


def test_hnsw_reports_it_cannot_remove():
    ids, x = _data()
    v = VectorIndex.build("HNSW16", x.shape[1], ids, x)
    assert v.remove(ids[:3]) is False


def test_save_load_checks_generation(tmp_path):
    ids, x = _data()
    v = VectorIndex.build("Flat", x.shape[1], ids, x)
    v.save(tmp_path / "v.faiss", generation=7)
    assert VectorIndex.load(tmp_path / "v.faiss", generation=8) is None
    w = VectorIndex.load(tmp_path / "v.faiss", generation=7)
    assert w.ntotal == len(ids)
    assert list(w.search(x[0], 3)[1][0]) == list(v.search(x[0], 3)[1][0])
    (tmp_path / "v.faiss").write_bytes(b"garbage")
    assert VectorIndex.load(tmp_path / "v.faiss", generation=7) is None


def test_bad_factory_and_untrainable_ivf_are_typed_errors():
    ids, x = _data(n=20)
    with pytest.raises(VectorIndexError, match="bad FAISS factory"):
        VectorIndex.build("NotAnIndex42", x.shape[1], ids, x)
    with pytest.raises(VectorIndexError, match="needs at least 1024 vectors"):
        VectorIndex.build("IVF1024,Flat", x.shape[1], ids, x)
