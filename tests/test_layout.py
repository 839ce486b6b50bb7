"""The package layout: imports run one way through the layers, nothing private crosses a module, and
``import usae`` stays light."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "usae"
# lowest first: a module may import only from its own layer or a lower one
LAYERS = [("usae.config", "usae._io", "usae._checks", "usae._workers"), ("usae.data",), ("usae.core",), ("usae.stats",),
          ("usae.train",), ("usae.cam",), ("usae.viz",), ("usae.perf",),
          ("usae.side_by_side", "usae.experiment", "usae.planted", "usae.claims", "usae.book", "usae.cli")]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))


def layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} belongs to no layer; add it to LAYERS")


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out.extend((a.name, []) for a in node.names)
    return out


def resolved(module: str, names: list[str]) -> list[str]:
    """The usae modules an import statement reaches (``from usae.stats import firing`` -> usae.stats.firing)."""
    if module != "usae" and not module.startswith("usae."):
        return []
    subs = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
    return subs or [module]


def test_every_module_belongs_to_a_layer_and_imports():
    for name in MODULES:
        if name != "usae":
            layer(name)
        importlib.import_module(name)


def test_imports_run_one_way_through_the_layers():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = module_name(path)
        if me == "usae":  # the package's public API re-exports from every layer
            continue
        for module, names in imports(path):
            for target in resolved(module, names):
                if target != "usae" and layer(target) > layer(me):
                    bad.append(f"{me} imports {target}")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_library_never_imports_the_benchmarks():
    # only the command line reaches them (``usae bench``)
    users = [module_name(p) for p in PACKAGE.rglob("*.py") if not module_name(p).startswith("usae.perf")
             and module_name(p) != "usae.cli"
             and any(t.startswith("usae.perf") for m, n in imports(p) for t in resolved(m, n))]
    assert users == [], users


def test_no_private_name_crosses_a_module():
    bad = [f"{module_name(p)}: from {m} import {n}" for p in sorted(PACKAGE.rglob("*.py")) for m, names in imports(p)
           for n in names if m.startswith("usae") and n.startswith("_")]
    assert not bad, bad


@pytest.mark.parametrize("chapter", sorted((ROOT / "book").glob("*.ipynb")), ids=lambda p: p.stem)
def test_chapters_import_only_public_modules(chapter):
    import json

    cells = json.loads(chapter.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    found = [(m, n) for m, n in imports_of_source(source)]
    for module, names in found:
        assert not any(part.startswith("_") for part in module.split(".")), module
        assert not any(n.startswith("_") for n in names), (module, names)
        for target in resolved(module, names):
            importlib.import_module(target)
        for n in names:
            assert hasattr(importlib.import_module(module), n) or f"{module}.{n}" in MODULES, f"{module}.{n}"


def imports_of_source(source: str) -> list[tuple[str, list[str]]]:
    tree = ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))))
    return [(node.module, [a.name for a in node.names]) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("usae")]


@pytest.mark.parametrize("page", ["README.md", "book/appendix_paper_scale.md", "book/appendix_discrepancies.md"])
def test_the_imports_the_pages_show_exist(page):
    text = (ROOT / page).read_text()
    blocks = [b.split("\n", 1)[1] for b in text.split("```python")[1:]]
    for block in blocks:
        code = block.split("```", 1)[0]
        for module, names in imports_of_source(code):
            mod = importlib.import_module(module)
            for n in names:
                assert hasattr(mod, n) or f"{module}.{n}" in MODULES, f"{page}: from {module} import {n}"


def test_import_usae_stays_light():
    code = "import sys, usae; print(sorted(m for m in ('timm', 'scipy', 'plotly') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
