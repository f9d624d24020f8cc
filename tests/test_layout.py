"""The shape of the package: no import circle (imports inside functions count), no library module over 600 lines,
and every estimator family named the same in every layer (``method/<family>.py`` beside
``functional/<family>.py``). Run as a script it prints the import graph's circles and upward arrows."""
from __future__ import annotations

import ast
import pathlib
import sys
from typing import Dict, List, Set

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fastgrad"
MAX_LINES = 600
# modules whose size is one idea that does not split well: the demo script
EXEMPT_SIZE = {"fastgrad.examples.discrete_vae"}
EXTENSIONS = ("fastgrad._C",)  # compiled modules beside the package: leaves of the graph


def _modules() -> Dict[str, pathlib.Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _known() -> Dict[str, pathlib.Path]:
    return {**_modules(), **{e: None for e in EXTENSIONS}}


def import_graph() -> Dict[str, Set[str]]:
    """Module -> the fastgrad modules it imports, anywhere in its body (top level or inside functions). An import of
    ``pkg.name`` points at the submodule when ``name`` is one, else at ``pkg``; a package's implicit import of its
    parents is not an arrow."""
    mods = _known()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in _modules().items():
        is_pkg = path.name == "__init__.py"
        pkg = mod if is_pkg else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src for a in node.names]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("fastgrad"):
                    graph[mod].add(t)
    return graph


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert circles(import_graph()) == []


def test_circle_finder_finds_one():
    # the check above can fail: a two-module circle hidden in a function is found
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_library_module_over_600_lines():
    long = {m: len(p.read_text().splitlines()) for m, p in _modules().items()}
    over = {m: n for m, n in long.items() if n > MAX_LINES and m not in EXEMPT_SIZE}
    assert over == {}, f"split these modules (one idea each): {over}"


def test_estimator_families_share_one_name_per_layer():
    methods = {p.stem for p in (ROOT / "method").glob("*.py") if not p.stem.startswith("_")}
    functional = {p.stem for p in (ROOT / "functional").glob("*.py") if not p.stem.startswith("_")}
    # the relaxations are reparameterized samplers, whose math is the sampling module's
    assert methods - functional <= {"gumbel_softmax", "reparameterization", "infer"}
    assert functional - methods <= {"sampling", "lm_head"}


def test_method_files_import_only_base_and_functional():
    graph = import_graph()
    for m, deps in graph.items():
        # infer.py is Storchastic's Infer, a picker that hands a distribution to one of the estimators
        if m.startswith("fastgrad.method.") and not m.endswith(("._base", ".infer")):
            siblings = {d for d in deps if d.startswith("fastgrad.method.") and not d.endswith("._base")}
            assert siblings == set(), f"{m} imports its sibling estimator files {siblings}: move the shared part " \
                                      f"into method/_base.py"


def test_one_version():
    import fastgrad

    toml = (ROOT.parent / "pyproject.toml").read_text()  # the version is fastgrad/_version.py's
    assert f'version = "{fastgrad.__version__}"' in toml
    assert f"## [{fastgrad.__version__}]" in (ROOT.parent / "CHANGELOG.md").read_text()


if __name__ == "__main__":
    g = import_graph()
    print("circles:", circles(g))
    print("modules over", MAX_LINES, "lines:",
          {m: n for m, n in ((m, len(p.read_text().splitlines())) for m, p in _modules().items()) if n > MAX_LINES})
