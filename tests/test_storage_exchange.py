"""Embeddings in and out in clip-retrieval's layout: a round trip gives identical results; a wrong model
or dimension is refused and changes nothing."""
import json

import numpy as np
import pytest

from mmsearch.errors import ModelMismatchError
from mmsearch.storage.store import IndexStore

# ---- export / import --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_index(tmp_path_factory, synth_dir):
    from mmsearch.config import ModelSpec
    from mmsearch.indexing.pipeline import index_folders

    idx = tmp_path_factory.mktemp("scale") / "idx"
    files = sorted((synth_dir / "images").glob("*.png"))[:150]  # a file list is a valid root list too
    index_folders(idx, files, spec=ModelSpec(model="mmsearch-tiny", pretrained=None))
    return idx


def test_export_import_round_trip_gives_identical_results(small_index, tmp_path):
    from click.testing import CliRunner

    from mmsearch.cli import cli

    r = CliRunner()
    out = r.invoke(cli, ["export", str(tmp_path / "emb"), "--index", str(small_index), "--shard-size", "60"])
    assert out.exit_code == 0, out.output
    assert "exported 150 embeddings (dim" in out.output and "in 3 shards" in out.output
    assert (tmp_path / "emb" / "img_emb" / "img_emb_2.npy").is_file()
    assert (tmp_path / "emb" / "metadata" / "metadata_2.parquet").is_file()
    res = r.invoke(cli, ["import", str(tmp_path / "emb"), "--index", str(tmp_path / "copy")])
    assert res.exit_code == 0, res.output
    assert "imported 150 embeddings from 3 shards; the index holds 150 images (Flat)" in res.output
    for q in (["a red circle"], ["blue square", "--under", str(small_index.parent)], ["green", "--ext", "png"]):
        a = r.invoke(cli, ["search", *q, "--index", str(small_index), "--json", "-k", "8"])
        b = r.invoke(cli, ["search", *q, "--index", str(tmp_path / "copy"), "--json", "-k", "8"])
        assert a.exit_code == 0 and a.output == b.output
    a = [json.loads(line) for line in r.invoke(cli, ["search", "a red circle", "--index", str(small_index),
                                                     "--json"]).output.splitlines()]
    assert len(a) == 10
    # importing again updates rows by path: nothing is duplicated
    res = r.invoke(cli, ["import", str(tmp_path / "emb"), "--index", str(tmp_path / "copy")])
    assert "the index holds 150 images" in res.output


def test_import_with_wrong_model_or_dimension_is_refused_and_changes_nothing(small_index, tmp_path):
    from mmsearch.storage.exchange import export_embeddings, import_embeddings, MODEL_RECORD

    store = IndexStore.open(small_index)
    export_embeddings(store, tmp_path / "emb", shard_size=1000)
    before = (store.catalog.count_images(), store.catalog.generation(),
              (small_index / "vectors.faiss").stat().st_mtime_ns)
    rec_path = tmp_path / "emb" / MODEL_RECORD
    rec = json.loads(rec_path.read_text())
    rec_path.write_text(json.dumps(dict(rec, fingerprint="0123456789abcdef")))
    with pytest.raises(ModelMismatchError, match="nothing was imported"):
        import_embeddings(store, tmp_path / "emb")
    other = "int8" if store.precision != "int8" else "fp32"  # a new index's precision follows the CPU
    rec_path.write_text(json.dumps(dict(rec, precision=other)))
    with pytest.raises(ModelMismatchError, match=f"holds {other} embeddings"):
        import_embeddings(store, tmp_path / "emb")
    rec_path.write_text(json.dumps(rec))
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", np.ones((150, 16), np.float32))
    with pytest.raises(ModelMismatchError, match="needs dim"):
        import_embeddings(store, tmp_path / "emb")
    rec_path.unlink()  # a clip-retrieval shard set: no record, and no model named to vouch for it
    with pytest.raises(ModelMismatchError, match="no mmsearch_model.json"):
        import_embeddings(store, tmp_path / "emb")
    after = IndexStore.open(small_index)
    assert (after.catalog.count_images(), after.catalog.generation(),
            (small_index / "vectors.faiss").stat().st_mtime_ns) == before
