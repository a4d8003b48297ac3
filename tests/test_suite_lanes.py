"""`make test` runs some files alone before the rest runs on xdist workers (tests/run_suite.sh), and picks
them by their mark: the files that start a local multi-node Ray cluster (`cluster`: beside other work they
slowed 1.6-2.8x here and one missed a deadline) and the files that drive a real browser (`solo`: a first
search once took past its 30 s wait). A file of either kind must carry its mark. So must a test that reads the
whole machine's CPU time from /proc/stat: a worker beside it is "another process" (CI: 1.21 cores busy
"elsewhere" while only this test's own thread spun)."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def imports_from(tree: ast.AST, module: str) -> bool:
    """The file imports `module` or something under it."""
    def under(name):
        return name == module or name.startswith(module + ".")

    return any((isinstance(n, ast.ImportFrom) and under(n.module or "")) or
               (isinstance(n, ast.Import) and any(under(a.name) for a in n.names)) for n in ast.walk(tree))


def marked(tree: ast.Module, mark: str) -> bool:
    """A module-level `pytestmark` that holds pytest.mark.<mark> (alone or in a list)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            for sub in ast.walk(node.value):
                if isinstance(sub, ast.Attribute) and sub.attr == mark and isinstance(sub.value, ast.Attribute) \
                        and sub.value.attr == "mark":
                    return True
    return False


def unmarked(module: str, mark: str, expected: set) -> list:
    """The test files that import `module` but lack `mark`; checks the finder sees the `expected` ones."""
    trees = {p.name: ast.parse(p.read_text()) for p in sorted(TESTS.glob("test_*.py"))}
    found = {name for name, tree in trees.items() if imports_from(tree, module)}
    assert expected <= found
    return sorted(name for name in found if not marked(trees[name], mark))


def test_the_finders_tell_a_marked_cluster_file_from_an_unmarked_one():
    good = ast.parse("import pytest\nfrom ray.cluster_utils import Cluster\npytestmark = [pytest.mark.cluster]\n")
    bad = ast.parse("import pytest\nfrom ray.cluster_utils import Cluster\npytestmark = pytest.mark.timeout(9)\n")
    assert imports_from(good, "ray.cluster_utils") and marked(good, "cluster")
    assert imports_from(bad, "ray.cluster_utils") and not marked(bad, "cluster")
    assert not imports_from(ast.parse("import ray\n"), "ray.cluster_utils")
    assert imports_from(ast.parse("from playwright.sync_api import sync_playwright\n"), "playwright")


def test_every_file_that_starts_a_ray_cluster_is_marked_cluster():
    assert unmarked("ray.cluster_utils", "cluster", {"test_distributed_ray.py", "test_distributed_serve.py"}) == []


def test_every_file_that_drives_a_browser_is_marked_solo():
    assert unmarked("playwright", "solo", {"test_serve_browser.py"}) == []


def measures_the_machine_unmarked(tree: ast.Module) -> list:
    """Test functions with a decorator that names /proc/stat but no @pytest.mark.solo."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            marks = [ast.unparse(d) for d in node.decorator_list]
            if any("/proc/stat" in m for m in marks) and "pytest.mark.solo" not in marks:
                found.append(node.name)
    return found


def test_every_test_that_reads_the_machines_cpu_time_runs_alone():
    bad = ast.parse('@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="x")\ndef test_a():\n    pass\n')
    good = ast.parse('@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="x")\n@pytest.mark.solo\n'
                     'def test_a():\n    pass\n')
    assert measures_the_machine_unmarked(bad) == ["test_a"] and measures_the_machine_unmarked(good) == []
    offenders = {p.name: measures_the_machine_unmarked(ast.parse(p.read_text())) for p in TESTS.glob("test_*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}
