"""The package's layers point one way: a module imports only from its own layer or those below.

The order, bottom to top (``|`` separates independent siblings of one layer, which must not
import each other):

    errors -> storage -> config | atomic | choices -> runtime | distributed -> processing -> models
    -> presets | losses -> data | shards -> evaluate -> train -> export -> extract -> pairs -> index
    -> search -> serve -> apps -> commands -> cli

Every import statement counts, including those inside functions (a lazy import is still a
dependency). The ``xmodal`` package ``__init__`` is the public facade: it may import only the
core (up to ``presets | losses``), so that ``import xmodal`` stays light.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "xmodal"

LAYERS: tuple[tuple[str, ...], ...] = (
    ("xmodal.errors",),
    ("xmodal.storage",),
    ("xmodal.config", "xmodal.atomic", "xmodal.choices"),
    ("xmodal.runtime", "xmodal.distributed"),
    ("xmodal.processing",),
    ("xmodal.models",),
    ("xmodal.presets", "xmodal.losses"),
    ("xmodal.data", "xmodal.shards"),
    ("xmodal.evaluate",),
    ("xmodal.train",),
    ("xmodal.export",),
    ("xmodal.extract",),
    ("xmodal.pairs",),
    ("xmodal.index",),
    ("xmodal.search",),
    ("xmodal.serve",),
    ("xmodal.apps",),
    ("xmodal.commands",),
    ("xmodal.cli",),
)
FACADE = "xmodal"  # the package __init__: may import the core only
FACADE_TOP_LAYER = 6  # presets | losses


def unit_of(module: str) -> tuple[int, str] | None:
    """(layer number, unit) of a module name, or None when no layer holds it."""
    for level, units in enumerate(LAYERS):
        for unit in units:
            if module == unit or module.startswith(unit + "."):
                return level, unit
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def xmodal_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every xmodal module ``path`` imports, at any depth of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "xmodal"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "xmodal":
                continue
            for alias in node.names:  # `from xmodal.x import y`: y may be a module of x
                child = f"{target}.{alias.name}"
                is_module = (SRC / Path(*child.split("."))).with_suffix(".py").is_file() or (
                    SRC / Path(*child.split("."))
                ).is_dir()
                found.append((node.lineno, child if is_module else target))
    return sorted(found)


def violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name == FACADE:
            own: tuple[int, str] | None = (FACADE_TOP_LAYER, FACADE)
        else:
            own = unit_of(name)
        if own is None:
            problems.append(f"{name}: in no layer (add it to LAYERS in tests/test_layers.py)")
            continue
        level, unit = own
        for line, target in xmodal_imports(path):
            if target == FACADE:
                continue  # `import xmodal` itself: the facade, always below its importers
            found = unit_of(target)
            where = f"{path.relative_to(SRC)}:{line}: {name} imports {target}"
            if found is None:
                problems.append(f"{where}, which is in no layer")
            elif found[0] > level:
                problems.append(f"{where}, a higher layer")
            elif found[0] == level and found[1] != unit and unit != FACADE:
                problems.append(f"{where}, an independent sibling in the same layer")
    return list(dict.fromkeys(problems))


def test_every_import_points_down_the_layers():
    problems = violations()
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


def test_the_check_sees_lazy_relative_and_from_package_imports(tmp_path, monkeypatch):
    """The walker resolves the import forms the package uses, including one inside a function."""
    pkg = tmp_path / "xmodal"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "distributed.py").write_text("")
    (pkg / "search.py").write_text("")
    (pkg / "models" / "model.py").write_text(
        "from . import identity\n"
        "from xmodal import distributed\n"
        "def f():\n    from xmodal.search import Searcher\n"
        "import xmodal.cli\n"
    )
    (pkg / "models" / "identity.py").write_text("")
    monkeypatch.setitem(globals(), "SRC", tmp_path)
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    assert [t for _, t in xmodal_imports(pkg / "models" / "model.py")] == [
        "xmodal.models.identity",
        "xmodal.distributed",
        "xmodal.search",
        "xmodal.cli",
    ]
    problems = violations()
    assert any("xmodal.models.model imports xmodal.search, a higher layer" in p for p in problems)
    assert any("xmodal.models.model imports xmodal.cli, a higher layer" in p for p in problems)
    assert not any("imports xmodal.distributed" in p for p in problems)


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("xmodal.choices", 2),
        ("xmodal.models.identity", 5),
        ("xmodal.data.refs", 7),
        ("xmodal.shards", 7),
        ("xmodal.apps.quickstart", 16),
    ],
)
def test_shared_pieces_sit_below_their_users(module, layer):
    assert unit_of(module)[0] == layer


def test_config_defines_no_choice_types():
    """``config.py``, the bottom layer, holds the configs' own types only: a module-level
    ``Literal`` alias there would be an upper layer's vocabulary, which lives with the module
    that acts on it (or in :mod:`xmodal.choices` when that module needs an extra to import)."""
    tree = ast.parse((PACKAGE / "config.py").read_text(encoding="utf-8"))
    aliases = []
    for node in tree.body:
        value = node.value if isinstance(node, ast.Assign | ast.AnnAssign) else None
        if isinstance(value, ast.Subscript) and ast.unparse(value.value).endswith("Literal"):
            aliases += [ast.unparse(t) for t in getattr(node, "targets", [node.target])]
    assert aliases == []
