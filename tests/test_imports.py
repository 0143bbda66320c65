"""How ``pipeline/`` imports itself: no package-level cycle, no unexplained late imports, clear module names.

Read from the source with :mod:`ast` only: no module of the package is imported here, so the
checks see every import (module level, inside functions, inside ``if``/``try``) without running any.

* **No cycle between packages.** The nodes are the subpackages (``pipeline/<pkg>/``) and each
  top-level module (``pipeline/schema.py``, ``pipeline/__init__.py`` as ``pipeline``); an edge is
  any import, module-level or late, of one node by another. A cycle hidden by a late import is
  still a cycle: it only moves the failure from import time to the first call.
* **Late imports of project modules are explained.** An import of ``pipeline.*`` inside a
  function or class body is allowed in ``pipeline/cli/`` (each command imports its library code
  when it runs, so ``pipeline --help`` stays fast) and elsewhere only with a reason on the same
  line or the line above: ``# late: <reason>``.
* **Module names say which module they are** (see :func:`test_module_names_are_not_ambiguous`).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
LATE_REASON = re.compile(r"#\s*late:\s*\S")
CLI = PACKAGE / "cli"  # commands import library code when they run; modules named after their commands


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module (or package), dotted
    path: Path
    line: int
    late: bool  # inside a function or class body
    dynamic: bool = False  # a module name in a string, for importlib (a lazy re-export)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(PACKAGE.parent)}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module and package (namespace packages included) of ``pipeline/``, by dotted name."""
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    for d in sorted(PACKAGE.rglob("*")):
        if d.is_dir() and d.name != "__pycache__":
            modules.setdefault(module_name(d / "__init__.py"), d)
    return modules


def node_of(module: str) -> str:
    """The graph node of a module: its subpackage ``pipeline.<pkg>``, or the top-level module itself."""
    return ".".join(module.split(".")[:2])


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:  # relative: resolved against the importing module's package
        base = source.split(".") if is_package else source.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    # `from a import b` imports the module a.b when there is one, else a name of a.
    return [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]


