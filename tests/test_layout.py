"""The package's layout rules (docs/DESIGN.md §2 and §5), checked on the source so that they cannot rot:
one name per kernel from module to test file, design citations that resolve, imports that point down."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "galore_kernels"
DESIGN = ROOT / "docs" / "DESIGN.md"
KERNEL_MODULES = sorted(
    path.stem for path in (PACKAGE / "kernels").glob("*.py") if path.stem != "__init__"
)


def _sources(*folders):
    return sorted(path for folder in folders for path in (ROOT / folder).rglob("*.py"))


def _imported_modules(path):
    """Absolute names of the galore_kernels modules ``path`` imports (relative imports resolved)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return [name for name in found if name.startswith("galore_kernels")]


def test_every_kernel_module_has_its_test_file_and_design_entry():
    design = DESIGN.read_text(encoding="utf-8")
    assert KERNEL_MODULES, "no kernel modules found"
    for name in KERNEL_MODULES:
        test_file = ROOT / "tests" / f"test_kernels_{name}.py"
        assert test_file.is_file(), f"kernels/{name}.py has no {test_file.name}"
        assert f"kernels/{name}.py" in design, f"docs/DESIGN.md does not list kernels/{name}.py"


def test_design_citations_resolve():
    sections = set(re.findall(r"^## (\d+)\.", DESIGN.read_text(encoding="utf-8"), flags=re.MULTILINE))
    cited = []
    for path in _sources("galore_kernels", "tests", "bench"):
        for number in re.findall(r"DESIGN(?:\.md)? §(\d+)", path.read_text(encoding="utf-8")):
            cited.append((path.name, number))
    assert cited, "no citations found: the pattern is stale"
    assert [c for c in cited if c[1] not in sections] == []


@pytest.mark.parametrize("folder", ["galore_kernels", "tests", "bench"])
def test_no_source_cites_an_issue(folder):
    pattern = re.compile(r"\bissues? #?\d+|\bthe issue'?s?\b", re.IGNORECASE)
    offenders = [(p.name, m.group()) for p in _sources(folder) for m in pattern.finditer(p.read_text(encoding="utf-8"))]
    assert offenders == []


def test_no_test_uses_a_private_name_of_the_package():
    offenders = []
    for path in _sources("tests", "bench"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules = set()  # local names bound to galore_kernels modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("galore_kernels"):
                offenders += [(path.name, a.name) for a in node.names if a.name.startswith("_")]
                modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                modules |= {a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("galore_kernels")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    offenders.append((path.name, f"{node.value.id}.{node.attr}"))
    assert offenders == []


@pytest.mark.parametrize(
    "importer, forbidden",
    [
        ("galore_kernels/kernels", "galore_kernels.optim"),
        ("galore_kernels/kernels", "galore_kernels.functional"),
        ("galore_kernels/kernels", "galore_kernels.reference"),
        ("galore_kernels/reference.py", "galore_kernels.kernels"),
        ("galore_kernels/reference.py", "galore_kernels.native"),
        ("galore_kernels/native.py", "galore_kernels.functional"),
    ]
    + [(str(p.relative_to(ROOT)), "galore_kernels.integrations")
       for p in sorted(PACKAGE.glob("*"))
       if p.name not in ("integrations", "__pycache__") and (p.is_dir() or p.suffix == ".py")],
    ids=lambda value: value.replace("galore_kernels/", "").replace("galore_kernels.", ""),
)
def test_imports_point_down(importer, forbidden):
    path = ROOT / importer
    files = [path] if path.is_file() else sorted(path.rglob("*.py"))
    offenders = [(f.name, m) for f in files for m in _imported_modules(f) if m.startswith(forbidden)]
    assert offenders == []
