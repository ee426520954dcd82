"""The package layering, read from the source with ``ast`` so that an import pointing the wrong way cannot come back.

Arrows point down only: ``model`` <- ``export`` <- ``training`` <- ``service``. Every import counts, including
those inside functions and under ``TYPE_CHECKING``. And the service's ONNX serving path imports no torch at
module level (only a training checkpoint to export, or a TensorRT engine, needs it).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("model", "export", "training", "service")  # each may import only itself and the ones before it
SERVING_ENTRY = "service.__main__"
TORCH = ("torch", "torchvision")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.AST, package: str) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import statement below ``node``."""
    for child in ast.walk(node):
        if isinstance(child, ast.Import):
            yield from ((child.lineno, alias.name) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield child.lineno, base
            # ``from package import module`` names a module too.
            yield from ((child.lineno, f"{base}.{alias.name}") for alias in child.names if alias.name != "*")


def package_sources() -> dict[str, Path]:
    return {module_name(path): path for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))}


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down_only(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    wrong = []
    for name, path in package_sources().items():
        if name.split(".")[0] != layer:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for line, target in imported_modules(ast.parse(path.read_text(), str(path)), package):
            top = target.split(".")[0]
            if top in LAYERS and top not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, f"{layer} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def module_level_imports(tree: ast.Module, package: str) -> Iterator[tuple[int, str]]:
    """Imports that run when the module is imported: not those in functions or under ``if TYPE_CHECKING``."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        statement = pending.pop()
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(statement, ast.If) and "TYPE_CHECKING" in ast.unparse(statement.test):
            pending.extend(statement.orelse)
            continue
        if isinstance(statement, (ast.Import, ast.ImportFrom)):
            yield from imported_modules(statement, package)
        elif isinstance(statement, ast.ClassDef):
            pending.extend(s for s in statement.body)
        else:
            pending.extend(s for s in ast.iter_child_nodes(statement) if isinstance(s, ast.stmt))


def test_onnx_serving_path_imports_no_torch_at_module_level() -> None:
    """Follow the module-level imports from the service's entry point through our own modules."""
    sources = package_sources()
    chains = {SERVING_ENTRY: [SERVING_ENTRY]}
    queue, torch_users = [SERVING_ENTRY], []
    while queue:
        name = queue.pop()
        path = sources[name]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for line, target in module_level_imports(ast.parse(path.read_text(), str(path)), package):
            if target.split(".")[0] in TORCH:
                torch_users.append(" -> ".join(chains[name]) + f" ({path.relative_to(ROOT)}:{line} imports {target})")
            for candidate in (target, target.rpartition(".")[0]):
                if candidate in sources and candidate not in chains:
                    chains[candidate] = [*chains[name], candidate]
                    queue.append(candidate)
    assert "model.finishing" in chains and "export.runtimes" in chains  # the walk reached the serving path
    assert not torch_users, "\n".join(torch_users)


def test_service_starts_without_loading_torch() -> None:
    """The same, for real: third-party packages on the path must not pull torch in either."""
    code = "import sys, service.__main__; print(sorted({'torch', 'torchvision'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
