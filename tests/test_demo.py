"""`mmsearch demo` end to end at a toy size: every stage runs, the index it leaves re-ranks, and the
report it prints holds plain and re-ranked recall. (`make demo` runs the full size.)"""
from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.storage.store import IndexStore
from conftest import one_torch_thread


def test_demo_trains_both_models_indexes_with_tokens_and_reports_plain_and_reranked_recall(tmp_path):
    out = tmp_path / "demo"
    with one_torch_thread():
        r = CliRunner().invoke(cli, ["demo", "--out", str(out), "--n", "200", "--steps", "12",
                                     "--reranker-steps", "12"])
    assert r.exit_code == 0, r.output
    for stage in range(1, 7):
        assert f"{stage}/6 " in r.output
    assert (out / "mmsearch-tiny.pt").is_file() and (out / "reranker.pt").is_file()

    store = IndexStore.open(out / "index", readonly=True)
    assert store.reranker_info() is not None
    assert store.catalog.count_images() > 0
    assert store.catalog.ids_missing_tokens() == []

    # each example query shows both rankings, one row per hit, with scores the ranking can produce
    lines = r.output.splitlines()
    rows = [lines[i + 1].split() for i, line in enumerate(lines) if "dual encoder (cosine)" in line]
    assert len(rows) == 4
    for row in rows:
        cosine, blended = float(row[1]), float(row[row.index("1.", 2) + 1])
        assert -1.0 <= cosine <= 1.0 and -1.0 <= blended <= 1.0
    report = r.output.split("6/6 ", 1)[1]
    assert "| text→image |" in report and "| text→image re-ranked |" in report
    assert "re-ranking top 32:" in report
