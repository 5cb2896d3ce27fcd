"""The package's layers (trustrl.LAYERS, bottom to top) and its import graph: every module imports
only its own layer or lower ones, the graph has no cycle, and its depth stays small. An ast scan of
every import statement (function-level imports included), so nothing is imported to check it."""
import ast
import os
import pathlib

import pytest

import trustrl

ROOT = pathlib.Path(trustrl.__file__).parent
TOP = {"trustrl": len(trustrl.LAYERS), "trustrl.main": len(trustrl.LAYERS)}  # above every layer
MAX_DEPTH = 7  # import levels: hops on the longest import chain (trustrl.main down to a leaf)


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: pathlib.Path, known) -> set[str]:
    """The trustrl modules ``name`` imports (a package's ``__init__`` counts for ``from pkg
    import x`` only where x is not itself a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                if f"{module}.{alias.name}" in known:
                    found.add(f"{module}.{alias.name}")
                elif module in known:
                    found.add(module)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                for i in range(len(parts), 0, -1):
                    if ".".join(parts[:i]) in known:
                        found.add(".".join(parts[:i]))
                        break
    found.discard(name)
    return found


def graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(module: str) -> int:
    if module in TOP:
        return TOP[module]
    return trustrl.LAYERS.index(module.split(".")[1])


def upward(g) -> list[str]:
    return sorted(f"{a} ({a.split('.')[1] if a not in TOP else 'top'}) imports {b} "
                  f"({b.split('.')[1]})" for a, deps in g.items() for b in deps
                  if a not in TOP and layer(b) > layer(a))


def cycle(g) -> list[str] | None:
    """One import cycle of g as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def depth(g) -> int:
    """Hops on the longest import chain of an acyclic g: a module that imports nothing is 0."""
    memo = {}

    def d(m):
        if m not in memo:
            memo[m] = max((1 + d(x) for x in g[m]), default=0)
        return memo[m]

    return max(d(m) for m in g)


def test_every_module_is_in_a_layer():
    loose = [m for m in graph() if m not in TOP and m.split(".")[1] not in trustrl.LAYERS]
    assert not loose, f"modules outside the layer folders {trustrl.LAYERS}: {loose}"


def test_imports_only_go_down_and_never_cycle():
    g = graph()
    assert upward(g) == []
    assert cycle(g) is None, f"import cycle: {' -> '.join(cycle(g))}"
    assert depth(g) <= MAX_DEPTH, f"{depth(g)} import levels (> {MAX_DEPTH})"


def test_nothing_in_the_package_imports_tools():
    g = graph()
    users = sorted(a for a, deps in g.items() for b in deps
                   if b.startswith("trustrl.tools") and not a.startswith("trustrl.tools"))
    assert users == []


def _copy_with(tmp_path, module: str, line: str) -> pathlib.Path:
    """A copy of the package with ``line`` added at the end of ``module``'s file."""
    root = tmp_path / "trustrl"
    for path in ROOT.rglob("*.py"):
        dest = root / path.relative_to(ROOT)
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(path.read_text())
    target = root / (os.path.join(*module.split(".")[1:]) + ".py")
    target.write_text(target.read_text() + "\n" + line + "\n")
    return root


@pytest.mark.parametrize("module,line,expect", [
    # core imports training: an upward import, even inside a function
    ("trustrl.core.losses", "def f():\n    from trustrl.training import step", "upward"),
    ("trustrl.infra.storage", "from trustrl.tools import aot_check", "upward"),
    ("trustrl.model.policy", "import trustrl.rollout.sampler", "upward"),
    # a cycle inside one layer (sampler already imports continuous)
    ("trustrl.rollout.continuous", "from trustrl.rollout import sampler", "cycle"),
])
def test_the_check_fails_on_a_bad_import(tmp_path, module, line, expect):
    g = graph(_copy_with(tmp_path, module, line))
    if expect == "upward":
        assert any(v.startswith(f"{module} ") for v in upward(g)), upward(g)
    else:
        assert cycle(g) is not None and module in cycle(g)


def private_uses(root: pathlib.Path = ROOT) -> list[str]:
    """``module._name`` of another trustrl module (imported, or read as an attribute)."""
    found = []
    for name, path in modules(root).items():
        tree = ast.parse(path.read_text(), str(path))
        bound = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("trustrl"):
                for alias in node.names:
                    bound[alias.asname or alias.name] = node.module
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{name} imports {node.module}.{alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append(f"{name} reads {node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_a_private_name_of_another():
    assert private_uses() == []


def test_the_private_check_fails_on_a_private_use(tmp_path):
    root = _copy_with(tmp_path, "trustrl.tools.aot_check",
                      "from trustrl.training import experiment\nexperiment._filter")
    assert "trustrl.tools.aot_check reads experiment._filter" in private_uses(root)
