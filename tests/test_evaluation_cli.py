"""`mmsearch eval`, `synth` and `train` through the CLI: the documented JSON shape, -k and --split,
--save-embeddings checked against a naive full-matrix reference, ANN fidelity, --out, the Markdown
table, and one-line errors for a missing split or a malformed dataset."""
import hashlib
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mmsearch.cli import cli
from mmsearch.datasets.readers import load_dataset

METRICS = ["R@1", "R@5", "R@10", "mean_rank", "median_rank"]
# the README's documented shape, plus the three keys that say what was evaluated
TOP_LEVEL = {"text_to_image", "image_to_text", "n_images", "n_captions", "model", "dataset", "split", "ks"}


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def one_line_error(res, message):
    assert res.exit_code != 0
    assert message in res.output, res.output
    assert "Traceback" not in res.output and res.output.strip().count("\n") == 0, res.output


@pytest.fixture(scope="module")
def evaluated(synth_dir, tiny_checkpoint, tmp_path_factory):
    """One `eval --json --out --save-embeddings` run on the test split: (stdout report, out path, npz path)."""
    tmp = tmp_path_factory.mktemp("eval")
    out, npz = tmp / "reports" / "report.json", tmp / "emb" / "emb.npz"  # folders made on demand
    res = run("eval", synth_dir / "captions.csv", "--checkpoint", tiny_checkpoint, "--json", "--out", out,
              "--save-embeddings", npz)
    return json.loads(res.stdout), out, npz


def test_json_has_exactly_the_documented_shape(evaluated, synth_dir, tiny_checkpoint):
    report, _, _ = evaluated
    assert set(report) == TOP_LEVEL
    test = load_dataset(synth_dir / "captions.csv", split="test")
    assert (report["n_images"], report["n_captions"]) == (len(test.images), len(test.captions))
    assert report["split"] == "test" and report["ks"] == [1, 5, 10]
    for d in ("text_to_image", "image_to_text"):
        block = report[d]
        assert list(block) == METRICS
        assert all(isinstance(v, float) for v in block.values())
        assert 0 <= block["R@1"] <= block["R@5"] <= block["R@10"] <= 1
        assert 1 <= block["median_rank"] and 1 <= block["mean_rank"]
    m = report["model"]
    assert m["checkpoint"] == str(tiny_checkpoint) and m["arch"] == "mmsearch-tiny" and m["fingerprint"]


def test_out_writes_the_same_json(evaluated):
    report, out, _ = evaluated
    assert json.loads(out.read_text()) == report


def _naive_ranks(text_emb, image_emb, caption_image):
    """Rank of the first positive from the full score matrix, by a stable descending sort of each row."""
    scores = text_emb @ image_emb.T
    t2i = [1 + int(np.nonzero(np.argsort(-row, kind="stable") == own)[0][0])
           for row, own in zip(scores, caption_image)]
    i2t = [1 + int(np.nonzero(caption_image[np.argsort(-scores[:, i], kind="stable")] == i)[0][0])
           for i in range(len(image_emb))]
    return np.array(t2i), np.array(i2t)


def _naive_summary(ranks, ks=(1, 5, 10)):
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in ks}
    out.update(mean_rank=float(np.mean(ranks)), median_rank=float(np.median(ranks)))
    return out


def test_saved_embeddings_reproduce_the_report(evaluated, synth_dir):
    report, _, npz = evaluated
    z = np.load(npz)
    assert {"image_ids", "caption_ids", "caption_image", "image_emb", "text_emb"} <= set(z.files)
    test = load_dataset(synth_dir / "captions.csv", split="test")
    assert z["image_ids"].tolist() == test.images and len(z["caption_ids"]) == report["n_captions"]
    assert z["caption_image"].tolist() == test.caption_image.tolist()
    assert z["image_emb"].shape == (report["n_images"], 128) and z["text_emb"].shape == (report["n_captions"], 128)
    t2i, i2t = _naive_ranks(z["text_emb"], z["image_emb"], z["caption_image"])
    assert _naive_summary(t2i) == report["text_to_image"]
    assert _naive_summary(i2t) == report["image_to_text"]


