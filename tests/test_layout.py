"""The package's structure: imports flow one way, and the command line answers without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "src" / "cvt"

# Bottom to top: a module may import only from its own layer or the layers below it.
LAYERS = [
    {"cvt", "cvt.errors", "cvt.files"},
    {"cvt.models"},
    {"cvt.config"},
    {"cvt.data"},
    {"cvt.weights"},
    {"cvt.training"},
    {"cvt.predict"},
    {"cvt.cli"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for index, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names - {"cvt"}):
            return index
    if module == "cvt":
        return 0
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every cvt module `path` imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t == "cvt" or t.startswith("cvt."))
    return found - {name}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def test_imports_flow_one_way():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert not upward, "imports from a higher layer: " + "; ".join(sorted(upward))


def test_no_import_loops():
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import loop: " + " -> ".join(cycle))
            if target in graph and not state.get(target):
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])


def test_the_model_package_needs_nothing_above_it():
    graph = _graph()
    for module, targets in graph.items():
        if module.startswith("cvt.models"):
            assert all(_layer(t) <= 1 for t in targets), (module, targets)


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["train", "--help"], ["predict", "--help"], ["export", "--help"]])
def test_the_command_line_answers_without_torch(argv):
    code = (
        "import sys\n"
        "from cvt.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted(m for m in ('torch', 'timm', 'torchvision', 'safetensors') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out, out


def test_import_cvt_is_lazy_but_complete():
    code = (
        "import sys, cvt\n"
        "assert 'torch' not in sys.modules\n"
        "assert callable(cvt.create_model) and cvt.CvtSpec and cvt.read_checkpoint\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
