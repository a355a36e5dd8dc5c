"""The package's shape, read from its source: the dependency direction, no import cycle, no reaching into
another module's private names.

Imports are read with ``ast`` from every module of ``wsd/``, function-level ones included; imports under
``if TYPE_CHECKING:`` are type-only and left aside. The direction (docs/architecture.md) is
core ← engine ← runtime pieces ← daemon ← cli: a module may import only from its own layer or below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "wsd"

#: Layers, lowest first. A module is in the layer of the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    ("wsd", "wsd.errors", "wsd.core"),            # pure: no I/O, no event loop
    ("wsd.config", "wsd.control"),                # the config model and loader; the control socket's contract
    ("wsd.engine",),                               # history, sessions and the bus, behind one interface
    ("wsd.runtime",),                              # hub, endpoint, connections, control server, metrics
    ("wsd.runtime.daemon",),                       # owns the process: builds every runtime piece
    ("wsd.cli", "wsd.cli_config", "wsd.__main__"),  # the command line
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(mod: str) -> int:
    best, rank = -1, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (mod == n or mod.startswith(n + ".")) and len(n) > best:
                best, rank = len(n), i
    assert rank >= 0, f"{mod} is in no layer of tests/test_architecture.py: add it"
    return rank


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_nodes(tree: ast.AST):
    """Every node outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".")
    if MODULES[mod].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def wsd_imports(mod: str) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, names taken from it) for every runtime import of a wsd module by ``mod``."""
    tree = ast.parse(MODULES[mod].read_text(), str(MODULES[mod]))
    found = []
    for node in runtime_nodes(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "wsd" or a.name.startswith("wsd."):
                    found.append((a.name, node.lineno, []))
        elif isinstance(node, ast.ImportFrom):
            target = resolve(mod, node)
            if not (target == "wsd" or target.startswith("wsd.")):
                continue
            names = [a.name for a in node.names]
            # ``from wsd import config`` imports the module wsd.config
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            for n in subs:
                found.append((f"{target}.{n}", node.lineno, []))
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                found.append((target, node.lineno, rest))
    return found


def known(target: str) -> str:
    """The module ``target`` names (a package's ``__init__`` for a package)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


GRAPH = {mod: sorted({known(t) for t, _, _ in wsd_imports(mod)} - {mod, ""}) for mod in MODULES}


def test_every_module_has_a_layer():
    for mod in MODULES:
        layer_of(mod)


def test_imports_follow_the_dependency_direction():
    wrong = []
    for mod in MODULES:
        for target, line, _ in wsd_imports(mod):
            t = known(target)
            if t and t != mod and not mod.startswith(t + ".") and layer_of(t) > layer_of(mod):
                wrong.append(f"{MODULES[mod].relative_to(ROOT)}:{line} imports {t} (a higher layer)")
    assert not wrong, "\n".join(wrong)


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        color[n] = GREY
        path.append(n)
        for m in graph.get(n, ()):
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue  # a package and its own modules
            if color.get(m) == GREY:
                return path[path.index(m):] + [m]
            if color.get(m) == WHITE:
                c = visit(m)
                if c:
                    return c
        path.pop()
        color[n] = BLACK
        return None

    for n in graph:
        if color[n] == WHITE:
            c = visit(n)
            if c:
                return c
    return None


def test_no_import_cycle_counting_function_level_imports():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a"]}) is None


#: the public API of named tuples, underscored so as not to clash with field names
NAMEDTUPLE_API = frozenset(("_replace", "_asdict", "_fields", "_make", "_field_defaults"))


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__")) \
        and name not in NAMEDTUPLE_API


def own_names(tree: ast.AST) -> set[str]:
    """Private names this module defines: functions, classes, attributes it assigns, slots."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and private(node.value):
            names.add(node.value)  # __slots__ entries
    return names


def test_no_module_uses_another_modules_private_names():
    """``from m import _x`` or ``obj._x`` (obj neither self nor cls) for a name the module does not define."""
    wrong = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        own = own_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(mod, node)
                for a in node.names:
                    if private(a.name) and (target == "wsd" or target.startswith("wsd.")):
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}.{a.name}")
            elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in own:
                v = node.value
                if isinstance(v, ast.Name) and v.id in ("self", "cls"):
                    continue
                if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
                    continue
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {ast.unparse(v)}.{node.attr}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("text", ["core ← engine ← runtime pieces ← daemon ← cli"])
def test_the_direction_is_written_in_the_architecture_doc(text):
    assert text in (ROOT / "docs" / "architecture.md").read_text()
