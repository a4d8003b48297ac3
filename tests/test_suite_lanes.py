"""`make test` runs the files that start a local multi-node Ray cluster alone, before the rest runs on
xdist workers (tests/run_suite.sh): beside other work those tests slowed 1.6-2.8x here and one missed a
deadline. It picks them by the `cluster` mark, so a file that starts a cluster must carry it."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def starts_a_cluster(tree: ast.AST) -> bool:
    """The file imports ray.cluster_utils (Cluster lives there)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "ray.cluster_utils":
            return True
        if isinstance(node, ast.Import) and any(a.name == "ray.cluster_utils" for a in node.names):
            return True
    return False


def marked_cluster(tree: ast.Module, mark: str = "cluster") -> bool:
    """A module-level `pytestmark` that holds pytest.mark.<mark> (alone or in a list)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Attribute) and sub.attr == mark and isinstance(sub.value, ast.Attribute) \
                        and sub.value.attr == "mark":
                    return True
    return False


def test_the_finders_tell_a_marked_cluster_file_from_an_unmarked_one():
    marked = ast.parse("import pytest\nfrom ray.cluster_utils import Cluster\npytestmark = [pytest.mark.cluster]\n")
    unmarked = ast.parse("import pytest\nfrom ray.cluster_utils import Cluster\npytestmark = pytest.mark.timeout(9)\n")
    assert starts_a_cluster(marked) and marked_cluster(marked)
    assert starts_a_cluster(unmarked) and not marked_cluster(unmarked)
    assert not starts_a_cluster(ast.parse("import ray\n"))


def test_every_file_that_starts_a_ray_cluster_is_marked_cluster():
    trees = {p.name: ast.parse(p.read_text()) for p in sorted(TESTS.glob("test_*.py"))}
    starting = {name for name, tree in trees.items() if starts_a_cluster(tree)}
    assert {"test_distributed_ray.py", "test_distributed_serve.py"} <= starting
    assert sorted(name for name in starting if not marked_cluster(trees[name])) == []


def test_every_file_that_drives_a_browser_is_marked_solo():
    trees = {p.name: ast.parse(p.read_text()) for p in sorted(TESTS.glob("test_*.py"))}
    browsing = {name for name, tree in trees.items() if any(
        isinstance(n, ast.ImportFrom) and (n.module or "").startswith("playwright") for n in ast.walk(tree))}
    assert "test_serve_browser.py" in browsing
    assert sorted(name for name in browsing if not marked_cluster(trees[name], "solo")) == []
