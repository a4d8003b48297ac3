"""Every caption-dataset format, malformed files, split selection, and the synthetic generator."""
import csv
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmsearch.datasets.readers import load_dataset, synthesize
from mmsearch.errors import DatasetError


@pytest.fixture()
def imgs(tmp_path):
    d = tmp_path / "pics"
    d.mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 60, 0, 0)).save(d / f"{i}.png")
    (d / "bad.png").write_text("not an image")
    return d


def test_csv_several_rows_per_image_split_and_bad_rows(imgs, tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("image,caption,split\npics/0.png,a zero,train\npics/0.png,another zero,train\n"
                 "pics/1.png,a one,test\npics/missing.png,gone,train\npics/bad.png,broken,train\n"
                 "pics/2.png,,train\n")
    ds = load_dataset(f, split="train")
    assert ds.captions == ["a zero", "another zero"] and list(ds.caption_image) == [0, 0]
    assert any(":5: image not found" in s for s in ds.skipped)
    assert any(":6: unreadable image" in s for s in ds.skipped)
    assert any(":7: empty caption" in s for s in ds.skipped)
    assert load_dataset(f, split="test").captions == ["a one"]
    with pytest.raises(DatasetError, match="splits: test, train"):
        load_dataset(f, split="val")


def test_tsv_and_images_root(imgs, tmp_path):
    f = tmp_path / "elsewhere" / "data.tsv"
    f.parent.mkdir()
    f.write_text("filepath\ttitle\n0.png\tzero\n1.png\tone\n")
    ds = load_dataset(f, images_root=imgs)
    assert ds.images == [str(imgs / "0.png"), str(imgs / "1.png")]


def test_jsonl_single_and_multi_caption_and_bad_line(imgs, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"image": "pics/0.png", "caption": "zero"}) + "\n\n"
                 + json.dumps({"image": "pics/1.png", "captions": ["one", "uno"]}) + "\n")
    ds = load_dataset(f)
    assert ds.captions == ["zero", "one", "uno"] and list(ds.caption_image) == [0, 1, 1]
    f.write_text(json.dumps({"image": "pics/0.png", "caption": "zero"}) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"d.jsonl:2: not valid JSON"):
        load_dataset(f)


def test_coco_captions_json(imgs, tmp_path):
    f = tmp_path / "captions.json"
    f.write_text(json.dumps({"images": [{"id": 7, "file_name": "pics/2.png"}, {"id": 8, "file_name": "pics/3.png"}],
                             "annotations": [{"image_id": 7, "caption": "two"}, {"image_id": 8, "caption": "three"},
                                             {"image_id": 7, "caption": "deux"}, {"image_id": 99, "caption": "x"}]}))
    ds = load_dataset(f)
    assert ds.captions == ["two", "three", "deux"] and list(ds.caption_image) == [0, 1, 0]
    assert any(":4: no image" in s for s in ds.skipped)


def test_karpathy_json_with_splits_and_restval(imgs, tmp_path):
    f = tmp_path / "dataset_flickr30k.json"
    f.write_text(json.dumps({"images": [
        {"filename": "0.png", "filepath": "pics", "split": "train", "sentences": [{"raw": "zero"}]},
        {"filename": "1.png", "filepath": "pics", "split": "restval", "sentences": [{"raw": "one"}]},
        {"filename": "2.png", "filepath": "pics", "split": "test", "sentences": [{"raw": "two"}, {"raw": "dos"}]}]}))
    assert load_dataset(f, split="test").captions == ["two", "dos"]
    assert load_dataset(f, split="train").captions == ["zero", "one"]


def test_folder_with_sidecar_txt(imgs):
    (imgs / "0.txt").write_text("zero\n\nnada\n")
    (imgs / "1.txt").write_text("one\n")
    ds = load_dataset(imgs)
    assert ds.captions == ["zero", "nada", "one"]


@pytest.mark.parametrize("name,content,message", [
    ("x.xml", "<a/>", "unknown dataset format"),
    ("x.json", "{\"foo\": 1}", "neither COCO"),
    ("x.json", "{broken", "not valid JSON"),
    ("x.csv", "image,caption\n", "no usable"),
    ("x.csv", "foo,bar\n1,2\n", "no image column"),
    ("x.csv", "image,caption\nnope.png,hello\n", "no usable"),
])
def test_malformed_files_give_clear_errors(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(f)


def _digest(folder):
    h = hashlib.sha256((folder / "captions.csv").read_bytes())
    for p in sorted((folder / "images").glob("*.png")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_synth_is_deterministic_and_seed_dependent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    synthesize(a, n=120, seed=5)
    synthesize(b, n=120, seed=5)
    synthesize(c, n=120, seed=6)
    assert _digest(a) == _digest(b) != _digest(c)


def test_synth_swap_pairs_share_split_and_describe_each_other(synth_dir):
    rows = list(csv.DictReader(open(synth_dir / "captions.csv")))
    owner = {r["caption"]: r for r in rows}
    with_neg = [r for r in rows if r["negative"]]
    assert len(with_neg) > len(rows) / 4
    for r in with_neg:
        sibling = owner[r["negative"]]  # the swapped caption describes another image of the same split
        assert sibling["image"] != r["image"] and sibling["split"] == r["split"]
        assert sorted(r["caption"].split()) == sorted(r["negative"].split())  # same words, different scene


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_synth_relational_share_sets_how_many_scenes_are_swap_pairs(tmp_path, share):
    synthesize(tmp_path, n=100, seed=3, relational=share)
    rows = list(csv.DictReader(open(tmp_path / "captions.csv")))
    in_pairs = {r["image"] for r in rows if r["negative"]}
    assert len({r["image"] for r in rows}) == 100
    assert len(in_pairs) == 100 * share


def test_synth_rejects_a_share_outside_0_1(tmp_path):
    with pytest.raises(DatasetError, match="relational"):
        synthesize(tmp_path, n=10, relational=1.5)
    assert not (tmp_path / "captions.csv").exists()


def test_synth_test_captions_identify_one_image(synth_dir):
    ds = load_dataset(synth_dir / "captions.csv", split="test")
    assert len(ds.images) >= 40
    owners = {}
    for c, i in zip(ds.captions, ds.caption_image):
        owners.setdefault(c, set()).add(int(i))
    assert all(len(v) == 1 for v in owners.values())
    assert Counter(load_dataset(synth_dir / "captions.csv").caption_image).most_common(1)[0][1] <= 3
