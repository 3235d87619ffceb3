"""The seam between what Triton loads and the harness around it, read from the source with ``ast`` (no import runs).

- No module under ``rtinfer/`` imports ``clients`` or ``loadtest`` (the launchers under ``rtinfer/launch/`` included).
- Modules of ``rtinfer/`` outside ``rtinfer/launch/``, and the model adapters under ``model_repository/``, do
  not import ``rtinfer.launch``: what Triton loads must not depend on the harness.
- No module imports another module's private name (``from rtinfer.x import _y``, ``x._y``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rtinfer"
LAUNCH = PACKAGE / "launch"
MODULES = sorted(PACKAGE.rglob("*.py"))
ADAPTERS = sorted(p for p in (ROOT / "model_repository").glob("*/1/model.py") if not p.parent.is_symlink())
FIRST_PARTY = ("rtinfer", "clients", "loadtest", "build_engines")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in ``path``, at any depth (a function's lazy import too);
    relative imports resolved against the module's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            out.append((node.lineno, base, [alias.name for alias in node.names]))
    return out


def _under(module: str, top: str) -> bool:
    return module == top or module.startswith(top + ".")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_rtinfer_never_imports_clients_or_loadtest(path):
    bad = [f"{_rel(path)}:{line} imports {mod}" for line, mod, names in imports(path)
           if _under(mod, "clients") or _under(mod, "loadtest")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", [p for p in MODULES if LAUNCH not in p.parents] + ADAPTERS, ids=_rel)
def test_what_triton_loads_does_not_import_the_harness(path):
    bad = []
    for line, mod, names in imports(path):
        if _under(mod, "rtinfer.launch") or (mod == "rtinfer" and "launch" in names):
            bad.append(f"{_rel(path)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", MODULES + ADAPTERS, ids=_rel)
def test_no_private_names_across_modules(path):
    """``from rtinfer.x import _y`` and ``x._y`` for an imported first-party module ``x``: a helper two modules
    share is public, in one place."""
    imported = {}  # local name -> first-party module it is bound to
    bad = []
    for line, mod, names in imports(path):
        if not mod.startswith(FIRST_PARTY):
            continue
        for name in names:
            if name.startswith("_") and not name.startswith("__"):
                bad.append(f"{_rel(path)}:{line} imports {mod}.{name}")
            imported[name] = f"{mod}.{name}"
        if not names:
            imported[mod.split(".")[0]] = mod
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append(f"{_rel(path)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_the_graph_sees_what_it_checks():
    """The checks above read real imports: the harness imports the server, the cascade model the stage code."""
    assert any(mod == "rtinfer.launch.server" for _, mod, _ in imports(LAUNCH / "gateway.py"))
    cascade = ROOT / "model_repository" / "cascade" / "1" / "model.py"
    assert any(_under(mod, "rtinfer") for _, mod, _ in imports(cascade))
    assert LAUNCH / "process.py" in MODULES and PACKAGE / "preprocess.py" in MODULES
