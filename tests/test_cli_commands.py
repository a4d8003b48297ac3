"""The CLI through click's CliRunner: index, search output modes, info, errors, texts, help everywhere."""
import json
import subprocess
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from mmsearch.cli import cli, load_all
from mmsearch.cli.app import COMMAND_MODULES

TINY = ["--model", "mmsearch-tiny", "--pretrained", "none"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(2)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    (photos / "broken.jpg").write_text("this is not a jpeg")
    idx = root / "idx"
    res = CliRunner().invoke(cli, ["index", str(photos), "--index", str(idx), *TINY])
    assert res.exit_code == 0, res.output
    return idx, photos, res


def run(*args, ok=True):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if ok:
        assert res.exit_code == 0, res.output
    return res


def test_index_summary_and_random_weights_warning(setup):
    _, _, res = setup
    assert "added 12, updated 0, unchanged 0, moved 0, removed 0, failed 1" in res.output
    assert "random weights" in res.output


def test_rerun_says_nothing_to_embed(setup):
    idx, photos, _ = setup
    res = run("index", photos, "--index", idx)
    assert "nothing to embed: 12 unchanged, 1 failed" in res.output


def test_search_table_json_paths(setup):
    idx, photos, _ = setup
    table = run("search", "a cat", "--index", idx, "-k", "3").output.splitlines()
    assert table[0].split() == ["rank", "score", "path"] and len(table) == 4
    lines = run("search", "a cat", "--index", idx, "-k", "3", "--json").output.splitlines()
    objs = [json.loads(l) for l in lines]
    assert [o["rank"] for o in objs] == [1, 2, 3]
    assert all({"rank", "score", "path"} <= set(o) for o in objs)
    paths = run("search", "a cat", "--index", idx, "-k", "3", "--paths").output.split()
    assert paths == [o["path"] for o in objs]
    img = run("search", "--image", photos / "p3.png", "--index", idx, "-k", "1", "--paths").output.strip()
    assert img == str(photos / "p3.png")


def test_info_json_has_the_documented_keys(setup):
    idx, _, _ = setup
    data = json.loads(run("info", "--index", idx, "--json").output)
    for key in ("images", "failed", "vectors", "model", "dim", "factory", "bytes_on_disk"):
        assert key in data
    assert data["images"] == 12 and data["failed"] == 1 and data["vectors"] == 12 and data["dim"] == 128
    on_disk = sum(f.stat().st_size for f in idx.rglob("*") if f.is_file())  # text tower included
    assert data["model"]["model"] == "mmsearch-tiny" and data["bytes_on_disk"] == on_disk
    assert (idx / "text_tower").is_dir() and on_disk > (idx / "catalog.db").stat().st_size + 1_000_000
    assert "images" in run("info", "--index", idx).output


def test_errors_lists_the_bad_file(setup):
    idx, photos, _ = setup
    out = run("errors", "--index", idx).output
    assert str(photos / "broken.jpg") in out


@pytest.mark.parametrize("args,message", [
    (["search", "dog", "--index", "{missing}"], "no index at"),
    (["search", "", "--index", "{idx}"], "empty query"),
    (["search", "--index", "{idx}"], "empty query"),
    (["index", "{missing}", "--index", "{idx}"], "no such file or folder"),
    (["index", "{photos}", "--index", "{idx}", "--model", "ViT-B-32", "--pretrained", "none"], "was built with"),
    (["reindex", "--index", "{idx}", "--factory", "Bogus12"], "bad FAISS factory"),
])
def test_errors_are_one_line_and_nonzero(setup, tmp_path, args, message):
    idx, photos, _ = setup
    args = [a.format(idx=idx, photos=photos, missing=tmp_path / "missing") for a in args]
    res = run(*args, ok=False)
    assert res.exit_code != 0
    assert message in res.output
    assert "Traceback" not in res.output
    assert res.output.strip().count("\n") <= 1


def test_empty_index_error(tmp_path):
    (tmp_path / "none").mkdir()
    run("index", tmp_path / "none", "--index", tmp_path / "idx", *TINY)
    res = run("search", "dog", "--index", tmp_path / "idx", ok=False)
    assert res.exit_code != 0 and "holds no images" in res.output


def test_texts_add_dedupe_search_remove(setup, tmp_path):
    idx, photos, _ = setup
    f = tmp_path / "corpus.txt"
    f.write_text("a red circle\na blue square\na red circle\n\na green star\n")
    assert "added 3 texts" in run("texts", "add", f, "--index", idx).output
    f.write_text("a red circle\na yellow moon\n")
    assert "added 1 texts" in run("texts", "add", f, "--index", idx).output
    listed = run("texts", "list", "--index", idx).output.splitlines()
    assert sorted(l.split("\t")[1] for l in listed) == sorted(
        ["a red circle", "a blue square", "a green star", "a yellow moon"])
    out = run("search", "--image", photos / "p1.png", "--texts", "--index", idx, "-k", "2", "--json").output
    hits = [json.loads(l) for l in out.splitlines()]
    assert len(hits) == 2 and all("text" in h and "score" in h for h in hits)
    t2t = run("search", "a red circle", "--texts", "--index", idx, "-k", "1", "--paths").output.strip()
    assert t2t == "a red circle"
    assert "removed 1 texts" in run("texts", "remove", "--like", "moon", "--index", idx).output
    assert "yellow moon" not in run("texts", "list", "--index", idx).output
    csvf = tmp_path / "c.csv"
    csvf.write_text("id,caption\n1,a purple triangle\n2,a blue square\n")
    assert "added 1 texts" in run("texts", "add", csvf, "--index", idx).output


def test_commands_load_from_their_own_module_only():
    """The lazy command table is complete and true, and a command loads no other command's module."""
    group = load_all()
    assert set(group.commands) == set(COMMAND_MODULES)
    for name, cmd in group.commands.items():
        sub = next(iter(cmd.commands.values())) if isinstance(cmd, click.Group) else cmd
        assert sub.callback.__module__ == f"mmsearch.cli.{COMMAND_MODULES[name]}", name
    code = ("import sys; from mmsearch.cli.app import cli; cli.get_command(None, 'search'); "
            "print(sorted(m for m in sys.modules if m.endswith('_cmds')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['mmsearch.cli.search_cmds']"


def _all_commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from _all_commands(cmd, prefix + (name,))


def test_every_command_has_help():
    for path, cmd in _all_commands(load_all()):
        assert cmd.help and cmd.help.strip(), path
        res = run(*path, "--help")
        assert "Usage:" in res.output
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, (path, p.name)


def test_help_and_text_query_process_import_no_torch(setup):
    """A text query loads only what it needs: no torch, open_clip, PIL or sqlite-utils (startup time)."""
    idx, _, _ = setup
    heavy = "('torch', 'open_clip', 'PIL', 'sqlite_utils')"
    code = ("import sys; from mmsearch.cli import main; sys.argv=['mmsearch']+sys.argv[1:];\n"
            "try:\n    main()\nexcept SystemExit: pass\n"
            f"print('TORCH' if any(m in sys.modules for m in {heavy}) else 'NOTORCH', file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert res.stderr.strip().endswith("NOTORCH")
    res = subprocess.run([sys.executable, "-c", code, "search", "a dog", "--index", str(idx), "--paths"],
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip()
    assert res.stderr.strip().endswith("NOTORCH")


def test_our_own_architecture_needs_no_pretrained_tag(setup, tmp_path):
    _, photos, _ = setup
    res = run("index", photos, "--index", tmp_path / "idx", "--model", "mmsearch-tiny", "--json")
    assert json.loads(res.stdout.strip().splitlines()[-1])["added"] == 12
    info = json.loads(run("info", "--index", tmp_path / "idx", "--json").stdout)
    assert info["model"]["model"] == "mmsearch-tiny" and info["model"]["pretrained"] is None
