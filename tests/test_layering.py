"""The package layering, read from the source with ``ast`` so that an import pointing the wrong way cannot come back.

The house is a tree: ``model`` <- ``export`` <- ``inference`` <- {``training``, ``service``}, with ``bench`` above
them all; ``training`` and ``service`` are siblings and neither imports the other. ``ALLOWED`` is the whole
table. Every import counts, including those inside functions and under ``TYPE_CHECKING``. And the serving
path imports no torch: the service at module level, and ``service.predict`` on an exported graph not at all
(only a training checkpoint to export, or a TensorRT engine, needs it).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
# What each package may import (itself included); tests/ may import anything, and nothing imports tests/.
ALLOWED: dict[str, set[str]] = {
    "model": {"model"},
    "export": {"model", "export"},
    "inference": {"model", "export", "inference"},
    "training": {"model", "export", "inference", "training"},
    "service": {"model", "export", "inference", "service"},
    "bench": {"model", "export", "inference", "training", "service", "bench"},
}
LAYERS = tuple(ALLOWED)
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
def test_imports_follow_the_table(layer: str) -> None:
    allowed = ALLOWED[layer]
    wrong = []
    for name, path in package_sources().items():
        if name.split(".")[0] != layer:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for line, target in imported_modules(ast.parse(path.read_text(), str(path)), package):
            top = target.split(".")[0]
            if top in (*LAYERS, "tests") and top not in allowed:
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


def test_predict_on_an_exported_graph_never_loads_torch(tmp_path: Path) -> None:
    """``python -m service.predict --checkpoint model.onnx`` segments in a process that never imports torch:
    the in-process predictor is the torch-free pipeline (a .pt would be exported in a child process)."""
    from inference.runtime import export_checkpoint
    from tests.service_models import tiny_checkpoint

    graph = export_checkpoint(tiny_checkpoint("meinst", tmp_path / "tiny.pt"), tmp_path / "tiny.onnx")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "from service.predict import main\n"
        f"status = main([{str(tmp_path / 'photo.png')!r}, '--checkpoint', {str(graph)!r}, '--out', {str(out)!r},"
        " '--runtime', 'onnxruntime', '--score-threshold', '0'])\n"
        "print(status, sorted({'torch', 'torchvision'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stdout + result.stderr
    assert (out / "photo.overlay.png").is_file() and json.loads((out / "results.json").read_text())
