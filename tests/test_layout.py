"""The package's shape, checked by walking its source with `ast`: no import cycles, no reaching into
another module's private names, small modules, and a library that never prints or exits."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mmsearch"
MAX_LINES = 400
RENDERERS = ("cli", "serve")  # the only subpackages that speak to the user


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path, known: dict) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every mmsearch import, at any depth (lazy ones too)."""
    found = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("mmsearch"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, [], node.lineno) if sub in known else (base, [alias.name], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("mmsearch")]
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m, _, _ in imports(name, path, known) if m in known and m != name}
            for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    """Lazy imports count too: a cycle through a function-level import is still two modules that
    cannot be understood (or tested) apart."""
    assert cycles(import_graph()) == []


def test_no_module_imports_another_modules_private_names():
    known = modules()
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {mod}.{n}"
                 for name, path in known.items() for mod, names, line in imports(name, path, known)
                 for n in names if n.startswith("_") and not n.startswith("__") and mod != name]
    assert offenders == []


def test_modules_stay_small():
    big = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}, f"modules over {MAX_LINES} lines: split them by job"


def _speaks(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id in ("print", "exit", "quit"):
            found.append((node.lineno, f.id))
        elif isinstance(f, ast.Attribute) and f.attr == "exit" and isinstance(f.value, ast.Name) and f.value.id == "sys":
            found.append((node.lineno, "sys.exit"))
        elif isinstance(f, ast.Attribute) and f.attr in ("echo", "secho") and isinstance(f.value, ast.Name) \
                and f.value.id == "click":
            found.append((node.lineno, f"click.{f.attr}"))
    return found


def test_the_speech_finder_sees_print_and_exit():
    tree = ast.parse("import sys\nprint('x')\nsys.exit(1)\nclick.echo('y')\nlog('fine')\n")
    assert [w for _, w in _speaks(tree)] == ["print", "sys.exit", "click.echo"]


def test_library_modules_never_print_or_exit():
    """Only cli/ and serve/ talk to the user; the library raises typed errors and reports progress
    through callbacks."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in RENDERERS or rel.name == "__main__.py":
            continue
        offenders += [f"{rel}:{line} {what}" for line, what in _speaks(ast.parse(path.read_text()))]
    assert offenders == []
