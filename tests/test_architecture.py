"""The import graph of src/samadapt against the layer table of docs/architecture.md: no import cycle between modules,
no module importing a layer above its own.

Every ``import`` / ``from ... import`` statement counts, wherever it stands (module top, inside a function: a lazy
import is still a dependency), with relative imports resolved; except those under ``if TYPE_CHECKING:``, which never
run (annotations only). ``importlib.import_module`` strings (the package roots' lazy public API) are not statements
and are not followed.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"

# Import edges (importer, imported) excused from both checks (cycle and layer). Empty: issue 28's branches removed the
# last ones. Never add to it to make a new import pass; the test fails once a listed edge is gone.
KNOWN_EXCEPTIONS: dict[tuple[str, str], str] = {}

# Modules the layer table places before they exist (a branch in progress adds them); a listed module that exists,
# or a table entry that names nothing, fails.
NOT_YET_BUILT: dict[str, str] = {}


def source_modules(source: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's ``__init__``) for every .py file under ``source``."""
    modules = {}
    for path in sorted(source.rglob("*.py")):
        parts = list(path.relative_to(source).with_suffix("").parts)
        package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if package else parts)] = (path, package)
    return modules


def import_graph(source: Path, top: str) -> dict[str, set[str]]:
    """Module -> the modules of package ``top`` it imports, from the AST of every file under ``source``.

    ``from P import name`` is an edge to the module ``P.name`` when that is a module (a submodule imported by name),
    else to ``P``; ``import P.Q`` is an edge to ``P.Q``. A name not in the package (a typo, an attribute path) is cut
    back to the longest module prefix.
    """
    modules = source_modules(source)
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        here = name.split(".") if package else name.split(".")[:-1]  # the package relative imports start from
        targets: set[str] = set()
        tree = ast.parse(path.read_text(), str(path))
        type_only = {
            id(inner)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for statement in block.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    if node.level - 1 > len(here):
                        raise ValueError(f"{path}: relative import beyond the top package")
                    base = here[: len(here) - node.level + 1] + ([node.module] if node.module else [])
                    origin = ".".join(base)
                else:
                    origin = node.module or ""
                wanted = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
            else:
                continue
            for target in wanted:
                if target != top and not target.startswith(top + "."):
                    continue
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:  # recursion depth <= number of modules (about 120)
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = []
    for component in components:  # a shortest way back to the smallest member, for the message
        start = min(component)
        paths = {start: [start]}
        frontier = [start]
        while frontier:
            node = frontier.pop(0)
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    found.append(paths[node] + [start])
                    frontier = []
                    break
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    frontier.append(nxt)
    return sorted(found)


def layer_table(doc: Path) -> list[tuple[int, str, list[str]]]:
    """(rank, layer, module entries) per row of the table under ``## Layers`` in docs/architecture.md.

    Entries are the backticked names of the third column: ``samadapt`` (the package root), ``name.py``, ``name/``.
    """
    text = doc.read_text()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        entries = []
        for token in re.findall(r"`([^`]+)`", cells[2]):
            if token == "samadapt":
                entries.append("samadapt")
            elif re.fullmatch(r"\w+\.py", token):
                entries.append(f"samadapt.{token[:-3]}")
            elif re.fullmatch(r"\w+/", token):
                entries.append(f"samadapt.{token[:-1]}")
            else:
                raise ValueError(f"{doc}: layer {cells[1]!r}: cannot read module entry `{token}`")
        rows.append((int(cells[0]), cells[1], entries))
    if not rows:
        raise ValueError(f"{doc}: no layer table under '## Layers'")
    return rows


def layer_of(module: str, table: list[tuple[int, str, list[str]]]) -> tuple[int, str] | None:
    """The (rank, layer) of a module: the row naming it, or its package (the root ``samadapt`` only itself)."""
    for rank, layer, entries in table:
        for entry in entries:
            if module == entry or (entry != "samadapt" and module.startswith(entry + ".")):
                return rank, layer
    return None


def upward_imports(graph: dict[str, set[str]], table) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        rank, layer = layer_of(module, table)
        for target in sorted(targets):
            target_rank, target_layer = layer_of(target, table)
            if target_rank > rank:
                found.append(f"{module} ({layer}, {rank}) imports {target} ({target_layer}, {target_rank})")
    return found


@pytest.fixture(scope="module")
def graph():
    return import_graph(SOURCE, "samadapt")


@pytest.fixture(scope="module")
def table():
    return layer_table(DOC)


def allowed(graph):
    """The graph without the known exceptions."""
    return {m: {t for t in targets if (m, t) not in KNOWN_EXCEPTIONS} for m, targets in graph.items()}


def test_every_module_has_a_layer_and_every_table_entry_a_module(graph, table):
    unplaced = [m for m in graph if layer_of(m, table) is None]
    assert not unplaced, f"modules in no layer of {DOC.name} (add them to its '## Layers' table): {unplaced}"
    ranks = [rank for rank, _, _ in table]
    assert ranks == sorted(set(ranks)), f"layer numbers must increase down the table: {ranks}"
    for _, layer, entries in table:
        for entry in entries:
            exists = any(m == entry or m.startswith(entry + ".") for m in graph)
            if entry in NOT_YET_BUILT:
                assert not exists, f"{entry} exists now: remove it from NOT_YET_BUILT"
            else:
                assert exists, f"layer {layer!r} names {entry}, which is not in src/"


def test_no_import_cycle(graph):
    found = cycles(allowed(graph))
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_upward_import(graph, table):
    found = upward_imports(allowed(graph), table)
    assert not found, f"imports of a higher layer ({DOC.name}, '## Layers'):\n" + "\n".join(found)


def test_known_exceptions_are_still_needed(graph, table):
    """An exception whose import is gone (its branch merged) must leave the list, so that the list empties."""
    for (module, target), branch in KNOWN_EXCEPTIONS.items():
        assert target in graph.get(module, set()), f"{module} -> {target} is gone ({branch}): remove it here"
        inside_a_cycle = any(module in c and target in c for c in cycles(graph))
        upward = layer_of(target, table)[0] > layer_of(module, table)[0]
        assert inside_a_cycle or upward, f"{module} -> {target} breaks no rule: remove it from KNOWN_EXCEPTIONS"


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_graph_resolves_relative_lazy_and_submodule_imports(tmp_path):
    source = write_package(
        tmp_path,
        {
            "pkg/__init__.py": "from .low import helper\n",
            "pkg/low.py": "import os\n\ndef helper():\n    from pkg.high import run  # lazy\n    return run\n",
            "pkg/high.py": "from . import low\nfrom .sub import deep\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/deep.py": "from .. import low\nfrom ..low import helper\nimport pkg.sub\n",
            "pkg/other.py": "import pkg.sub.deep as d\nfrom pkg import nothing_here\n",
            "pkg/typed.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg.high import run\n"
            "else:\n    import pkg.low\n",
        },
    )
    graph = import_graph(source, "pkg")
    assert graph == {
        "pkg": {"pkg.low"},
        "pkg.low": {"pkg.high"},
        "pkg.high": {"pkg.low", "pkg.sub.deep"},
        "pkg.sub": set(),
        "pkg.sub.deep": {"pkg.low", "pkg.sub"},
        "pkg.other": {"pkg.sub.deep", "pkg"},
        "pkg.typed": {"pkg.low"},  # the annotation-only import of pkg.high never runs
    }
    assert cycles(graph) == [["pkg.high", "pkg.low", "pkg.high"]]
    table = [(0, "low", ["samadapt.low"]), (1, "high", ["samadapt.high"])]
    upward = {"samadapt.low": {"samadapt.high"}, "samadapt.high": {"samadapt.low"}}
    assert upward_imports(upward, table) == ["samadapt.low (low, 0) imports samadapt.high (high, 1)"]


def test_the_layer_table_is_read_from_the_document(tmp_path):
    doc = tmp_path / "architecture.md"
    doc.write_text(
        "# A\n\n## Layers\n\n| # | layer | modules | job |\n|---|---|---|---|\n"
        "| 0 | base | `samadapt` (root), `errors.py` | errors, see `x` |\n| 1 | models | `models/` | the SAM family |\n"
        "\n## Next\n\n| 2 | not | `read.py` | - |\n"
    )
    table = layer_table(doc)
    assert table == [(0, "base", ["samadapt", "samadapt.errors"]), (1, "models", ["samadapt.models"])]
    assert layer_of("samadapt.models.vit", table) == (1, "models")
    assert layer_of("samadapt", table) == (0, "base") and layer_of("samadapt.other", table) is None
