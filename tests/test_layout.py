"""The package's plan: subpackages by concern, imports in one direction, no circle.

The graph is computed from the source (every `import` and `from ... import`, at module level and
inside functions), so an import hidden in a function cannot hold a circle together unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "toolkit"
# Lowest first: a module may import its own subpackage and the ones listed before it, never one after.
LAYERS = ["core", "output", "policy", "data", "backends", "engine", "search", "fanout", "report"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The toolkit modules `name` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import mod` imports the submodule; `from mod import name` the module
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in known else origin for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import toolkit.x.y` also names its parents
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def subpackage(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def test_the_graph_sees_imports_inside_functions():
    edges = graph()
    assert "toolkit.output.curves" in edges["toolkit.commands"]  # imported inside commands.plot()
    assert "toolkit.report.chart" in edges["toolkit.compare"]  # imported inside compare.main()


def test_no_import_circle():
    assert find_cycle(graph()) is None, f"import circle: {' -> '.join(find_cycle(graph()))}"


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_subpackages_import_downwards_only():
    """Commands (top-level modules) may import any subpackage; a subpackage never imports a command, and
    imports only its own subpackage or the ones below it in LAYERS."""
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(LAYERS)
    wrong = []
    for name, targets in graph().items():
        own = subpackage(name)
        if own is None:
            continue
        for target in targets:
            other = subpackage(target)
            if other is None and target != "toolkit":
                wrong.append(f"{name} imports the command module {target}")
            elif other is not None and LAYERS.index(other) > LAYERS.index(own):
                wrong.append(f"{name} ({own}) imports {target} ({other}), a layer above it")
    assert not wrong, "\n".join(wrong)


def test_every_subpackage_says_what_lives_there_and_who_may_import_it():
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and len(doc.split()) >= 25, f"toolkit/{layer}/__init__.py needs a docstring paragraph"
        assert "import" in doc, f"toolkit/{layer}/__init__.py should say what may import it"


def test_train_main_is_a_short_recipe_and_no_command_borrows_from_it():
    """train.main reads top to bottom in at most 120 lines; evaluate and compare import what they need from
    the modules that own it (compare runs train's main for each of its runs, and only that)."""
    tree = ast.parse((PACKAGE / "train.py").read_text())
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 120
    for command in ("evaluate", "compare", "predict", "prepare"):
        for node in ast.walk(ast.parse((PACKAGE / f"{command}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module == "train":
                assert [a.name for a in node.names] == ["main"], f"{command}.py imports {node.names} from train"
