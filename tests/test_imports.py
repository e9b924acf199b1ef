"""The import graph of src/spectra has no cycle, lazy (function-level) imports included, and the model file holds no
kernel machinery. The graph is read from the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "spectra"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the spectra modules it imports anywhere in its file. `from P import x` names the submodule P.x when
    there is one, else P. Importing P.Q.R also runs the package P.Q's __init__ first, so it adds an edge to P.Q, except
    from inside P.Q itself (whose __init__ is already running)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_LAZY"]:
                # a package's names imported on first use (its `__getattr__` imports `_LAZY[name]`)
                targets = [v.value for v in node.value.values if isinstance(v, ast.Constant)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            for t in targets:
                if not t.startswith("spectra"):
                    continue
                parts = t.split(".")
                while parts and ".".join(parts) not in mods:
                    parts.pop()
                for i in range(2, len(parts)):  # packages whose __init__ runs first
                    pkg = ".".join(parts[:i])
                    if pkg != mod and not mod.startswith(pkg + "."):
                        graph[mod].add(pkg)
                target = ".".join(parts)
                if target and target != mod:
                    graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w) :] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_sees_lazy_and_package_imports():
    graph = import_graph()
    assert "spectra.loading" in graph["spectra"]  # the lazy `load` attribute of the top package
    assert "spectra.eval" in graph["spectra.suite.runner"] or "spectra.eval.harness" in graph["spectra.suite.runner"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_top_package():
    graph = import_graph()
    offenders = sorted(m for m, targets in graph.items() if "spectra" in targets and m != "spectra")
    assert offenders == []


def test_model_file_is_only_the_model():
    source = (SRC / "model.py").read_text()
    for banned in ("data_ptr", "ctypes", "_train", "get_num_threads", "autograd.Function", "import functools"):
        assert banned not in source, banned
    assert import_graph()["spectra.model"] <= {
        "spectra.accounting", "spectra.config", "spectra.kernels", "spectra.kernels.attention", "spectra.layers"
    }


def test_packages_import_their_names_on_first_use_and_give_the_names_not_submodules():
    """The packages' names are imported on first use (the command starts without torch), and a name that is also a
    submodule's (`spectra.eval.perplexity`, `spectra.inference.generate` / `bench`) gives the function, before and
    after the submodule is imported elsewhere (the lazy table gave the module: the import system binds it there)."""
    import subprocess
    import sys

    code = """
import sys, types
import spectra, spectra.data, spectra.eval, spectra.inference, spectra.__main__ as m
m.build_parser()
assert "torch" not in sys.modules, "torch imported"
from spectra.eval import perplexity
import spectra.inference.generate
from spectra.inference import generate, bench
import spectra.inference as I
fns = (perplexity, generate, bench, I.generate, I.generate, spectra.eval.perplexity)
assert all(isinstance(f, types.FunctionType) for f in fns), fns
assert "load_tokenizer" in dir(spectra.data) and "load" in dir(spectra) and callable(spectra.load)
try:
    spectra.data.no_such_name
except AttributeError as e:
    assert "no attribute 'no_such_name'" in str(e)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr
