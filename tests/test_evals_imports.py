"""vlm_prune.evals has no import cycle: the import graph of the package (every import statement,
those inside functions included, `if TYPE_CHECKING:` blocks left out), read with ast, has no
cycle through an evals module; and each evals module imports on its own, first, in a fresh
interpreter (slow: one interpreter per module)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """pyproject's package-dir mapping: {"vlm_prune.evals": root / "evals", ...}."""
    text = (root / "pyproject.toml").read_text()
    line = re.search(r"^package-dir\s*=\s*\{(.*)\}", text, re.M).group(1)
    return {name: root / folder for name, folder in re.findall(r'"([\w.]+)"\s*=\s*"([\w./-]+)"', line)}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the installed packages, by dotted name (packages by their __init__.py),
    sub-packages found by their __init__.py."""
    found: dict[str, Path] = {}
    for package, folder in package_dirs(root).items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if any(not (folder.joinpath(*rel[:i]) / "__init__.py").exists() for i in range(1, len(rel))):
                continue  # a folder that is not a package (data, fixtures)
            parts = rel[:-1] if rel[-1] == "__init__" else rel
            name = ".".join((package, *parts))
            # a sub-folder mapped as its own package (vlm_prune/methods) is found once under each name
            found.setdefault(name, path)
    return found


def _skips(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` blocks: never run."""
    if isinstance(node, ast.If):
        test = node.test
        return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    return False


def _imports(tree: ast.AST):
    stack = [tree]
    while stack:
        node = stack.pop()
        if _skips(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package modules its import statements name (a package's own __init__ when the
    import names the package; the parents Python imports on the way are not counted)."""
    mods = modules(root)
    graph: dict[str, set[str]] = {name: set() for name in mods}

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            for target in targets:
                hit = known(target)
                if hit is not None and hit != name:
                    graph[name].add(hit)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def evals_modules() -> list[str]:
    return sorted(name for name in modules() if name.startswith("vlm_prune.evals."))


def test_the_graph_reader_sees_imports_and_cycles():
    graph = import_graph()
    assert "vlm_prune.evals.backend" in graph["vlm_prune.evals.hf_backend"]  # from .backend import ...
    assert "vlm_prune.evals.backends" in graph["vlm_prune.evals.cli"]  # inside a function too
    assert "vlm_prune.evals.metrics" in graph["vlm_prune.evals.tasks"]  # from . import metrics
    assert "vlm_prune.flops" in graph["vlm_prune.evals.hf_backend"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_through_evals():
    graph = import_graph()
    assert len(evals_modules()) >= 15
    through_evals = [c for c in cycles(graph) if any(m.startswith("vlm_prune.evals") for m in c)]
    assert not through_evals, f"import cycles through vlm_prune.evals: {through_evals}"
    # the interface imports no backend; the backends are found by name
    assert not {"vlm_prune.evals.hf_backend", "vlm_prune.evals.vllm_backend"} & graph["vlm_prune.evals.backend"]
    assert not graph["vlm_prune.evals.backends"] - {"vlm_prune.evals.backend"}


def test_backends_are_looked_up_by_name():
    from vlm_prune.evals import backends
    from vlm_prune.evals.backend import Backend
    from vlm_prune.evals.hf_backend import HFBackend

    assert backends.available_backends() == ["hf", "vllm"]
    assert backends.backend_class("hf") is HFBackend and issubclass(HFBackend, Backend)
    with pytest.raises(ValueError, match="unknown backend 'trt'; choose hf or vllm"):
        backends.make_backend("trt", "model")
    with pytest.raises(ValueError, match="module:Class"):
        backends.register_backend("x", "no_colon")


@pytest.mark.slow
def test_each_evals_module_imports_first_in_a_fresh_interpreter():
    """Import order must not matter: each module, imported first and alone, then all the others."""
    names = evals_modules()
    procs = []
    for name in names:
        code = (f"import importlib; importlib.import_module({name!r})\n"
                f"for other in {names!r}: importlib.import_module(other)\n")
        procs.append((name, subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, text=True)))
        if len(procs) % 2 == 0:  # two at a time: the CI machine has two cores
            procs[-2][1].wait(timeout=300)
    failed = {}
    for name, proc in procs:
        out, _ = proc.communicate(timeout=300)
        if proc.returncode:
            failed[name] = out[-2000:]
    assert not failed, failed
