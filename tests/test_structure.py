"""The layers of the code, and that no import goes up them or round in a loop.

Bottom to top: the kernels (kernels/, imported as gpt2fast.kernels through the link gpt2fast/kernels, and the
extension gpt2fast._C), then gpt2fast.ops, then the model (config.py, quantize.py, model.py), then everything that uses the
model. A module may import its own layer and those below. Every import counts, at the top of a module or
inside a function: `import a.b`, `from a import b` (b as a module where there is one), relative imports, and
importlib.import_module with a constant name or an f-string's constant prefix (every module it may name).
Importing a.b.c from outside package a.b also runs a.b's __init__ first, so that counts as importing a.b; the
package gpt2fast itself (whose __init__ imports the whole public API) sits in the top layer.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "gpt2fast"
KERNELS = "gpt2fast.kernels"
EXTENSIONS = ("gpt2fast._C",)  # compiled, so never parsed; a module of the kernels' layer
LAYERS = ("kernels", "ops", "model", "uses the model")


def layer(module: str) -> int:
    if module in EXTENSIONS or module == KERNELS or module.startswith(KERNELS + "."):
        return 0
    if module == "gpt2fast.ops" or module.startswith("gpt2fast.ops."):
        return 1
    if module in ("gpt2fast.config", "gpt2fast.quantize", "gpt2fast.model"):
        return 2
    return 3


def _name(relative: Path) -> str:
    parts = relative.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_files() -> dict[str, Path]:
    """Every module of gpt2fast/ and kernels/ by its import name."""
    files = {}
    for folder, dirs, names in os.walk(ROOT / PACKAGE):
        dirs[:] = [d for d in dirs if d != "__pycache__" and not (Path(folder) / d).is_symlink()]
        for n in names:
            if n.endswith(".py"):
                path = Path(folder) / n
                files[_name(path.relative_to(ROOT))] = path
    for path in (ROOT / "kernels").rglob("*.py"):
        files[_name(Path(*KERNELS.split(".")) / path.relative_to(ROOT / "kernels"))] = path
    return files


def _import_module_target(call: ast.Call) -> tuple[str, bool] | None:
    """(name, is_prefix) of importlib.import_module(<constant or f-string>), else None."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value, False
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return arg.values[0].value, True
    return None


def imports(source: str, module: str, is_package: bool, known: set[str]) -> dict[str, int]:
    """The modules of `known` that `module` imports, each with the line of its first import."""
    here = module if is_package else module.rpartition(".")[0]
    named: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            named += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                named.append((sub if sub in known else base, node.lineno))
        elif isinstance(node, ast.Call) and (target := _import_module_target(node)):
            name, is_prefix = target
            named += [(m, node.lineno) for m in sorted(known) if m.startswith(name)] if is_prefix \
                else [(name, node.lineno)]
    found: dict[str, int] = {}
    for name, line in named:
        # the module itself, and each package above it that does not hold the importer (its __init__ runs)
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            target = ".".join(parts[:i])
            if target != name and (module + ".").startswith(target + "."):
                break
            if target in known and target != module:
                found[target] = min(found.get(target, line), line)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    files = module_files()
    known = set(files) | set(EXTENSIONS)
    return {module: imports(path.read_text(), module, path.name == "__init__.py", known)
            for module, path in sorted(files.items())}


def picture(graph: dict[str, dict[str, int]]) -> str:
    """Each layer, top first, with its modules (without the gpt2fast. prefix)."""
    modules = set(graph) | set(EXTENSIONS)
    lines = []
    for i in reversed(range(len(LAYERS))):
        names = sorted(m.removeprefix(PACKAGE + ".") for m in modules if layer(m) == i)
        lines.append(f"  {LAYERS[i]}: {', '.join(names)}")
    return "layers, top first:\n" + "\n".join(lines)


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected group of modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph, group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, within the group."""
    start = min(group)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph.get(path[-1], {})):
            if w == start:
                return path + [start]
            if w in group and w not in seen:
                seen.add(w)
                paths.append(path + [w])
    raise AssertionError(f"no cycle in {group}")


def test_no_import_cycle_among_gpt2fast_modules():
    graph = import_graph()
    found = cycles(graph)
    described = [" -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"
                 for cycle in found]
    assert not found, "import cycles:\n  " + "\n  ".join(described) + "\n" + picture(graph)


def test_no_import_goes_up_the_layers():
    graph = import_graph()
    upward = [f"{m} ({LAYERS[layer(m)]}) imports {t} ({LAYERS[layer(t)]}), line {line}"
              for m, targets in graph.items() for t, line in targets.items() if layer(t) > layer(m)]
    assert not upward, "imports going up the layers:\n  " + "\n  ".join(upward) + "\n" + picture(graph)


def test_the_graph_sees_every_kind_of_import():
    """The reader itself, on a made-up module: imports in functions, relative ones, `from gpt2fast import _C`,
    a package's __init__ run by importing a module inside it, and import_module with an f-string prefix."""
    known = {"gpt2fast", "gpt2fast.ops", "gpt2fast.ops.reference", "gpt2fast.ops.registry", "gpt2fast.model",
             "gpt2fast._C", "gpt2fast.kernels.sample", "gpt2fast.kernels.target", "gpt2fast.generate"}
    source = """
import torch
from .registry import register

def probe():
    from gpt2fast import _C
    import gpt2fast.model
    return importlib.import_module(f"gpt2fast.kernels.{name}")

def late():
    from .. import generate
    from gpt2fast import GPT2
"""
    found = imports(source, "gpt2fast.ops.native_backend", False, known)
    assert set(found) == {"gpt2fast.ops.registry", "gpt2fast._C", "gpt2fast.model", "gpt2fast.kernels.sample",
                          "gpt2fast.kernels.target", "gpt2fast.generate", "gpt2fast"}
    assert found["gpt2fast.generate"] == 11
    kernel = imports("from gpt2fast.ops.reference import x\n", "gpt2fast.kernels.sample", False, known)
    assert set(kernel) == {"gpt2fast.ops.reference", "gpt2fast.ops"}


def test_every_module_is_read():
    graph = import_graph()
    for module in ("gpt2fast", "gpt2fast.model", "gpt2fast.gpt2", "gpt2fast.ops", "gpt2fast.bench.e2e",
                   "gpt2fast.kernels.sample", "gpt2fast.cli"):
        assert module in graph, module
    assert "gpt2fast._C" in graph["gpt2fast.ops.native_backend"]
    assert "gpt2fast.model" in graph["gpt2fast.gpt2"]


def test_the_model_never_asks_which_device_or_whether_it_is_compiled():
    """The model calls ops, and ops decide: config.py and model.py read no device type, no compilation, grad or
    inference state, and name no device."""
    asked = []
    for path in (ROOT / PACKAGE / "config.py", ROOT / PACKAGE / "model.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("type", "cuda", "is_compiling", "is_grad_enabled",
                                                                 "is_inference", "is_inference_mode_enabled"):
                asked.append(f"{path.name}, line {node.lineno}: .{node.attr}")
            elif isinstance(node, ast.Constant) and node.value in ("cpu", "cuda", "mps", "xpu"):
                asked.append(f"{path.name}, line {node.lineno}: {node.value!r}")
    assert not asked, "\n".join(asked)