def test_k_values_change_the_keys_and_split_picks_the_split(synth_dir, tiny_checkpoint):
    res = run("eval", synth_dir / "captions.csv", "--checkpoint", tiny_checkpoint, "--split", "val",
              "-k", "2", "-k", "20", "--json")
    report = json.loads(res.stdout)
    for d in ("text_to_image", "image_to_text"):
        assert list(report[d]) == ["R@2", "R@20", "mean_rank", "median_rank"]
    val = load_dataset(synth_dir / "captions.csv", split="val")
    assert report["split"] == "val" and report["ks"] == [2, 20]
    assert (report["n_images"], report["n_captions"]) == (len(val.images), len(val.captions))


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat"])
def test_factory_reports_ann_fidelity(synth_dir, tiny_checkpoint, evaluated, factory):
    res = run("eval", synth_dir / "captions.csv", "--checkpoint", tiny_checkpoint, "--factory", factory, "--json")
    report = json.loads(res.stdout)
    ann = report.pop("ann")
    assert report == evaluated[0]  # the exact metrics do not depend on the ANN index
    assert ann["factory"] == factory and ann["k"] == 10
    overlaps = [ann["text_to_image_overlap@10"], ann["image_to_text_overlap@10"]]
    assert all(0.0 <= v <= 1.0 for v in overlaps)
    if factory == "Flat":
        assert overlaps == [1.0, 1.0]


def test_flat_fidelity_is_one_when_k_exceeds_the_candidates(synth_dir, tiny_checkpoint, evaluated):
    k = evaluated[0]["n_captions"] + 5  # more than every image and every caption of the split
    res = run("eval", synth_dir / "captions.csv", "--checkpoint", tiny_checkpoint, "--factory", "Flat",
              "-k", k, "--json")
    ann = json.loads(res.stdout)["ann"]
    assert ann[f"text_to_image_overlap@{k}"] == 1.0 and ann[f"image_to_text_overlap@{k}"] == 1.0


def test_terminal_default_is_a_markdown_table(synth_dir, tiny_checkpoint, evaluated):
    report = evaluated[0]
    out = run("eval", synth_dir / "captions.csv", "--checkpoint", tiny_checkpoint).stdout
    rows = []
    for d, label in (("text_to_image", "text→image"), ("image_to_text", "image→text")):
        b = report[d]
        rows.append(f"| {label} | {100 * b['R@1']:.1f} | {100 * b['R@5']:.1f} | {100 * b['R@10']:.1f} | "
                    f"{b['mean_rank']:.2f} | {b['median_rank']:.2f} |")
    assert out.splitlines() == [
        f"{report['n_images']} images, {report['n_captions']} captions (test split)", "",
        "| direction | R@1 | R@5 | R@10 | mean_rank | median_rank |", "|---|---|---|---|---|---|", *rows]


@pytest.mark.parametrize("name,content,message", [
    ("bad.json", "{broken", "not valid JSON"),
    ("bad.json", '{"foo": 1}', "neither COCO"),
    ("bad.csv", "foo,bar\n1,2\n", "no image column"),
    ("bad.jsonl", '{"image": "a.png", "caption": "x"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
    ("bad.xml", "<a/>", "unknown dataset format"),
])
def test_malformed_dataset_is_a_one_line_error(tmp_path, tiny_checkpoint, name, content, message):
    (tmp_path / name).write_text(content)
    one_line_error(run("eval", tmp_path / name, "--checkpoint", tiny_checkpoint, ok=False), message)


def test_missing_split_and_missing_checkpoint_are_one_line_errors(synth_dir, tiny_checkpoint, tmp_path):
    res = run("eval", synth_dir / "captions.csv", "--checkpoint", tiny_checkpoint, "--split", "nope", ok=False)
    one_line_error(res, "no rows in split 'nope' (splits: test, train, val)")
    res = run("eval", synth_dir / "captions.csv", "--checkpoint", tmp_path / "missing.pt", ok=False)
    one_line_error(res, "not found")


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def test_synth_cli_is_deterministic_per_seed(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        res = run("synth", tmp_path / name, "--n", 20, "--seed", seed)
        assert json.loads(res.stdout)
    a, b, c = (tmp_path / n for n in "abc")
    assert len(list((a / "images").glob("*.png"))) == 20
    assert _digest(a) == _digest(b) != _digest(c)


def test_train_cli_writes_a_checkpoint_that_index_and_info_accept(synth_dir, tmp_path):
    ckpt = tmp_path / "cli.pt"
    res = run("train", synth_dir / "captions.csv", "--steps", 5, "--batch-size", 16, "--out", ckpt)
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["checkpoint"] == str(ckpt) and summary["steps"] == 5 and ckpt.is_file()
    assert "step 5/5" in res.stdout and "val t->i R@1" in res.stdout
    test = load_dataset(synth_dir / "captions.csv", split="test")
    idx = tmp_path / "idx"
    run("index", *test.images[:8], "--index", idx, "--checkpoint", ckpt)
    info = json.loads(run("info", "--index", idx, "--json").stdout)
    assert info["images"] == 8 and info["model"]["checkpoint"] == str(ckpt)
