"""Query algebra: weights, signs, image terms, errors."""
import pytest
from PIL import Image

from mmsearch.errors import QueryError
from mmsearch.search.query import Term, parse_query


def test_plain_text_is_one_term():
    assert parse_query("a dog on a t-shirt") == [Term(1.0, text="a dog on a t-shirt")]


def test_weights_and_signs():
    assert parse_query("2:dog + beach - people") == [
        Term(2.0, text="dog"), Term(1.0, text="beach"), Term(-1.0, text="people")]
    assert parse_query("0.5:cat - 3:hat") == [Term(0.5, text="cat"), Term(-3.0, text="hat")]


def test_existing_image_path_becomes_an_image_term(tmp_path):
    p = tmp_path / "q.png"
    Image.new("RGB", (8, 8)).save(p)
    terms = parse_query(f"{p} - people", images=[str(p)])
    assert terms[0] == Term(1.0, image=str(p))
    assert terms[1] == Term(-1.0, text="people")
    assert terms[2] == Term(1.0, image=str(p))


@pytest.mark.parametrize("bad", ["", "   ", "dog + ", "dog +  - cat"])
def test_empty_queries_and_terms_are_errors(bad):
    with pytest.raises(QueryError):
        parse_query(bad)


def test_missing_query_image_is_an_error(tmp_path):
    with pytest.raises(QueryError, match="not found"):
        parse_query(None, images=[str(tmp_path / "nope.jpg")])
