"""Bad query input gets the same one-line error from the CLI, the server and the Python API (issue 31):
out-of-range term weights (item 13) and bad filters, plus the CLI's inclusive `--until` (item 16)."""
import datetime as dt
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient  # the dev extra installs the serve extra: a missing one fails

from mmsearch import Index
from mmsearch.cli import cli
from mmsearch.config import ModelSpec
from mmsearch.errors import QueryError
from mmsearch.indexing.pipeline import index_folders
from mmsearch.search.query import Searcher, Term, parse_query
from mmsearch.serve import create_app

BAD_WEIGHTS = ["1e40:red", "3.4e38:red", "inf:red", "-inf:red", "nan:red", "NaN:red", "101:red",
               "1" + "0" * 40 + ":red", "dog + 1e39:red"]
# a day in May, in UTC: the photo's date is its mtime (the synthetic PNGs carry no EXIF date)
DAYS = {"may30.png": "2024-05-30T12:00:00", "may31.png": "2024-05-31T23:30:00", "jun01.png": "2024-06-01T00:30:00"}


def epoch(iso):
    return dt.datetime.fromisoformat(iso).replace(tzinfo=dt.timezone.utc).timestamp()


@pytest.fixture(scope="module")
def dated(tmp_path_factory, synth_dir, tiny_checkpoint):
    """An index of three photos dated May 30, May 31 (late evening) and June 1 (just after midnight)."""
    root = tmp_path_factory.mktemp("dated")
    photos = root / "photos"
    photos.mkdir()
    sources = sorted(os.listdir(synth_dir / "images"))
    for src, (name, iso) in zip(sources, DAYS.items()):
        shutil.copy(synth_dir / "images" / src, photos / name)
        os.utime(photos / name, (epoch(iso), epoch(iso)))
    idx = root / "idx"
    index_folders(idx, [photos], spec=ModelSpec(checkpoint=str(tiny_checkpoint)))
    return idx, photos


@pytest.fixture(scope="module")
def client(dated):
    with TestClient(create_app(dated[0], warm=False), base_url="http://127.0.0.1") as c:
        yield c


def cli_error(args):
    """The CLI's one line for a bad search: exit 1, one stderr line, no traceback, nothing on stdout."""
    res = CliRunner().invoke(cli, ["search", *args])
    assert res.exit_code == 1, res.output
    assert res.stdout == "" and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    return lines[0][len("Error: "):]


def api_error(client, params):
    res = client.get("/api/search", params=params)
    assert res.status_code == 400, res.text
    assert set(res.json()) == {"error"} and "\n" not in res.json()["error"]
    return res.json()["error"]


# ---- item 13: term weights ---------------------------------------------------------------------
@pytest.mark.parametrize("query", BAD_WEIGHTS)
def test_out_of_range_weights_are_a_query_error(query):
    """Item 13: a weight that is not a finite number within ±100 is refused, not read as text or overflowed."""
    with pytest.raises(QueryError, match=r"weight .* out of range"):
        parse_query(query)


def test_in_range_weights_still_parse():
    """Item 13: the algebra itself is unchanged, and scientific notation within range is a weight too."""
    assert parse_query("100:dog - 1e-2:cat + .5:sun") == [Term(100.0, text="dog"), Term(-0.01, text="cat"),
                                                         Term(0.5, text="sun")]
    assert parse_query("-100:dog") == [Term(-100.0, text="dog")]


@pytest.mark.parametrize("query", ["1e40:red", "3.4e38:red", "nan:red"])
def test_bad_weight_is_the_same_one_line_from_cli_server_and_api(dated, client, query):
    """Item 13: a 400 from the server, one line from the CLI, a QueryError from the Python API, one wording."""
    idx, _ = dated
    from_api = api_error(client, {"q": query})
    assert "weight" in from_api and "out of range" in from_api
    assert cli_error([query, "--index", str(idx)]) == from_api
    with pytest.raises(QueryError) as exc_info:
        Index.open(idx).search(query)
    assert str(exc_info.value) == from_api


def test_largest_weight_ranks_like_weight_one(client):
    """Item 13: |w| = 100 is accepted and only scales the query vector: the same hits, the same order."""
    one = client.get("/api/search", params={"q": "red circle", "k": 3}).json()["hits"]
    big = client.get("/api/search", params={"q": "100:red circle", "k": 3}).json()["hits"]
    assert [h["id"] for h in big] == [h["id"] for h in one]
    assert [h["score"] for h in big] == pytest.approx([h["score"] for h in one], abs=1e-5)


class _Texts:
    def __init__(self, table):
        self.table = table

    def encode_texts(self, texts, return_states=False):
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