def project_imports() -> list[Import]:
    """Every import of a ``pipeline`` module by a ``pipeline`` module, with where it is.

    Besides ``import`` statements, a module that uses :mod:`importlib` imports each project module
    it names in a string (``importlib.import_module("pipeline.eval.evaluation")``, or a table of lazy
    re-exports read by a PEP 562 ``__getattr__``): those count as late, ``dynamic`` imports.
    """
    modules = project_modules()
    found: list[Import] = []
    for source, path in modules.items():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

        def visit(node: ast.AST, late: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(child, source, path.name == "__init__.py", modules):
                        if target == "pipeline" or target.startswith("pipeline."):
                            found.append(Import(source, target, path, child.lineno, late))
                body = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
                visit(child, late or body)

        visit(tree, False)
        if any(isinstance(n, ast.Import) and any(a.name == "importlib" for a in n.names) for n in ast.walk(tree)):
            for n in ast.walk(tree):
                if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in modules and n.value != source:
                    if n.value.startswith("pipeline."):
                        found.append(Import(source, n.value, path, n.lineno, late=True, dynamic=True))
    return found


def package_graph(imports: list[Import]) -> dict[str, dict[str, list[Import]]]:
    graph: dict[str, dict[str, list[Import]]] = defaultdict(lambda: defaultdict(list))
    for imp in imports:
        a, b = node_of(imp.source), node_of(imp.target)
        if a != b:
            graph[a][b].append(imp)
    return graph


def strongly_connected(graph: dict[str, dict[str, list[Import]]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one node are the cycles' node sets."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(set(graph) | {w for edges in graph.values() for w in edges}):
        if v not in index:
            connect(v)
    return components


def shortest_cycle(graph: dict[str, dict[str, list[Import]]], component: list[str]) -> list[str]:
    """A shortest cycle through the first node of a component (breadth first, inside the component)."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a strongly connected component


def describe_cycle(graph: dict[str, dict[str, list[Import]]], component: list[str]) -> str:
    cycle = shortest_cycle(graph, component)
    lines = [" -> ".join(cycle) + (f"   (component: {', '.join(component)})" if len(component) > len(cycle) - 1 else "")]
    for a, b in zip(cycle, cycle[1:]):
        places = list(dict.fromkeys(
            f"{i.where}{' (importlib)' if i.dynamic else ' (late)' if i.late else ''}" for i in graph[a][b]
        ))
        more = f" and {len(places) - 8} more" if len(places) > 8 else ""
        lines.append(f"    {a} -> {b}: {', '.join(places[:8])}{more}")
    return "\n".join(lines)


def test_the_reader_resolves_every_kind_of_import():
    """The checks below are only as good as this reader: absolute, `from`, relative and late imports."""
    modules = project_modules()

    def targets(code: str, source: str, is_package: bool = False) -> list[str]:
        return _targets(ast.parse(code).body[0], source, is_package, modules)

    assert targets("import pipeline.data.shards", "pipeline.eval.evaluation") == ["pipeline.data.shards"]
    assert targets("from pipeline import schema, __version__", "pipeline.cli") == ["pipeline.schema", "pipeline"]
    assert targets("from pipeline.data import coco_file", "pipeline.eval.groundtruth") == ["pipeline.data.coco_file"]
    assert targets("from .shards import read_shard", "pipeline.data.info") == ["pipeline.data.shards"]
    assert targets("from ..eval import rle_check", "pipeline.annotate.coco") == ["pipeline.eval.rle_check"]
    assert targets("from . import select", "pipeline.annotate", is_package=True) == ["pipeline.annotate.select"]

    imports = project_imports()
    assert len({i.path for i in imports}) > 30
    assert ("pipeline.cli", "pipeline") in {(node_of(i.source), node_of(i.target)) for i in imports}
    assert any(i.late and i.source.startswith("pipeline.cli.") for i in imports)  # commands import late
    for imp in imports:
        assert imp.target in modules or imp.target.rsplit(".", 1)[0] in modules, imp


def test_no_import_cycle_between_packages():
    graph = package_graph(project_imports())
    cycles = [describe_cycle(graph, c) for c in strongly_connected(graph)]
    assert not cycles, "import cycles between packages of pipeline/ (late imports included):\n" + "\n".join(cycles)


def test_late_imports_of_project_modules_say_why():
    offenders = []
    for imp in project_imports():
        if not imp.late or imp.dynamic or imp.path.is_relative_to(CLI):
            continue
        lines = imp.path.read_text(encoding="utf-8").splitlines()
        here = lines[imp.line - 1]
        above = lines[imp.line - 2] if imp.line > 1 else ""
        if not (LATE_REASON.search(here) or LATE_REASON.search(above)):
            offenders.append(f"{imp.where}: {imp.target}")
    offenders = sorted(set(offenders))
    assert not offenders, (
        "function-level imports of project modules, without a `# late: <reason>` comment on the line or the "
        "line above (move them to module level, or say why they must be late):\n  " + "\n  ".join(offenders)
    )


def ambiguous_module_names() -> list[str]:
    """Pairs of modules, in different packages, that have the same name (a plural ``s`` dropped).

    Two ``driver.py`` (a job's driver, the evaluation's) or two ``actor.py`` made a reader open
    both to find the one meant, and tracebacks and ``git grep`` showed the same name for either.
    Outside ``pipeline/cli/`` (whose modules are named after the commands they define: ``cli/eval.py``
    is ``pipeline eval``); ``__init__`` and ``__main__`` do not count.
    """

    def stem(p: Path) -> str:
        return p.stem[:-1] if p.stem.endswith("s") else p.stem

    files = [p for p in sorted(PACKAGE.rglob("*.py")) if not p.name.startswith("__") and not p.is_relative_to(CLI)]
    clashes = []
    for i, a in enumerate(files):
        for b in files[i + 1 :]:
            if a.parent != b.parent and stem(a) == stem(b):
                clashes.append(f"{a.relative_to(PACKAGE)} / {b.relative_to(PACKAGE)}")
    return clashes


def test_module_names_are_not_ambiguous():
    clashes = ambiguous_module_names()
    assert not clashes, "module names a reader cannot tell apart (rename one of each pair):\n  " + "\n  ".join(clashes)
