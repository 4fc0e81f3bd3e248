"""No import cycles in medcam_fast: the import graph of every module, built with the standard
library's ast from the source (imports inside functions included, so a deferred import that hides a
cycle at run time is still an edge), has no strongly connected component of more than one module.

Edges: ``import a.b`` and ``from a.b import name`` point at ``a.b``; ``from a import b`` points at the
submodule ``a.b`` where there is one, else at ``a``. Importing a module of another package runs that
package's ``__init__`` first, so it is an edge to each such package too (not to the module's own
packages, nor to ``medcam_fast`` itself, whose ``__init__`` only re-exports)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medcam_fast"


def _modules() -> dict:
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def import_graph() -> dict:
    """module -> the set of medcam_fast modules it imports, anywhere in its source."""
    mods = _modules()
    graph = {}
    for mod, f in mods.items():
        package = mod.split(".") if f.name == "__init__.py" else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                deps.update(d for d in (subs or [target]) if d in mods and d != mod)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods and a.name != mod)
        own = {".".join(mod.split(".")[:k]) for k in range(1, mod.count(".") + 2)}
        for d in list(deps):
            parts = d.split(".")
            deps.update(p for p in (".".join(parts[:k]) for k in range(2, len(parts))) if p in mods and p not in own)
        graph[mod] = deps
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "medcam_fast.medcam.step" in graph["medcam_fast.medcam.fit"]          # a module-level import
    assert "medcam_fast.models.loading" in graph["medcam_fast.distributed.worker"]   # one inside a method
    assert "medcam_fast.metrics" in graph["medcam_fast.medcam.sufficiency"]   # a package whose __init__ runs first
    assert "medcam_fast.medcam" not in graph["medcam_fast.medcam.fit"]     # not its own package
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)
