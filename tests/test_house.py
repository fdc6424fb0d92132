"""The house's import rules, from the code (docs/architecture.md): no import circles in the
runtime or the heavy side, and the runtime never imports convert/ (the torch reference engine
and the converters are loaded by name, so `import huatuo_lite` stays light)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREES = {"huatuo_lite": ROOT / "huatuo_lite", "huatuo_lite.convert": ROOT / "convert"}


def modules() -> dict:
    """dotted name -> file, for every module of both trees."""
    found = {}
    for package, folder in TREES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path) -> set:
    """Every module this one imports, at any depth of the file (lazy imports count too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def graph() -> dict:
    mods = modules()
    return {m: {t for t in imports(m, p) if t in mods and t != m} for m, p in mods.items()}


def circles(edges: dict) -> list:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1; stack.append(start); on.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop(); on.discard(w); comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_no_import_circles():
    found = circles(graph())
    assert not found, "import circles (move the shared names down into a module both can import): " + \
        "; ".join(" <-> ".join(c) for c in found)


def test_the_circle_check_sees_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_runtime_never_imports_convert():
    mods = modules()
    runtime = {m: p for m, p in mods.items() if not m.startswith("huatuo_lite.convert")}
    heavy = {m: sorted(t for t in imports(m, p) if t.startswith("huatuo_lite.convert") or t == "convert"
                       or t.startswith("convert.")) for m, p in runtime.items()}
    assert not {m: t for m, t in heavy.items() if t}, "runtime modules import the heavy side"


def test_test_modules_have_unique_names():
    # tests/ has no __init__.py files, so pytest imports each test module by its file name: two
    # test_gguf_export.py in different folders break collection of the whole suite
    seen: dict = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name not in ("conftest.py", "__init__.py"):
            seen.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"test module names used twice (rename one, e.g. with its folder's prefix): {clashes}"