class _Store:
    dim = 4

    def __init__(self, table):
        self.encoder = _Texts(table)

    def text_encoder(self):
        return self.encoder


def test_combined_vector_never_overflows_float32():
    """Item 13: the weighted sum is normalised safely: embeddings near float32's top (3e38) times weight 100
    give the unit vector a float64 reference gives, not inf / NaN (which used to mean no hits at all)."""
    a = np.array([3e38, 1e38, 0, 0], np.float32)
    b = np.array([0, 2e38, 3e38, 0], np.float32)
    vec, _ = Searcher(_Store({"a": a, "b": b})).embed([Term(100.0, text="a"), Term(-50.0, text="b")])
    ref = 100.0 * a.astype(np.float64) - 50.0 * b.astype(np.float64)
    assert vec.dtype == np.float32 and np.all(np.isfinite(vec))
    np.testing.assert_allclose(vec, ref / np.linalg.norm(ref), rtol=1e-6)


def test_non_finite_embedding_is_a_query_error_not_nan_scores():
    """Item 13 (and 9's door): a NaN in a term's embedding stops the query with one line."""
    bad = np.array([np.nan, 0, 0, 1], np.float32)
    with pytest.raises(QueryError, match="NaN or infinity"):
        Searcher(_Store({"a": bad})).embed([Term(1.0, text="a")])
    with pytest.raises(QueryError, match="cancel out"):
        one = np.array([1, 0, 0, 0], np.float32)
        Searcher(_Store({"a": one})).embed([Term(2.0, text="a"), Term(-2.0, text="a")])


# ---- item 16: one filter parser, one error -----------------------------------------------------
@pytest.mark.parametrize("cli_args,params", [
    (["--ext", "jgp"], {"ext": "jgp"}),
    (["--ext", "jpg,exe"], {"ext": "jpg,exe"}),
    (["--after", "yesterday"], {"after": "yesterday"}),
    (["--before", "2024-13-01"], {"before": "2024-13-01"}),
    (["--until", "31/05/2024"], {"until": "31/05/2024"}),
    (["--after", "2024-06-02", "--before", "2024-06-01"], {"after": "2024-06-02", "before": "2024-06-01"}),
    (["--after", "2024-06-01", "--before", "2024-06-01"], {"after": "2024-06-01", "before": "2024-06-01"}),
    (["--after", "2024-06-02", "--until", "2024-05-31"], {"after": "2024-06-02", "until": "2024-05-31"}),
    (["--before", "2024-06-01", "--until", "2024-05-31"], {"before": "2024-06-01", "until": "2024-05-31"}),
])
def test_bad_filter_is_the_same_error_from_cli_and_server(dated, client, cli_args, params):
    """Item 16: `search --ext jgp` used to print "no results" while the API said 400: now one parser, one line."""
    idx, _ = dated
    from_api = api_error(client, dict(params, q="red"))
    assert cli_error(["red", "--index", str(idx), *cli_args]) == from_api
    api_kwargs = {{"ext": "exts"}.get(k, k): v for k, v in params.items()}
    with pytest.raises(QueryError) as exc_info:
        Index.open(idx).search("red", **api_kwargs)
    assert str(exc_info.value) == from_api


def _cli_paths(idx, *args):
    res = CliRunner().invoke(cli, ["search", "red", "--index", str(idx), "--paths", "-k", "10", *args])
    assert res.exit_code == 0, res.output
    return sorted(os.path.basename(p) for p in res.stdout.split())


def test_cli_until_is_inclusive_and_matches_the_server(dated, client):
    """Item 16: `--until DATE` keeps all of that day (the page's "To"); --before stays exclusive; From = To
    is one day, not an error; the CLI keeps what the server keeps."""
    idx, _ = dated
    assert _cli_paths(idx, "--until", "2024-05-31") == ["may30.png", "may31.png"]
    assert _cli_paths(idx, "--before", "2024-05-31") == ["may30.png"]
    assert _cli_paths(idx, "--after", "2024-05-31", "--until", "2024-05-31") == ["may31.png"]
    assert _cli_paths(idx, "--after", "2024-06-01") == ["jun01.png"]
    hits = client.get("/api/search", params={"q": "red", "k": 10, "until": "2024-05-31"}).json()["hits"]
    assert sorted(h["name"] for h in hits) == ["may30.png", "may31.png"]
    assert sorted(os.path.basename(h.path) for h in Index.open(idx).search("red", k=10, until="2024-05-31")) \
        == ["may30.png", "may31.png"]
    assert "--until" in CliRunner().invoke(cli, ["search", "--help"]).output
