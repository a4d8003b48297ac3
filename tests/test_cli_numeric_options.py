"""Every numeric option of every command is range-checked at the CLI's edge, and the library refuses the
same nonsense with a typed error (issue 31, item 14: `index --batch-size -1` looped forever on empty
transactions, `--workers -1` was a traceback)."""
import math

import click
import numpy as np
import pytest
from click.testing import CliRunner

from mmsearch.cli import load_all

cli = load_all()  # every command module, so `cli.commands` is whole
from mmsearch.errors import ArgumentError, MmsearchError, VectorIndexError

# (command path, parameter name) -> why it takes any number of its type. None today: add one only with a reason.
EXEMPT: dict = {}


def walk(cmd, path=()):
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from walk(sub, path + (name,))
    else:
        yield path, cmd


def numeric_params():
    return [(path, p) for path, cmd in walk(cli) for p in cmd.params
            if isinstance(p.type, (click.types.IntParamType, click.types.FloatParamType))]


def flag(p):
    return p.opts[0] if isinstance(p, click.Option) else p.name.upper()


NUMERIC = numeric_params()


def test_the_walk_sees_the_commands():
    names = {" ".join(path) for path, _ in NUMERIC}
    assert {"index", "search", "dupes", "export", "serve", "synth", "train", "eval", "train-reranker", "demo",
            "texts remove"} <= names
    assert len(NUMERIC) >= 30


def test_every_numeric_option_has_a_range():
    """Item 14: an int option is a click.IntRange with a lower bound; a float option a range that also
    refuses nan and inf (a plain FloatRange lets nan through: it compares false to both bounds)."""
    loose = []
    for path, p in NUMERIC:
        key = (" ".join(path), p.name)
        if key in EXEMPT:
            continue
        if isinstance(p.type, click.types.IntParamType):
            ok = isinstance(p.type, click.IntRange) and p.type.min is not None
        else:
            ok = isinstance(p.type, click.FloatRange) and (p.type.min is not None or p.type.max is not None)
            for bad in ("nan", "inf", "-inf"):
                try:
                    p.type.convert(bad, p, None)
                    ok = False
                except click.BadParameter:
                    pass
        if not ok:
            loose.append(f"{' '.join(path)} {flag(p)}: {p.type!r}")
    assert loose == []


def test_exemptions_are_current_and_explained():
    known = {(" ".join(path), p.name) for path, p in NUMERIC}
    assert all(key in known and reason.strip() for key, reason in EXEMPT.items())


def _out_of_range(p):
    """Values just past each bound of p's range, and nan for floats."""
    t, vals = p.type, []
    step = 1 if isinstance(t, click.types.IntParamType) else 1e-3 * max(1.0, abs(t.min or 0), abs(t.max or 0))
    if t.min is not None:
        vals.append(t.min if getattr(t, "min_open", False) else t.min - step)
    if t.max is not None:
        vals.append(t.max + step)
    if isinstance(t, click.types.FloatParamType):
        vals.append(math.nan)
    return vals


CASES = [(path, p, v) for path, p in NUMERIC for v in _out_of_range(p)]


@pytest.mark.parametrize("path,p,value", CASES, ids=[f"{' '.join(c[0])} {flag(c[1])}={c[2]}" for c in CASES])
def test_out_of_range_values_are_refused_before_any_work(path, p, value):
    """Item 14: each bound of each numeric option, one step past it: a usage error (exit 2) naming the option."""
    text = "nan" if isinstance(value, float) and math.isnan(value) else repr(value)
    args = [*path, flag(p), text] if isinstance(p, click.Option) else [*path, "--", text]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2, res.output
    assert "Invalid value for" in res.output and (flag(p) in res.output or p.name.upper() in res.output), res.output


def test_the_reported_commands(tmp_path):
    """Item 14, the two cases of the report, by name: refused at once, and nothing is created."""
    for args in (["--batch-size", "-1"], ["--workers", "-1"], ["--batch-size", "0"], ["--workers", "0"]):
        res = CliRunner().invoke(cli, ["index", str(tmp_path), "--index", str(tmp_path / "idx"), *args])
        assert res.exit_code == 2 and f"Invalid value for '{args[0]}'" in res.output, res.output
    assert not (tmp_path / "idx").exists()


@pytest.mark.parametrize("budget", ["0", "0MB", "-5MB", "lots"])
def test_a_memory_budget_that_holds_nothing_is_refused(tmp_path, budget):
    """Item 14: --max-index-memory is a size string; zero or a negative is refused before a model loads."""
    from mmsearch.indexing.pipeline import index_folders

    with pytest.raises(VectorIndexError, match="size|holds nothing"):
        index_folders(tmp_path / "idx", [tmp_path], max_index_memory=budget)
    assert not (tmp_path / "idx").exists()


