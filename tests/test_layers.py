"""The package's layer order, held as a test.

The subpackages stack cli -> sdscripts -> tools -> network -> files -> sdxl -> the top modules (errors,
tomlfile). A module may import its own subpackage and any layer below it, never one above: the tree is the
architecture only while this holds. Some modules must also stay torch-free at module level (what
``--help``, ``check`` and the names layer load). Every import, at module level or inside a function, must
name a module and a name that exist: a move that leaves a function-level import pointing nowhere would
otherwise only fail when that function first runs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "blora_network"

# Lowest first. The top package's own modules (errors, tomlfile) are layer 0.
LAYERS = ["", "sdxl", "files", "network", "tools", "sdscripts", "cli"]
# The two entry points reach up by design: sd-scripts' lazy create_network, and `python -m`.
ENTRY = {"blora_network", "blora_network.__main__"}
# Names the top package hands out, and the layer that really provides each.
TOP_NAMES = {"__version__": "", "create_network": "network", "create_network_from_weights": "network"}
# Must not import torch (or what imports it) at module level.
TORCH_FREE = [
    "blora_network", "blora_network.errors", "blora_network.tomlfile",
    "blora_network.sdxl", "blora_network.sdxl.names", "blora_network.sdxl.blocks",
    "blora_network.network", "blora_network.network.options", "blora_network.network.presets",
    "blora_network.files", "blora_network.files.writes", "blora_network.tools",
    "blora_network.sdscripts", "blora_network.sdscripts.args", "blora_network.sdscripts.images",
    "blora_network.sdscripts.recipe", "blora_network.sdscripts.check", "blora_network.sdscripts.kohya_gui",
    "blora_network.cli", "blora_network.cli.main", "blora_network.cli.args", "blora_network.cli.subcommand",
    "blora_network.cli.files", "blora_network.cli.training",
]
HEAVY = ("torch", "lycoris", "safetensors", "numpy", "matplotlib", "PIL")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imports(module: str):
    """(absolute module, names, line, at module level) for each import in ``module``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(module, path).split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield target, [a.name for a in node.names], node.lineno, id(node) in top_level


def _targets(target: str, names: list[str]) -> list[str]:
    """The package modules an import reaches: a submodule named in ``from pkg import sub`` counts as itself."""
    if target == "blora_network":
        return [f"blora_network.{n}" if f"blora_network.{n}" in MODULES else f"@{TOP_NAMES.get(n, '')}" for n in names]
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
    return subs or [target]


def test_no_layer_imports_a_layer_above_it():
    wrong = []
    for module in MODULES:
        if module in ENTRY:
            continue
        mine = LAYERS.index(_layer(module))
        for target, names, line, _ in _imports(module):
            if not target.startswith("blora_network"):
                continue
            for reached in _targets(target, names):
                layer = reached[1:] if reached.startswith("@") else _layer(reached)
                if LAYERS.index(layer) > mine:
                    wrong.append(f"{MODULES[module].relative_to(ROOT)}:{line} imports {reached.lstrip('@') or target}"
                                 f" ({layer or 'top'} is above {_layer(module) or 'top'})")
    assert not wrong, "\n".join(wrong)


def _module_level_closure(module: str, seen: set[str]) -> set[str]:
    """Every module (ours and third-party tops) imported at module level, following our own."""
    reached = set()
    for target, names, _, top in _imports(module):
        if not top:
            continue
        for t in _targets(target, names) if target.startswith("blora_network") else [target]:
            if t.startswith("@"):
                continue
            reached.add(t)
            parent = t
            while parent.startswith("blora_network"):  # importing a.b.c runs a and a.b first
                if parent in MODULES and parent not in seen:
                    seen.add(parent)
                    reached |= _module_level_closure(parent, seen)
                parent = parent.rpartition(".")[0]
    return reached


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_stay_torch_free(module):
    heavy = sorted(t for t in _module_level_closure(module, {module}) if t.split(".")[0] in HEAVY)
    assert not heavy, f"{module} imports {', '.join(heavy)} at module level (directly or through our modules)"


def test_every_import_names_something_that_exists():
    """Function-level imports included: each module exists and each imported name is in it."""
    files = dict(MODULES)
    for extra in list((ROOT / "tests").glob("*.py")) + list((ROOT / "benchmarks").glob("*.py")):
        files[f"<{extra.relative_to(ROOT)}>"] = extra
    missing = []
    for key, path in files.items():
        if key.startswith("<"):
            tree = ast.parse(path.read_text(), str(path))
            found = [(n.module, [a.name for a in n.names], n.lineno) for n in ast.walk(tree)
                     if isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").startswith("blora_network")]
            found += [(a.name, [], n.lineno) for n in ast.walk(tree) if isinstance(n, ast.Import)
                      for a in n.names if a.name.startswith("blora_network")]
        else:
            found = [(t, names, line) for t, names, line, _ in _imports(key) if t.startswith("blora_network")]
        for target, names, line in found:
            if importlib.util.find_spec(target) is None:
                missing.append(f"{path.relative_to(ROOT)}:{line}: no module {target}")
                continue
            mod = importlib.import_module(target)
            for name in names:
                is_sub = hasattr(mod, "__path__") and importlib.util.find_spec(f"{target}.{name}") is not None
                if name != "*" and not hasattr(mod, name) and not is_sub:
                    missing.append(f"{path.relative_to(ROOT)}:{line}: {target} has no {name}")
    assert not missing, "\n".join(missing)


def test_every_subpackage_says_what_it_is():
    for module, path in MODULES.items():
        if path.name == "__init__.py" and module != "blora_network":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc) > 40, f"{path.relative_to(ROOT)} needs a docstring naming its modules"
            for sub in path.parent.glob("*.py"):
                if sub.name != "__init__.py":
                    assert sub.name in doc, f"{path.relative_to(ROOT)}'s docstring does not name {sub.name}"


def test_no_module_sends_the_reader_outside_the_repository():
    """The notes beside the repository (shared/reference/*.md) are not shipped: a docstring must state the
    fact, or cite the upstream file it comes from."""
    outside = ("shared/", "sdxl-blocks.md", "lycoris-notes.md", "sd-scripts-contract.md", "design-review", "kohya-gui.md")
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in MODULES.values()
             for n, line in enumerate(path.read_text().splitlines(), 1) if any(o in line for o in outside)]
    assert not found, "\n".join(found)


def test_one_toml_reader():
    """tomlfile.read_toml is the one function of that name (sd-scripts' configs have read_config_toml)."""
    defined = [f"{path.relative_to(ROOT)}" for path in MODULES.values()
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)
               and node.name == "read_toml"]
    assert defined == ["blora_network/tomlfile.py"], defined


def test_no_import_cycles():
    """No two modules import each other, even through others or inside functions (the entry points aside):
    a cycle inside a layer is where its files stop having one job each."""
    graph = {m: set() for m in MODULES}
    for module in MODULES:
        if module in ENTRY:
            continue
        for target, names, _, _ in _imports(module):
            if target.startswith("blora_network"):
                graph[module] |= {t for t in _targets(target, names) if t in MODULES and t not in ENTRY} - {module}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)