def _library_calls(tmp_path):
    """(description, call) pairs: each must raise ArgumentError before touching its (absent) inputs."""
    from mmsearch.datasets.readers import synthesize
    from mmsearch.demo import run_demo
    from mmsearch.evaluation.evaluate import evaluate
    from mmsearch.indexing.backfill import enable_reranker
    from mmsearch.indexing.pipeline import index_folders
    from mmsearch.search.dupes import find_duplicates
    from mmsearch.search.query import Searcher
    from mmsearch.storage.exchange import export_embeddings
    from mmsearch.train import train_encoder
    from mmsearch.train.reranker import train_reranker

    idx, folder = tmp_path / "idx", tmp_path
    return [
        ("index batch_size=-1", lambda: index_folders(idx, [folder], batch_size=-1)),
        ("index batch_size=0", lambda: index_folders(idx, [folder], batch_size=0)),
        ("index workers=-1", lambda: index_folders(idx, [folder], workers=-1)),
        ("index batch_size=2.5", lambda: index_folders(idx, [folder], batch_size=2.5)),
        ("backfill batch_size=0", lambda: enable_reranker(idx, "r.pt", batch_size=0)),
        ("search k=0", lambda: Searcher(None).search("x", k=0)),
        ("search k=-5", lambda: Searcher(None).search("x", k=-5)),
        ("search offset=-1", lambda: Searcher(None).search("x", offset=-1)),
        ("search rerank_k=0", lambda: Searcher(None).search("x", rerank_k=0)),
        ("search alpha=nan", lambda: Searcher(None).search("x", alpha=float("nan"))),
        ("search alpha=2", lambda: Searcher(None).search("x", alpha=2.0)),
        ("search min_score=nan", lambda: Searcher(None).search("x", min_score=float("nan"))),
        ("texts k=0", lambda: Searcher(None).search_texts("x", k=0)),
        ("dupes threshold=nan", lambda: find_duplicates(None, threshold=float("nan"))),
        ("dupes threshold=1.5", lambda: find_duplicates(None, threshold=1.5)),
        ("export shard_size=0", lambda: export_embeddings(None, tmp_path / "out", shard_size=0)),
        ("synth n=0", lambda: synthesize(tmp_path / "s", n=0)),
        ("synth size=-64", lambda: synthesize(tmp_path / "s", n=10, size=-64)),
        ("train steps=-1", lambda: train_encoder(folder, None, tmp_path / "m.pt", steps=-1)),
        ("train lr=0", lambda: train_encoder(folder, None, tmp_path / "m.pt", lr=0.0)),
        ("train lr=nan", lambda: train_encoder(folder, None, tmp_path / "m.pt", lr=float("nan"))),
        ("train accum_steps=0", lambda: train_encoder(folder, None, tmp_path / "m.pt", accum_steps=0)),
        ("train workers=-1", lambda: train_encoder(folder, None, tmp_path / "m.pt", workers=-1)),
        ("train-reranker steps=0", lambda: train_reranker(folder, "e.pt", tmp_path / "r.pt", steps=0)),
        ("train-reranker lr=-1", lambda: train_reranker(folder, "e.pt", tmp_path / "r.pt", lr=-1.0)),
        ("eval ks=(0,)", lambda: evaluate(None, None, ks=(0,))),
        ("eval alpha=nan", lambda: evaluate(None, None, alpha=float("nan"))),
        ("demo n=5", lambda: run_demo(tmp_path / "demo", n=5)),
        ("demo steps=0", lambda: run_demo(tmp_path / "demo", steps=0)),
    ]


def test_library_functions_refuse_nonsense_with_a_typed_error(tmp_path):
    """Item 14: the Python API gets ArgumentError (an MmsearchError and a ValueError) naming the argument,
    before anything is read, loaded or created."""
    wrong = []
    for what, call in _library_calls(tmp_path):
        try:
            call()
            wrong.append(f"{what}: no error")
        except ArgumentError as exc:
            name = what.split()[1].split("=")[0]
            if name not in str(exc) or "\n" in str(exc):
                wrong.append(f"{what}: unclear message {exc}")
        except Exception as exc:  # noqa: BLE001 (the point: any other type is the bug)
            wrong.append(f"{what}: {type(exc).__name__}: {str(exc)[:120]}")
    assert wrong == []
    assert issubclass(ArgumentError, MmsearchError) and issubclass(ArgumentError, ValueError)
    assert not (tmp_path / "idx").exists() and not (tmp_path / "demo").exists() and not (tmp_path / "s").exists()


def test_in_range_values_still_pass_the_checks():
    from mmsearch.checks import count, number

    assert count("k", 5, 1, 10) == 5 and count("k", np.int64(3)) == 3 and count("k", None) is None
    assert number("alpha", 0, 0.0, 1.0) == 0.0 and number("lr", 1e-5, 0.0, 1.0, low_open=True) == 1e-5
